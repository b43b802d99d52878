"""A real PgBouncer (Debian's ``pgbouncer``) in transaction pooling mode, started by the
tests in front of the test PostgreSQL, as Cloud SQL and RDS users run one."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def available() -> bool:
    return Path(PGBOUNCER).exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running(*, server_host: str = "127.0.0.1", server_port: int = 5432,
            pool_size: int = 10, max_clients: int = 1000) -> Iterator[int]:
    """Start PgBouncer in transaction mode in front of ``server_host:server_port``; yield
    the port it listens on (loopback). Every database is passed through by name."""
    port = _free_port()
    root = Path(tempfile.mkdtemp(prefix="spotrun-pgbouncer-"))
    (root / "userlist.txt").write_text('"postgres" ""\n')
    (root / "pgbouncer.ini").write_text(f"""\
[databases]
* = host={server_host} port={server_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
admin_users = postgres
auth_file = {root / 'userlist.txt'}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = {max_clients}
max_db_connections = {pool_size * 4}
logfile = {root / 'pgbouncer.log'}
pidfile = {root / 'pgbouncer.pid'}
server_reset_query =
ignore_startup_parameters = extra_float_digits
""")
    argv = [PGBOUNCER, str(root / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        user = "postgres"
        os.chown(root, pwd.getpwnam(user).pw_uid, -1)
        for f in root.iterdir():
            os.chown(f, pwd.getpwnam(user).pw_uid, -1)
        argv[1:1] = ["-u", user]
    # PgBouncer in the foreground writes every log line to stderr as well as to its log
    # file: a pipe nobody reads fills after some hundred connections and then blocks it in
    # write(2), with clients queued unaccepted. stderr goes to a file instead.
    stderr = (root / "stderr.log").open("wb")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port),
                                                                          timeout=0.5):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (root / "pgbouncer.log")
                raise RuntimeError("PgBouncer did not start: " + (
                    log if log.exists() else root / "stderr.log").read_text()[-2000:])
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        stderr.close()
        shutil.rmtree(root, ignore_errors=True)


def drop_clients(port: int, dbname: str) -> None:
    """Drop every client's (and server) connection to ``dbname`` at the PgBouncer on
    ``port``, as a pooler's restart would; new ones are let in again at once."""
    import psycopg

    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/pgbouncer",
                         autocommit=True, cursor_factory=psycopg.ClientCursor) as admin:
        admin.execute(f"KILL {dbname}")
        admin.execute(f"RESUME {dbname}")
