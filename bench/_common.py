"""Shared helpers of the benchmark scripts: the machine, versions, load, child processes,
PostgreSQL databases, percentiles, Markdown tables and JSON results.

Benchmark-only: nothing in src/ imports this.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from spotrun.chaos.processes import wait_for

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
PG_ADMIN = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_BASE = PG_ADMIN.rsplit("/", 1)[0]
REDIS_URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379")


# ---------------------------------------------------------------- machine, load

def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 1024 / 1024
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem_gib, 1),
            "kernel": platform.release(), "python": platform.python_version()}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_state() -> str:
    """The commit the tree is at, and whether src/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "../src"], cwd=BENCH,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + (" + uncommitted changes in src/" if dirty else "")
    except Exception:
        return "?"


def versions(extra: Iterable[str] = ()) -> dict[str, Any]:
    import sqlite3

    out: dict[str, Any] = {"spotrun git": git_state(), "python": platform.python_version(),
                           "sqlite": sqlite3.sqlite_version}
    for dist in ("spotrun", "SQLAlchemy", "psycopg", "torch", "celery", "kombu", "redis",
                 "procrastinate", *extra):
        out[dist] = _version(dist)
    with contextlib.suppress(Exception):
        import psycopg

        with psycopg.connect(PG_ADMIN, connect_timeout=3) as conn:
            out["postgresql"] = conn.execute("SHOW server_version").fetchone()[0]
    with contextlib.suppress(Exception):
        import redis

        out["redis-server"] = redis.Redis.from_url(REDIS_URL).info("server")["redis_version"]
    return out


class Run:
    """What a benchmark run records about itself: start/end time, load, machine."""

    def __init__(self, name: str, args: Any) -> None:
        self.name = name
        self.args = vars(args) if args is not None else {}
        self.started = dt.datetime.now(dt.UTC)
        self.load_start = loadavg()
        self.results: dict[str, Any] = {}

    def header(self) -> str:
        m = machine()
        return (f"{self.name}: {self.started:%Y-%m-%d %H:%M} UTC on {m['cpu']}, "
                f"{m['cores']} cores, {m['ram_gib']} GiB; load avg at start "
                f"{self.load_start}")

    def finish(self, markdown: str, extra_versions: Iterable[str] = ()) -> Path:
        end = dt.datetime.now(dt.UTC)
        load_end = loadavg()
        doc = {
            "benchmark": self.name,
            "date": self.started.isoformat(timespec="seconds"),
            "seconds": round((end - self.started).total_seconds(), 1),
            "machine": machine(),
            "versions": versions(extra_versions),
            "load_avg_start": self.load_start,
            "load_avg_end": load_end,
            "args": self.args,
            "results": self.results,
            "markdown": markdown,
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{self.name}-{self.started:%Y%m%dT%H%M%S}.json"
        path.write_text(json.dumps(doc, indent=2, default=str))
        print()
        print(markdown)
        print()
        v = doc["versions"]
        print("versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val))
        print(f"load avg: start {self.load_start}, end {load_end}; "
              f"run took {doc['seconds']} s")
        print(f"results: {path}")
        return path


# ----------------------------------------------------------------- statistics

def pct(values: Sequence[float], p: float) -> float:
    """Percentile by linear interpolation (p in 0..100); nan for no values."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def fmt(x: Any) -> str:
        if isinstance(x, float):
            if x != x:
                return "n/a"
            return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}" if abs(x) < 1 else f"{x:.1f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(x) for x in r) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------ child processes

class Children:
    """Child processes, each in its own process group, all killed on exit or Ctrl-C.

    Only process groups this object created are signalled.
    """

    _all: list[Children] = []

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        Children._all.append(self)

    def start(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
              log: Path | None = None, cwd: str | Path | None = None
              ) -> subprocess.Popen[bytes]:
        out: Any = subprocess.DEVNULL
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            out = open(log, "ab")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(list(argv), env={**os.environ, **(env or {})}, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)
        if log is not None:
            out.close()
        self.procs.append(p)
        return p

    @staticmethod
    def signal_group(p: subprocess.Popen[bytes], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, sig)

    def stop(self, p: subprocess.Popen[bytes], *, timeout: float = 10.0) -> None:
        if p.poll() is None:
            self.signal_group(p, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout)
        self.signal_group(p, signal.SIGKILL)  # leftovers of the group (pool children)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(5)

    def kill_all(self) -> None:
        for p in self.procs:
            self.signal_group(p, signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.wait(5)
        self.procs.clear()

    def stop_all(self, timeout: float = 10.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                self.signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
        self.kill_all()

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill_all()

    @classmethod
    def kill_everything(cls) -> None:
        for c in cls._all:
            c.kill_all()


def _on_term(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def install_cleanup() -> None:
    """Kill every child group on exit, Ctrl-C or SIGTERM of the benchmark itself."""
    atexit.register(Children.kill_everything)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)


def spotrun_argv(url: str) -> list[str]:
    return [sys.executable, "-m", "spotrun", "--database-url", url]


wait_until = wait_for  # TimeoutError naming what it waited for


# ---------------------------------------------------------------- PostgreSQL

def fresh_pg_database(name: str) -> str:
    """Drop and create a database; return its URL."""
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{PG_BASE}/{name}"


def drop_pg_database(name: str) -> None:
    import psycopg

    with contextlib.suppress(Exception), psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True
    except Exception:
        return False


# ------------------------------------------------------------ spotrun helpers

def bulk_submit(store: Any, n: int, pipeline: str, params: dict[str, Any]) -> float:
    """Queue ``n`` jobs in ONE transaction (``JobStore.submit_many``: the jobs, their
    'submitted' events and the idle workers' wake-ups), so that idle workers see them all
    at once. Returns the wall-clock time the commit returned."""
    from spotrun.store import NewJob

    store.submit_many([NewJob(pipeline, params) for _ in range(n)])
    return time.time()


def spotrun_ready_workers(store: Any, n: int) -> bool:
    return sum(1 for w in store.list_workers(include_stopped=False) if w.state == "idle") >= n
