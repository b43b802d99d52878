"""Real processes for drills, tests and benchmarks: a private PostgreSQL, ``spotrun
worker`` processes that die with their parent, free ports, waiting for a condition."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class ChaosError(Exception):
    """A drill, or a process it needs, cannot run as asked; the message is one line for
    the user."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (another process may take it
    before it is bound: bind it at once, or retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def children_of(pid: int) -> list[int]:
    """The ids of the processes whose parent is ``pid`` (read from ``/proc``)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # it ended meanwhile
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def wait_for(cond: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.05) -> Any:
    """Poll ``cond`` until it is truthy and return its value; TimeoutError naming ``what``
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def find_postgres_bin() -> Path | None:
    """The directory of the newest PostgreSQL server binaries (initdb, pg_ctl), if any."""
    def version(d: str) -> int:
        name = Path(d).parent.name
        return int(name) if name.isdigit() else 0

    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if os.access(Path(d) / "initdb", os.X_OK) and os.access(Path(d) / "pg_ctl", os.X_OK):
            return Path(d)
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).parent == Path(pg_ctl).parent:
        return Path(initdb).parent
    return None


class PrivatePostgres:
    """A throw-away PostgreSQL in a temporary directory, on a free port, for one drill.

    initdb refuses to run as root, so as root every server command runs as the ``postgres``
    user through ``runuser``, in a directory that user owns.
    """

    def __init__(self, bindir: Path, run_as: list[str], owner: tuple[int, int] | None) -> None:
        self.bindir = bindir
        self.run_as = run_as
        self.owner = owner
        self.dir: Path | None = None
        self.port = 0
        self.running = False

    @classmethod
    def locate(cls) -> PrivatePostgres:
        bindir = find_postgres_bin()
        if bindir is None:
            raise ChaosError("--db-restart runs a private PostgreSQL, but its server programs "
                             "(initdb, pg_ctl) are not under /usr/lib/postgresql/*/bin nor on "
                             "PATH; install the PostgreSQL server package")
        if os.geteuid() != 0:
            return cls(bindir, [], None)
        runuser = shutil.which("runuser")
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pw = None
        if runuser is None or pw is None:
            raise ChaosError("--db-restart as root runs PostgreSQL as the 'postgres' user "
                             "(initdb refuses root), but "
                             + ("runuser is missing" if runuser is None
                                else "there is no 'postgres' user"))
        return cls(bindir, [runuser, "-u", "postgres", "--"], (pw.pw_uid, pw.pw_gid))

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        assert self.dir is not None
        # Its own session: a Ctrl-C on the terminal must not reach the server, whose
        # shutdown is the drill's to make.
        return subprocess.run([*self.run_as, *args], cwd=self.dir, capture_output=True,
                              text=True, timeout=timeout, start_new_session=True,
                              stdin=subprocess.DEVNULL)

    def create(self) -> str:
        """initdb and start; return the database URL."""
        self.dir = Path(tempfile.mkdtemp(prefix="spotrun-chaos-pg-"))
        if self.owner is not None:
            os.chown(self.dir, *self.owner)
        data = str(self.dir / "data")
        out = self._run(str(self.bindir / "initdb"), "-D", data, "-U", "postgres",
                        "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")
        if out.returncode != 0:
            raise ChaosError("initdb of the private PostgreSQL failed: "
                             + last_line(out.stderr or out.stdout))
        for _ in range(3):  # a port found free can be taken before the server binds it
            self.port = free_port()
            if self.start():
                return self.url
        raise ChaosError(f"the private PostgreSQL did not start: {self.log_tail()}")

    def start(self) -> bool:
        assert self.dir is not None
        # fsync off: the drill restarts the server cleanly (a fast shutdown writes a
        # checkpoint) and the machine does not crash, so durability on disk adds only time.
        opts = (f"-p {self.port} -k {shlex.quote(str(self.dir))} "
                "-c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300")
        out = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.dir / "data"),
                        "-l", str(self.dir / "server.log"), "-o", opts, "-w", "-t", "60",
                        "start")
        self.running = out.returncode == 0
        return self.running

    def stop(self, mode: str = "fast") -> bool:
        if self.dir is None:
            return True
        out = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.dir / "data"),
                        "-m", mode, "-w", "-t", "60", "stop")
        if out.returncode == 0:
            self.running = False
        return out.returncode == 0

    def log_tail(self) -> str:
        if self.dir is None:
            return ""
        try:
            lines = (self.dir / "server.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no server log"
        return lines[-1] if lines else "empty server log"

    def destroy(self) -> None:
        if self.dir is None:
            return
        if self.running:
            with contextlib.suppress(Exception):
                self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None


def last_line(text: str) -> str:
    """The last non-blank line of a program's output, for a one-line error."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


class WorkerProc:
    """One real ``spotrun worker`` process (``cmd``, named by slot and generation, its
    log in ``log_dir``) and what a drill did to it."""

    def __init__(self, slot: int, generation: int, cmd: list[str], env: dict[str, str],
                 log_dir: Path) -> None:
        self.slot = slot
        self.name = f"c{slot + 1}-{generation}"
        self.log_path = log_dir / f"worker-{self.name}.log"
        self.started = time.monotonic()
        self.exited_at: float | None = None
        self.exited_wall: float | None = None
        self.exit_code: int | None = None
        self.term_sent: float | None = None  # SIGTERM of a chaos kill (for notice-to-exit)
        self.killed = False  # SIGKILLed by the drill
        self.frozen_until: float | None = None
        self.thaw_timer: threading.Timer | None = None
        self.teardown = False  # stopped at the end of the drill, not by chaos
        self.ever_ready = False
        with open(self.log_path, "wb") as log:
            # Its own session: the operator's Ctrl-C is for the drill, which stops its
            # workers itself. ``setpriv --pdeathsig`` ends the worker should the drill
            # itself be SIGKILLed, so no worker outlives it.
            self.proc = subprocess.Popen([*pdeathsig_prefix(), *cmd, "--name", self.name],
                                         env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        # A thread waits on the process, so that exit times are exact, not a poll's tick.
        self._waiter = threading.Thread(target=self._wait, name=f"wait-{self.name}",
                                        daemon=True)
        self._waiter.start()

    def _wait(self) -> None:
        code = self.proc.wait()
        self.exited_wall = time.time()
        self.exited_at = time.monotonic()
        self.exit_code = code

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.exited_at is None

    @property
    def ready(self) -> bool:
        if not self.ever_ready and self.alive:
            with contextlib.suppress(OSError):
                self.ever_ready = " ready: " in self.log_path.read_text(errors="replace")
        return self.ever_ready and self.alive

    @property
    def targeted(self) -> bool:
        """Already being stopped, killed or frozen: not a victim for another kill."""
        return self.term_sent is not None or self.killed or self.frozen_until is not None

    def signal(self, sig: int) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def join(self, timeout: float) -> bool:
        self._waiter.join(timeout)
        return not self._waiter.is_alive()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


_PDEATHSIG: list[str] | None = None


def pdeathsig_prefix() -> list[str]:
    """A command prefix that ends the child when its parent dies (``setpriv --pdeathsig``),
    or nothing where setpriv cannot do it."""
    global _PDEATHSIG
    if _PDEATHSIG is None:
        setpriv = shutil.which("setpriv")
        ok = False
        if setpriv:
            with contextlib.suppress(Exception):
                ok = subprocess.run([setpriv, "--pdeathsig", "KILL", "true"],
                                    capture_output=True, timeout=10).returncode == 0
        _PDEATHSIG = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv and ok else []
    return _PDEATHSIG

