"""``spotrun server`` and ``spotrun up``: the API and dashboard under uvicorn, and the
local workers that ``up`` starts beside them.

Both run uvicorn on a thread and keep the main thread for signals: a SIGINT or SIGTERM
handler only records the signal (nothing else runs in a signal handler); the main loop
then stops the workers (``up``: SIGINT, so each hands its job back), ends the live
streams, stops the server and returns 0.

On the embedded default (SQLite) each start creates a fresh admin token, prints it with a
dashboard URL that signs in with it, and revokes it on the way out.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, Literal

import uvicorn

from spotrun.config import ConfigError, Settings
from spotrun.http.app import API_THREADS, create_app
from spotrun.intake import pubsub
from spotrun.logconfig import setup_logging
from spotrun.service import callback_urls
from spotrun.store import JobStore

Echo = Callable[..., Any]
_PR_SET_PDEATHSIG = 1


def trusted_proxies() -> list[str]:
    """The proxies whose forwarded headers are believed (SPOTRUN_TRUSTED_PROXIES)."""
    raw = os.environ.get("SPOTRUN_TRUSTED_PROXIES", "")
    found = [p.strip() for p in raw.split(",") if p.strip()]
    for p in found:
        try:
            ipaddress.ip_network(p, strict=False)
        except ValueError:
            raise ConfigError(f"SPOTRUN_TRUSTED_PROXIES: {p!r} is not an IP address or "
                              "network") from None
    return found


class ServerThread:
    """uvicorn serving ``app`` on an already bound socket, on a thread of its own."""

    def __init__(self, app: Any, host: str, port: int, *, access_log: bool = True,
                 sock: socket.socket | None = None) -> None:
        self.app = app
        self.sock = sock if sock is not None else _bind(host, port)
        self.port = int(self.sock.getsockname()[1])
        # X-Forwarded-For/-Proto are believed only from the proxies the operator names
        # (SPOTRUN_TRUSTED_PROXIES, addresses or networks): behind a TLS-terminating
        # ingress that makes the scheme https (Secure cookies); anyone else's headers are
        # ignored, uvicorn's default of trusting 127.0.0.1 included.
        config = uvicorn.Config(app, log_level="info", access_log=access_log,
                                timeout_graceful_shutdown=5, lifespan="on",
                                proxy_headers=True, forwarded_allow_ips=trusted_proxies())
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="spotrun-http", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        """Start serving; raise RuntimeError if the server did not come up."""
        self.thread.start()
        give_up = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > give_up:
                raise RuntimeError("the HTTP server did not start (see the log above)")
            time.sleep(0.02)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float = 15.0) -> None:
        """End the live streams, then stop serving and wait for the thread."""
        ctx = getattr(self.app.state, "ctx", None)
        if ctx is not None:
            ctx.feed.stop_threadsafe()
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(5)
        with contextlib.suppress(OSError):
            self.sock.close()


def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, socktype, proto, _name, addr = infos[0]
    sock = socket.socket(family, socktype, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


def base_url(host: str, port: int) -> str:
    """The URL to print for a listening address (a wildcard address prints as loopback)."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


class _Signals:
    """Records SIGINT/SIGTERM while installed; the handler does nothing else."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Signals]:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._record)
        try:
            yield self
        finally:
            for signum, old in self._old.items():
                signal.signal(signum, old)


def _embedded(settings: Settings) -> bool:
    return settings.database_url.startswith("sqlite")


# The printed admin token expires this long after its last renewal, so that a crash (which
# skips the revoke on the way out) leaves no token that works for ever; a running
# server renews it every SESSION_TOKEN_RENEW_SECONDS.
SESSION_TOKEN_SECONDS = 3600.0
SESSION_TOKEN_RENEW_SECONDS = 300.0


def _session_token(store: JobStore, command: str) -> tuple[str, str]:
    name = f"{command}-{dt.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
    return name, store.tokens.create(name, admin=True, expires_in=SESSION_TOKEN_SECONDS)


def _print_urls(echo: Echo, url: str, token: str | None) -> None:
    echo(f"spotrun: API and dashboard at {url}  (API docs: {url}/docs)")
    if token is not None:
        echo(f"  dashboard, signed in as admin: {url}/login#token={token}")
        echo(f"  admin token for the API (valid while this runs, revoked on exit): {token}")
    else:
        echo("  sign in with a token from `spotrun token create NAME [--admin]`")


# Set for the server processes beyond the first: the listening socket they inherit.
_LISTEN_FD_ENV = "SPOTRUN_SERVER_LISTEN_FD"


def serve(settings: Settings, *, host: str, port: int, echo: Echo, processes: int = 1) -> int:
    """Serve the API and the dashboard until SIGINT/SIGTERM; return the exit status.

    With ``processes`` above 1 that many processes serve one listening socket (the
    kernel hands each connection to one of them): Python serves a request on one core at
    a time, so this is how a server uses more. The first process starts the others,
    passes its signal on to them and waits for them.
    """
    fd = os.environ.pop(_LISTEN_FD_ENV, None)
    if fd is not None:
        return _serve_inherited(settings, int(fd))
    return _run(settings, host=host, port=port, echo=echo, workers=0, command="server",
                processes=processes)


def _serve_inherited(settings: Settings, fd: int) -> int:
    """One more process of ``spotrun server --processes N``, on its parent's socket."""
    setup_logging()
    _die_with_parent()
    store = JobStore.open(settings.database_url, pool_size=API_THREADS, pre_ping=False)
    try:
        sock = socket.socket(fileno=fd)
        srv = ServerThread(create_app(settings, store=store), "", 0, sock=sock)
        with _Signals().installed() as signals:
            srv.start()
            while signals.received is None and srv.alive:
                time.sleep(0.1)
            srv.stop()
        return 0 if signals.received is not None else 1
    finally:
        store.close()


def _start_server_process(settings: Settings, sock: socket.socket) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SPOTRUN_HOME": str(settings.home),
           "SPOTRUN_DATABASE_URL": settings.database_url,
           "SPOTRUN_CHECKPOINT_URL": settings.checkpoint_url,
           _LISTEN_FD_ENV: str(sock.fileno())}
    return subprocess.Popen([sys.executable, "-m", "spotrun", "server"], env=env,
                            pass_fds=[sock.fileno()], start_new_session=True,
                            preexec_fn=_die_with_parent)


def _stop_servers(procs: list[subprocess.Popen[bytes]], timeout: float, echo: Echo) -> bool:
    """SIGTERM the other server processes, wait for them; SIGKILL stragglers. True if
    all exited 0."""
    return _stop_children([(f"server process {p.pid}", p) for p in procs], signal.SIGTERM,
                          timeout, echo, need_zero=True)


def up(settings: Settings, *, workers: int, host: str, port: int, echo: Echo) -> int:
    """The API, the dashboard and ``workers`` local workers; Ctrl-C stops them all."""
    return _run(settings, host=host, port=port, echo=echo, workers=workers, command="up")


def _run(settings: Settings, *, host: str, port: int, echo: Echo, workers: int,
         command: str, processes: int = 1) -> int:
    setup_logging()
    store = JobStore.open(settings.database_url, pool_size=API_THREADS, pre_ping=False)
    token_name: str | None = None
    token: str | None = None
    if command == "up" or _embedded(settings):
        token_name, token = _session_token(store, command)
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    servers: list[subprocess.Popen[bytes]] = []
    code = 0
    try:
        app = create_app(settings, store=store)
        try:
            srv = ServerThread(app, host, port, access_log=command == "server")
        except OSError as exc:
            echo(f"spotrun: cannot listen on {host}:{port}: {exc.strerror or exc}", err=True)
            return 1
        with _Signals().installed() as signals:
            # Workers start from the main thread, before the server's threads exist, so
            # that the parent-death signal they ask for is tied to this (long-lived) thread.
            procs = [(f"w{i}", _start_worker(settings, f"w{i}")) for i in range(1, workers + 1)]
            try:
                srv.start()
            except RuntimeError as exc:
                echo(f"spotrun: {exc}", err=True)
                _stop_workers(procs, settings.grace_seconds + 5.0, echo)
                srv.stop()
                return 1
            servers = [_start_server_process(settings, srv.sock)
                       for _ in range(processes - 1)]
            url = base_url(host, srv.port)
            _print_urls(echo, url, token)
            if servers:
                echo(f"  serving in {processes} processes")
            intake = _start_intake(store, echo)
            if intake is False:
                _stop_workers(procs, settings.grace_seconds + 5.0, echo)
                srv.stop()
                return 2
            if procs:
                echo(f"  workers: {', '.join(n for n, _ in procs)} "
                     "(Ctrl-C stops everything; running jobs are handed back)")
            reported: set[str] = set()
            renew_at = time.monotonic() + SESSION_TOKEN_RENEW_SECONDS
            while signals.received is None and srv.alive:
                if token_name is not None and time.monotonic() >= renew_at:
                    renew_at = time.monotonic() + SESSION_TOKEN_RENEW_SECONDS
                    try:
                        store.tokens.extend(token_name, SESSION_TOKEN_SECONDS)
                    except Exception as exc:  # the database may be away for a while
                        echo(f"spotrun: could not renew the session token: "
                             f"{str(exc).splitlines()[0][:200]}", err=True)
                for name, proc in procs:
                    if proc.poll() is not None and name not in reported:
                        reported.add(name)
                        echo(f"spotrun: worker {name} exited with status {proc.returncode}",
                             err=True)
                for server in servers:
                    if server.poll() is not None and str(server.pid) not in reported:
                        reported.add(str(server.pid))
                        echo(f"spotrun: server process {server.pid} exited with status "
                             f"{server.returncode}", err=True)
                if intake is not None:
                    intake.watch()
                time.sleep(0.1)
            if signals.received is None:
                echo("spotrun: the HTTP server stopped unexpectedly", err=True)
                code = 1
            else:
                echo(f"spotrun: {signal.Signals(signals.received).name} received: stopping"
                     + (" (workers hand their jobs back first)" if procs else ""))
            # The intake first: what it has in hand still reaches the store.
            if intake is not None and not intake.stop(max(1.0, settings.grace_seconds - 1.0)):
                code = 1
            if not _stop_workers(procs, settings.grace_seconds + 5.0, echo):
                code = 1
            if not _stop_servers(servers, 20.0, echo):
                code = 1
            srv.stop()
    finally:
        for server in servers:
            if server.poll() is None:
                server.kill()
                server.wait(5)
        for _name, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        if token_name is not None:
            with contextlib.suppress(Exception):  # the database may be gone by now
                store.tokens.revoke(token_name)
        store.close()
    if code == 0:
        echo("spotrun: stopped")
    return code


def _start_intake(store: JobStore, echo: Echo
                  ) -> pubsub.PubSubIntake | Literal[False] | None:
    """The Pub/Sub intake configured by SPOTRUN_PUBSUB_* (None if none; False if it
    cannot start, said in one line)."""
    try:
        config = pubsub.PubSubConfig.from_env()
        if config is None:
            return None
        intake = pubsub.PubSubIntake(store, config,
                                     allow_private_callbacks=callback_urls.allow_private_from_env())
        intake.start()
    except pubsub.IntakeError as exc:
        echo(f"spotrun: {exc}", err=True)
        return False
    echo(f"  intake: taking jobs from {config.subscription_path}"
         + (f", events to {config.events_topic_path}" if config.events_topic_path else ""))
    return intake


def _start_worker(settings: Settings, name: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SPOTRUN_HOME": str(settings.home),
           "SPOTRUN_DATABASE_URL": settings.database_url,
           "SPOTRUN_CHECKPOINT_URL": settings.checkpoint_url}
    # A session of its own: Ctrl-C at the terminal reaches only `up`, which then sends each
    # worker exactly one SIGINT (a second signal would make a worker exit at once).
    return subprocess.Popen([sys.executable, "-m", "spotrun", "worker", "--name", name],
                            env=env, start_new_session=True, preexec_fn=_die_with_parent)


def _die_with_parent() -> None:
    # If `up` is killed outright, its workers get SIGTERM (a preemption notice) and hand
    # their jobs back instead of running on unsupervised.
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _stop_workers(procs: list[tuple[str, subprocess.Popen[bytes]]], timeout: float,
                  echo: Echo) -> bool:
    """SIGINT each live worker, wait for them; SIGKILL stragglers. True if none had to be
    killed."""
    return _stop_children([(f"worker {n}", p) for n, p in procs], signal.SIGINT, timeout,
                          echo, need_zero=False)


def _stop_children(procs: list[tuple[str, subprocess.Popen[bytes]]], sig: int,
                   timeout: float, echo: Echo, *, need_zero: bool) -> bool:
    """Send ``sig`` to each live child, wait for them; SIGKILL stragglers. True if none had
    to be killed (and, with ``need_zero``, each exited 0)."""
    clean = True
    for _what, proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
    give_up = time.monotonic() + timeout
    for what, proc in procs:
        try:
            code = proc.wait(max(0.1, give_up - time.monotonic()))
            clean = clean and (code == 0 or not need_zero)
        except subprocess.TimeoutExpired:
            echo(f"spotrun: {what} did not stop in {timeout:g} s: killing it", err=True)
            proc.kill()
            proc.wait(5)
            clean = False
    return clean
