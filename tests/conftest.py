"""Shared fixtures: a fresh database per test on SQLite and on the real PostgreSQL (also
through a real PgBouncer in transaction mode, for the modules that ask), and helpers that
start real ``spotrun`` processes and send them real signals."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgbouncer
from spotrun.chaos.processes import wait_for
from spotrun.store import JobStore

PG_URL = os.environ.get("SPOTRUN_TEST_DATABASE_URL",
                        "postgresql://postgres@127.0.0.1:5432/test")
# One template per test session, so that sessions sharing a server never clash.
TEMPLATE_DB = f"spotrun_tpl_{uuid.uuid4().hex[:10]}"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _pg_admin() -> psycopg.Connection[Any]:
    return psycopg.connect(PG_URL.replace("postgresql+psycopg://", "postgresql://"),
                           autocommit=True, connect_timeout=3)


def _pg_url_for(dbname: str) -> str:
    base = PG_URL.replace("postgresql+psycopg://", "postgresql://").rsplit("/", 1)[0]
    return f"{base}/{dbname}"


_pg_state: dict[str, Any] = {}


def _pg_available() -> bool:
    if "ok" not in _pg_state:
        try:
            with _pg_admin() as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB}")
                conn.execute(f"CREATE DATABASE {TEMPLATE_DB}")
            # Build the schema once in a template; each test clones it.
            JobStore.open(_pg_url_for(TEMPLATE_DB)).close()
            _pg_state["ok"] = True
        except psycopg.OperationalError as exc:
            _pg_state["ok"] = False
            _pg_state["why"] = str(exc).splitlines()[0]
    return bool(_pg_state["ok"])


@contextlib.contextmanager
def fresh_pg_database() -> Iterator[str]:
    if not _pg_available():
        msg = f"PostgreSQL unavailable at {PG_URL}: {_pg_state.get('why')}"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    name = f"spotrun_t_{uuid.uuid4().hex[:12]}"
    with _pg_admin() as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")
    try:
        yield _pg_url_for(name)
    finally:
        with _pg_admin() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session", autouse=True)
def _drop_template() -> Iterator[None]:
    yield
    if _pg_state.get("ok"):
        with _pg_admin() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB} WITH (FORCE)")


@pytest.fixture(scope="session")
def pgbouncer_port() -> Iterator[int]:
    """A real PgBouncer in transaction mode in front of the test PostgreSQL."""
    if not pgbouncer.available():
        msg = f"PgBouncer is not installed ({pgbouncer.PGBOUNCER}): apt-get install pgbouncer"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    host_port = PG_URL.rsplit("@", 1)[-1].split("/", 1)[0]
    host, _, port = host_port.partition(":")
    with pgbouncer.running(server_host=host or "127.0.0.1",
                           server_port=int(port or 5432)) as listen_port:
        yield listen_port


def through_pgbouncer(url: str, port: int) -> str:
    """``url`` (on the test server) through PgBouncer at ``port``, marked as pooled."""
    base, dbname = url.rsplit("/", 1)
    user = base.split("://", 1)[1].split("@", 1)[0]
    return f"postgresql://{user}@127.0.0.1:{port}/{dbname}?spotrun_pooler=transaction"


# The modules that take longest (measured serially: the image build alone is minutes).
LONGEST_FIRST = ("test_image", "test_worker", "test_db_faults", "test_pubsub", "test_chaos",
                 "test_stop_paths", "test_api_schema", "test_minilm", "test_cli",
                 "test_store", "test_example_plain_loop")


# Modules whose tests on db_url run through PgBouncer too (set PGBOUNCER = True in them).
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, drop = [], []
    for item in items:
        spec = getattr(item, "callspec", None)
        through = spec is not None and spec.params.get("db_url") == "pgbouncer"
        opted = getattr(getattr(item, "module", None), "PGBOUNCER", False)
        (drop if through and not opted else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # pytest-xdist (``--dist loadfile``) hands out the modules in this order: the
        # longest first, the image's build above all, so that the run does not end on one.
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(getattr(getattr(item, "module", None),
                                                     "__name__", ""), len(rank)))


@pytest.fixture(params=["sqlite", "postgresql", "pgbouncer"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database: SQLite in a temp dir, or a clone on PostgreSQL, reached
    directly or through PgBouncer in transaction mode."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'spotrun.db'}"
        JobStore.open(url).close()
        yield url
    elif request.param == "pgbouncer":
        port = request.getfixturevalue("pgbouncer_port")
        with fresh_pg_database() as url:
            yield through_pgbouncer(url, port)
    else:
        with fresh_pg_database() as url:
            yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'spotrun.db'}"
    JobStore.open(url).close()
    return url


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_pg_database() as url:
        yield url


@pytest.fixture
def store(db_url: str) -> Iterator[JobStore]:
    s = JobStore.open(db_url)
    try:
        yield s
    finally:
        s.close()


# ------------------------------------------------------------- real processes


class Env:
    """The environment real spotrun processes of one test share."""

    def __init__(self, home: Path, db_url: str, **extra: str) -> None:
        self.home = home
        self.db_url = db_url
        self.vars = {
            **os.environ,
            "SPOTRUN_HOME": str(home),
            "SPOTRUN_DATABASE_URL": db_url,
            "SPOTRUN_CHECKPOINT_URL": str(home / "checkpoints"),
            "SPOTRUN_PREEMPTION_SOURCES": "signal",
            # Progress reaches the store with each heartbeat: tests that watch a job move
            # (and stop it at a step) see it every 0.5 s, not every 2.5 s (the default;
            # tests/test_worker_load.py runs its workers at the defaults).
            "SPOTRUN_HEARTBEAT_SECONDS": "0.5",
            # And an idle worker beats (so may take over the fleet's sweeping, after a
            # sweeper that died) every 2 s, not every 20 s.
            "SPOTRUN_IDLE_HEARTBEAT_SECONDS": "2",
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
        self.procs: list[WorkerProc] = []

    def cli(self, *args: str, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``spotrun ARGS`` as a user would."""
        proc = subprocess.run([sys.executable, "-m", "spotrun", *args], env=self.vars,
                              capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"spotrun {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
        return proc

    def worker(self, name: str, *args: str, preload: bool = False, **env: str) -> WorkerProc:
        w = WorkerProc(self, name, args, preload=preload, extra_env=env)
        self.procs.append(w)
        return w

    def store(self) -> JobStore:
        return JobStore.open(self.db_url)

    def stop_all(self) -> None:
        for w in self.procs:
            w.kill()


class WorkerProc:
    """A real ``spotrun worker`` process, its log in a file."""

    def __init__(self, env: Env, name: str, args: tuple[str, ...], *, preload: bool,
                 extra_env: dict[str, str]) -> None:
        self.env = env
        self.name = name
        self.log_path = env.home / f"worker-{name}-{uuid.uuid4().hex[:6]}.log"
        cmd = [sys.executable, "-m", "spotrun", "worker", "--name", name,
               "--preload" if preload else "--no-preload", *args]
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in kill()/wait()
        self.proc = subprocess.Popen(cmd, env={**env.vars, **extra_env}, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 60) -> None:
        wait_until(lambda: "ready" in self.log(), timeout, f"worker {self.name} ready",
                   on_fail=self.log)

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def env_factory(tmp_path: Path) -> Iterator[Callable[..., Env]]:
    made: list[Env] = []

    def make(db_url: str, **extra: str) -> Env:
        home = tmp_path / f"home{len(made)}"
        home.mkdir()
        e = Env(home, db_url, **extra)
        made.append(e)
        return e

    yield make
    for e in made:
        e.stop_all()


@pytest.fixture
def env(env_factory: Callable[..., Env], db_url: str) -> Env:
    """Real processes on the parametrised database (SQLite and PostgreSQL)."""
    return env_factory(db_url)


def wait_until(cond: Callable[[], Any], timeout: float = 30, what: str = "condition",
               on_fail: Callable[[], str] | None = None, interval: float = 0.05) -> Any:
    """Poll ``cond`` until it is truthy; fail the test with ``what`` after ``timeout`` s."""
    try:
        return wait_for(cond, timeout, what, interval)
    except TimeoutError as exc:
        extra = f"\n{on_fail()}" if on_fail else ""
        pytest.fail(f"{exc}{extra}")
