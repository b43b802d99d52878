"""The command line: a thin layer over the store, the worker and the tools.

Its output is a contract that scripts rely on: ``submit`` prints the job id alone, ``--json``
prints the job's JSON shape, failures are one line on stderr and a non-zero exit.
Commands that run no pipeline import no ML library, so they start fast.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from spotrun.config import ConfigError, Settings, check_pool
from spotrun.jobs import Job, JobState, OnPreempt

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Run machine-learning jobs on preemptible / spot workers without losing work.",
)
token_app = typer.Typer(no_args_is_help=True, help="Manage API tokens.")
app.add_typer(token_app, name="token")

F = TypeVar("F", bound=Callable[..., Any])

EXIT_BAD_INPUT = 2
EXIT_TIMEOUT = 3


class _State:
    home: str | None = None
    database_url: str | None = None


_state = _State()


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    typer.echo(f"spotrun: {message}", err=True)
    raise typer.Exit(code)


def friendly(fn: F) -> F:
    """Turn the errors a user can cause into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from spotrun.checkpoints import CheckpointConfigError
        from spotrun.pipelines.base import SubmitRefused
        from spotrun.pipelines.registry import UnknownPipeline
        from spotrun.store import DatabaseUnavailable, StoreError

        try:
            return fn(*args, **kwargs)
        except DatabaseUnavailable as exc:
            fail(str(exc), 1)
        except (StoreError, ConfigError, UnknownPipeline, SubmitRefused,
                CheckpointConfigError) as exc:
            fail(str(exc.args[0]) if exc.args else str(exc))
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper  # type: ignore[return-value]


def settings() -> Settings:
    return Settings.from_env(home=_state.home, database_url=_state.database_url)


@contextlib.contextmanager
def open_store(s: Settings | None = None) -> Iterator[Any]:
    from spotrun.store import JobStore

    s = s or settings()
    store = JobStore.open(s.database_url)
    try:
        yield store
    finally:
        store.close()


@app.callback()
def main_options(
    home: Annotated[str | None, typer.Option(
        "--home", help="Directory of the embedded database and checkpoints "
        "[env SPOTRUN_HOME, default ./.spotrun]")] = None,
    database_url: Annotated[str | None, typer.Option(
        "--database-url", help="sqlite:///PATH or postgresql://... [env SPOTRUN_DATABASE_URL]",
    )] = None,
) -> None:
    _state.home = home
    _state.database_url = database_url


def _echo_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=False))


def parse_param(item: str) -> tuple[str, Any]:
    """``key=value``: JSON for lists and objects, else the text (the schema coerces it)."""
    if "=" not in item:
        fail(f"bad param {item!r}: expected key=value")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key:
        fail(f"bad param {item!r}: the key is empty")
    if value[:1] in "[{":
        try:
            return key, json.loads(value)
        except ValueError:
            fail(f"bad param {key!r}: {value!r} is not valid JSON")
    if value in ("null", "none"):
        return key, None
    return key, value


# ---------------------------------------------------------------------- submit


@app.command()
@friendly
def submit(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name (see `spotrun pipelines`)")],
    param: Annotated[list[str] | None, typer.Option("-p", "--param",
                                                    help="key=value, repeatable")] = None,
    priority: Annotated[int, typer.Option(min=-1000, max=1000, help="Higher runs first")] = 0,
    max_retries: Annotated[int, typer.Option(
        min=0, max=1000, help="Times a lost worker may send the job back to the queue")] = 4,
    timeout: Annotated[float | None, typer.Option(
        min=0.001, help="Time limit in seconds of running")] = None,
    on_preempt: Annotated[OnPreempt, typer.Option(
        help="On a preemption notice: resume from a checkpoint, restart, or fail")
    ] = OnPreempt.RESUME,
    pool: Annotated[str | None, typer.Option(help="Run only on workers of this pool")] = None,
    checkpoint_every_steps: Annotated[int | None, typer.Option(
        min=1, help="Checkpoint every N steps")] = None,
    checkpoint_every_seconds: Annotated[float | None, typer.Option(
        min=0.01, help="Checkpoint every S seconds [default: Young/Daly]")] = None,
    max_preemptions: Annotated[int | None, typer.Option(
        min=0, help="Move to on-demand workers after N preemptions "
        "[env SPOTRUN_MAX_PREEMPTIONS, default 5]")] = None,
    deadline: Annotated[float | None, typer.Option(
        min=1, help="Seconds from now by which the job should be done; it moves to "
        "on-demand workers when spot progress cannot make it")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job as JSON")] = False,
    wait_: Annotated[bool, typer.Option("--wait", help="Wait until the job ends")] = False,
    wait_timeout: Annotated[float | None, typer.Option(
        "--wait-timeout", min=0, help="With --wait: give up after S seconds (exit 3)")] = None,
) -> None:
    """Queue a job; print its id (or the job as JSON)."""
    from spotrun.pipelines.registry import validate_submission

    raw: dict[str, Any] = {}
    for item in param or []:
        key, value = parse_param(item)
        if key in raw:
            fail(f"param {key!r} is given twice")
        raw[key] = value
    if pool is not None:
        check_pool(pool, "--pool")
    with open_store() as store:
        _pipe, params, cuda = validate_submission(pipeline, raw, store)
        job = store.submit(
            pipeline, params, priority=priority, max_retries=max_retries,
            on_preempt=on_preempt, timeout=timeout, requires_cuda=cuda, pool=pool,
            checkpoint_every_steps=checkpoint_every_steps,
            checkpoint_every_seconds=checkpoint_every_seconds,
            max_preemptions=max_preemptions,
            deadline=None if deadline is None else store.now() + deadline,
        )
        if not wait_:
            _echo_json(job.to_json()) if as_json else typer.echo(job.id)
            return
        if not as_json:
            typer.echo(job.id)
        final = _wait_for(store, job.id, wait_timeout)
        if as_json:
            _echo_json(final.to_json())
        raise typer.Exit(_exit_code(final))


# ------------------------------------------------------------------ show / jobs


def _get(store: Any, job_id: str) -> Job:
    from spotrun.store import JobNotFound

    try:
        job: Job = store.get(job_id)
    except JobNotFound:
        fail(f"no job with id {job_id!r}")
    return job


def _fmt_time(t: Any) -> str:
    return str(t.astimezone().strftime("%H:%M:%S.%f")[:-3])


def describe(job: Job) -> str:
    """A job as a person reads it."""
    lines = [f"job {job.id}  {job.pipeline}  {job.state.value}"]
    detail = f"attempt {job.attempt}, preemptions {job.preemptions}, retries {job.retries}"
    if job.worker:
        detail += f", on worker {job.worker}"
    lines.append(detail)
    p = job.progress
    if p.total:
        pct = 100.0 * p.step / p.total
        bar = "#" * int(pct / 5) + "." * (20 - int(pct / 5))
        extra = " ".join(f"{k}={v}" for k, v in p.metrics.items())
        lines.append(f"progress: [{bar}] {p.step}/{p.total} ({pct:.0f}%) {extra}".rstrip())
    lines.append(f"params: {json.dumps(job.params, sort_keys=True)}")
    if job.result is not None:
        lines.append(f"result: {json.dumps(job.result, sort_keys=True)}")
    if job.error:
        lines.append(f"error: {job.error}")
    if job.events:
        lines.append("history:")
        lines.extend(f"  {_fmt_time(e.at)}  {e.message}" for e in job.events)
    return "\n".join(lines)


@app.command()
@friendly
def show(job_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """A job's state, progress, result or error, and its history."""
    with open_store() as store:
        job = _get(store, job_id)
    _echo_json(job.to_json()) if as_json else typer.echo(describe(job))


@app.command("jobs")
@friendly
def list_jobs(
    state: Annotated[JobState | None, typer.Option(help="Only jobs in this state")] = None,
    pipeline: Annotated[str | None, typer.Option(help="Only jobs of this pipeline")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most N jobs")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List jobs, newest first."""
    with open_store() as store:
        found = store.list_jobs(state=state, pipeline=pipeline, limit=limit)
    if as_json:
        _echo_json([j.to_json(with_events=False) for j in found])
        return
    for j in found:
        prog = f"{j.progress.step}/{j.progress.total}" if j.progress.total else ""
        typer.echo(f"{j.id}  {j.state.value:<9}  {j.pipeline:<14}  {prog:>9}  "
                   f"{j.worker or ''}")


@app.command()
@friendly
def cancel(job_id: str) -> None:
    """Cancel a job: at once if queued, at its next step if running."""
    with open_store() as store:
        _get(store, job_id)
        job = store.cancel(job_id)
    if job.state is JobState.CANCELLED:
        typer.echo(f"job {job_id} cancelled")
    elif job.state is JobState.RUNNING:
        typer.echo(f"job {job_id} will stop at its next step")
    else:
        typer.echo(f"job {job_id} had already ended ({job.state.value})")


def _exit_code(job: Job) -> int:
    return 0 if job.state is JobState.SUCCEEDED else 1


def _wait_for(store: Any, job_id: str, timeout: float | None) -> Job:
    give_up = None if timeout is None else time.monotonic() + timeout
    while True:
        job: Job = store.get(job_id, with_events=False)
        if job.state.is_final:
            return store.get(job_id)  # type: ignore[no-any-return]
        if give_up is not None and time.monotonic() >= give_up:
            typer.echo(f"spotrun: job {job_id} still {job.state.value} after {timeout:g} s",
                       err=True)
            raise typer.Exit(EXIT_TIMEOUT)
        time.sleep(0.2)


@app.command()
@friendly
def wait(
    job_id: str,
    timeout: Annotated[float | None, typer.Option(
        min=0, help="Give up after S seconds (exit 3)")] = None,
) -> None:
    """Wait until a job ends: exit 0 succeeded, 1 failed/cancelled/unknown, 3 timed out."""
    from spotrun.store import JobNotFound

    with open_store() as store:
        try:
            store.get(job_id, with_events=False)
        except JobNotFound:
            fail(f"no job with id {job_id!r}", 1)
        job = _wait_for(store, job_id, timeout)
    typer.echo(f"job {job_id} {job.state.value}" + (f": {job.error}" if job.error else ""))
    raise typer.Exit(_exit_code(job))


@app.command()
@friendly
def logs(job_id: str) -> None:
    """The log lines a job's pipeline wrote."""
    from spotrun.store import JobNotFound

    with open_store() as store:
        try:
            lines = store.logs(job_id)
        except JobNotFound:
            fail(f"no job with id {job_id!r}")
    for line in lines:
        typer.echo(f"{_fmt_time(line.at)} [attempt {line.attempt}] {line.level:<7} "
                   f"{line.message}")


@app.command()
@friendly
def workers(
    as_json: Annotated[bool, typer.Option("--json")] = False,
    all_: Annotated[bool, typer.Option("--all", help="Include stopped and gone workers")
                    ] = False,
) -> None:
    """Registered workers."""
    with open_store() as store:
        store.mark_gone_workers()
        found = store.list_workers(include_stopped=all_)
    if as_json:
        _echo_json([w.to_json() for w in found])
        return
    for w in found:
        typer.echo(f"{w.name:<20} {w.state:<8} pool={w.pool:<9} {w.host}:{w.pid}  "
                   f"job={w.current_job or '-'}")


@app.command()
@friendly
def pipelines(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The pipelines this installation knows, with their params."""
    from spotrun.pipelines.registry import registry

    pipes = registry()
    if as_json:
        _echo_json([{"name": p.name, "description": p.description, "params": p.schema()}
                    for p in pipes.values()])
        return
    for p in pipes.values():
        typer.echo(f"{p.name}: {p.description}")
        for name, prop in p.schema().get("properties", {}).items():
            default = f" (default {prop['default']})" if "default" in prop else ""
            typer.echo(f"    {name}{default}: {prop.get('description', '')}".rstrip(": "))


# ---------------------------------------------------------------------- worker


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _preload_ml() -> None:
    # Import the ML stack while the worker waits for its first job, so that resuming a
    # handed-back job does not pay seconds of imports.
    import importlib.util
    import threading

    if importlib.util.find_spec("torch") is None:
        return

    def load() -> None:
        with contextlib.suppress(Exception):
            from spotrun.pipelines import digits

            digits.load_split()  # scikit-learn and the data set, cached for every job

    threading.Thread(target=load, name="spotrun-preload", daemon=True).start()


@app.command()
@friendly
def worker(
    name: Annotated[str | None, typer.Option(help="Worker name [default: host-pid]")] = None,
    concurrency: Annotated[int, typer.Option(min=1, max=256, help="Jobs at once")] = 1,
    lease_seconds: Annotated[float | None, typer.Option(
        min=0.2, help="Lease length [env SPOTRUN_LEASE_SECONDS, default 10]")] = None,
    heartbeat_seconds: Annotated[float | None, typer.Option(
        min=0.05, help="Heartbeat period [env SPOTRUN_HEARTBEAT_SECONDS, default 2]")] = None,
    grace_seconds: Annotated[float | None, typer.Option(
        min=0.5, help="Budget after a notice [env SPOTRUN_GRACE_SECONDS, default 15]")] = None,
    pool: Annotated[str | None, typer.Option(help="spot or on-demand [env SPOTRUN_POOL]")
                    ] = None,
    price_per_hour: Annotated[float | None, typer.Option(
        min=0, help="What this worker costs per hour [env SPOTRUN_PRICE_PER_HOUR]")] = None,
    max_jobs: Annotated[int | None, typer.Option(min=1, help="Exit after N jobs")] = None,
    preload: Annotated[bool, typer.Option(help="Import the ML libraries at start")] = True,
) -> None:
    """Run jobs until stopped. SIGTERM/SIGINT: hand the job back and exit 0."""
    from spotrun import shutdown
    from spotrun.worker import Worker

    s = settings()
    changes: dict[str, Any] = {}
    if lease_seconds is not None:
        changes["lease_seconds"] = lease_seconds
    if heartbeat_seconds is not None:
        changes["heartbeat_seconds"] = heartbeat_seconds
    if grace_seconds is not None:
        changes["grace_seconds"] = grace_seconds
    if pool is not None:
        changes["pool"] = check_pool(pool, "--pool")
    if price_per_hour is not None:
        changes["price_per_hour"] = price_per_hour
    if changes:
        s = s.with_(**changes)
    setup_logging()
    coordinator = shutdown.coordinator(grace_seconds=s.grace_seconds,
                                       safety_margin=s.safety_margin_seconds)
    coordinator.install_signal_handlers()
    _import_plugins()
    from spotrun import watchers

    # Check the notice sources before anything starts, so a typo is one line, not a worker
    # that never hears its cloud.
    cloud_watchers = watchers.watchers_from_env(coordinator)
    if preload:
        _preload_ml()
    w = Worker(s, name=name, concurrency=concurrency, coordinator=coordinator,
               max_jobs=max_jobs, exit_at_deadline=True)
    for watcher in cloud_watchers:
        watcher.start()
    logging.getLogger("spotrun.watchers").info("preemption sources: signals%s", "".join(
        f", {cw.source} ({cw.endpoint})" for cw in cloud_watchers))
    code = w.run()
    logging.shutdown()
    # Pipelines stuck in a C call live on daemon threads; do not wait for them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _import_plugins() -> None:
    """Import the modules named in SPOTRUN_IMPORT (comma-separated), e.g. to register
    shutdown hooks with ``spotrun.shutdown.register``."""
    import importlib

    for name in filter(None, (m.strip() for m in os.environ.get("SPOTRUN_IMPORT", "").split(
            ","))):
        try:
            importlib.import_module(name)
        except Exception as exc:
            fail(f"SPOTRUN_IMPORT: cannot import {name!r}: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------- preempt


@app.command()
@friendly
def preempt(
    worker_name: Annotated[str | None, typer.Argument(
        metavar="WORKER", help="Worker name or id")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every live worker on this host")
                    ] = False,
    hard: Annotated[bool, typer.Option("--hard", help="SIGKILL at once (no notice)")] = False,
    grace_seconds: Annotated[float | None, typer.Option(
        min=0, help="Seconds before SIGKILL [default SPOTRUN_GRACE_SECONDS]")] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Send the signal and return")
                       ] = False,
) -> None:
    """Simulate a preemption: SIGTERM a local worker, then SIGKILL after the grace period."""
    from spotrun.local import is_spotrun_process

    if not worker_name and not all_:
        fail("name a worker, or use --all")
    s = settings()
    host = socket.gethostname()
    with open_store(s) as store:
        if all_:
            targets = [w for w in store.list_workers(include_stopped=False) if w.host == host]
            if not targets:
                fail("no live workers on this host")
        else:
            assert worker_name is not None
            found = [w for w in store.find_workers(worker_name)
                     if w.state in ("idle", "busy", "stopping")]
            if not found:
                fail(f"no live worker named {worker_name!r}")
            targets = found[:1]
    grace = s.grace_seconds if grace_seconds is None else grace_seconds
    for w in targets:
        if w.host != host:
            fail(f"worker {w.name} runs on host {w.host}, not here ({host}); run "
                 "`spotrun preempt` on that host")
        if not is_spotrun_process(w.pid):
            typer.echo(f"worker {w.name} (pid {w.pid}) is not running any more")
            continue
        sig = signal.SIGKILL if hard else signal.SIGTERM
        os.kill(w.pid, sig)
        typer.echo(f"sent {sig.name} to worker {w.name} (pid {w.pid})")
    if hard or no_wait:
        return
    give_up = time.monotonic() + grace
    for w in targets:
        while is_spotrun_process(w.pid) and time.monotonic() < give_up:
            time.sleep(0.05)
        if is_spotrun_process(w.pid):
            os.kill(w.pid, signal.SIGKILL)
            typer.echo(f"worker {w.name} still ran after {grace:g} s: sent SIGKILL")
        else:
            typer.echo(f"worker {w.name} exited")


# ------------------------------------------------------------------------ demo


@app.command()
@friendly
def demo(
    epochs: Annotated[int, typer.Option(min=1, max=100)] = 10,
    step_delay: Annotated[float, typer.Option(min=0, max=1)] = 0.02,
) -> None:
    """Tell the whole story: train, preempt the worker midway, resume elsewhere, compare."""
    from spotrun import demo as demo_mod

    raise typer.Exit(demo_mod.run_demo(settings(), epochs=epochs, step_delay=step_delay,
                                       echo=typer.echo))


# ---------------------------------------------------------------------- tokens


@token_app.command("create")
@friendly
def token_create(name: str, admin: Annotated[bool, typer.Option("--admin")] = False) -> None:
    """Create an API token; it is printed once, alone on the last line."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9._@-]{1,64}", name):
        fail(f"bad token name {name!r}: use 1 to 64 letters, digits and . _ @ -")
    with open_store() as store:
        token = store.create_token(name, admin=admin)
    typer.echo(f"created {'admin ' if admin else ''}token {name!r}; keep it, it is not shown "
               "again:", err=True)
    typer.echo(token)


@token_app.command("list")
@friendly
def token_list() -> None:
    """API tokens (names only; the tokens themselves are stored hashed)."""
    with open_store() as store:
        tokens = store.list_tokens()
    for t in tokens:
        typer.echo(f"{t.name:<20} {'admin' if t.is_admin else 'user':<6} "
                   f"{'revoked' if t.revoked else 'active'}  created {t.created_at:%Y-%m-%d}")


@token_app.command("revoke")
@friendly
def token_revoke(name: str) -> None:
    """Revoke an API token."""
    with open_store() as store:
        store.revoke_token(name)
    typer.echo(f"token {name!r} revoked")


# ------------------------------------------------------------------ operations


@app.command()
@friendly
def doctor(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Check this deployment: signal path, database, checkpoint store, GPUs, notices."""
    from spotrun import doctor as doctor_mod

    raise typer.Exit(doctor_mod.main(settings(), as_json=as_json, echo=typer.echo))


@app.command()
@friendly
def server(
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on")] = 8000,
) -> None:
    """Serve the HTTP API and the dashboard."""
    from spotrun import serve

    raise typer.Exit(serve.serve(settings(), host=host, port=port, echo=typer.echo))


@app.command()
@friendly
def up(
    workers_: Annotated[int, typer.Option("--workers", min=0, max=64,
                                          help="Local workers to start")] = 2,
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on")] = 8000,
) -> None:
    """The API, the dashboard and N local workers in one process tree (Ctrl-C stops all)."""
    from spotrun import serve

    raise typer.Exit(serve.up(settings(), workers=workers_, host=host, port=port,
                              echo=typer.echo))


@app.command()
@friendly
def chaos(
    workers_: Annotated[int, typer.Option("--workers", min=1, max=64)] = 4,
    jobs_: Annotated[int, typer.Option("--jobs", min=1, max=100_000)] = 40,
    duration: Annotated[float, typer.Option(min=1, help="Seconds of chaos")] = 60,
    sigterm_rate: Annotated[float, typer.Option(min=0, help="SIGTERMs per second")] = 0.1,
    sigkill_rate: Annotated[float, typer.Option(min=0, help="SIGKILLs per second")] = 0.05,
    freeze_rate: Annotated[float, typer.Option(
        min=0, help="SIGSTOP-past-the-lease freezes per second")] = 0.03,
    db_restart: Annotated[bool, typer.Option(
        "--db-restart", help="Run a private PostgreSQL and restart it mid-drill")] = False,
    db_stall: Annotated[bool, typer.Option(
        "--db-stall", help="Hold a lock on the jobs table for two leases mid-drill")] = False,
    cut_replies: Annotated[bool, typer.Option(
        "--cut-replies", help="Cut connections right after claims and results commit "
        "(PostgreSQL)")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the drill's randomness")] = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """A chaos drill: kill workers every way a cloud can, then check nothing was lost."""
    from spotrun import chaos as chaos_mod

    raise typer.Exit(chaos_mod.main(
        settings(), workers=workers_, jobs=jobs_, duration=duration,
        sigterm_rate=sigterm_rate, sigkill_rate=sigkill_rate, freeze_rate=freeze_rate,
        db_restart=db_restart, seed=seed, as_json=as_json, echo=typer.echo,
        db_stall=db_stall, cut_replies=cut_replies))


@app.command()
@friendly
def cost(
    since: Annotated[str | None, typer.Option(
        help="Only jobs created since this ISO date/time, or a duration like 24h, 7d")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    per_job: Annotated[bool, typer.Option("--per-job", help="A line per job")] = False,
) -> None:
    """What the jobs cost on spot and on-demand workers, and what spot saved.

    Prices: the worker's own price, else SPOTRUN_PRICES by pool (e.g.
    "spot=0.35,on-demand=1.20"); SPOTRUN_ON_DEMAND_PRICE sets the reference.
    """
    from spotrun import cost as cost_mod

    raise typer.Exit(cost_mod.main(settings(), since=since, as_json=as_json, per_job=per_job,
                                   echo=typer.echo))


@app.command()
@friendly
def simulate(
    workers_: Annotated[int | None, typer.Option(
        "--workers", help="Workers, 1 to 10000 [default 100]")] = None,
    spot_fraction: Annotated[float | None, typer.Option(
        help="Share of the workers on spot VMs [default 1]")] = None,
    zones: Annotated[int | None, typer.Option(help="Zones the spot VMs spread over [3]")
                     ] = None,
    job_minutes: Annotated[float | None, typer.Option(help="Length of a job [5]")] = None,
    arrival_rate: Annotated[float | None, typer.Option(
        help="Jobs per hour (Poisson) [70 % of the fleet's capacity]")] = None,
    hours: Annotated[float | None, typer.Option(help="Hours of arrivals [8]")] = None,
    preemption_rate: Annotated[float | None, typer.Option(
        help="Preemptions per spot VM per hour, 0.05 = 5 %/h [0.05]")] = None,
    wave_at: Annotated[float | None, typer.Option(
        help="Hour at which zone 0 loses --wave-fraction of its spot VMs at once")] = None,
    wave_fraction: Annotated[float | None, typer.Option(help="[0.5]")] = None,
    notice_seconds: Annotated[float | None, typer.Option(
        help="Preemption notice before the VM dies [30]")] = None,
    notice_miss: Annotated[float | None, typer.Option(
        help="Share of preemptions without a usable notice [0.05]")] = None,
    replace_seconds: Annotated[float | None, typer.Option(
        help="VM death to its replacement's first claim [120]")] = None,
    checkpoint_seconds: Annotated[float | None, typer.Option(help="One checkpoint [2]")
                                  ] = None,
    notice_checkpoint_seconds: Annotated[float | None, typer.Option(
        help="Notice to hand-back [= --checkpoint-seconds]")] = None,
    restart_seconds: Annotated[float | None, typer.Option(
        help="Claim to first step of a resumed job [20]")] = None,
    checkpoint_interval: Annotated[float | None, typer.Option(
        help="Seconds of work between checkpoints [Young/Daly sqrt(2 C M)]")] = None,
    max_preemptions: Annotated[int | None, typer.Option(
        help="Escalation: a job preempted more often goes to on-demand [2]")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the randomness [0]")] = None,
    policy: Annotated[list[str] | None, typer.Option(
        "--policy", help="Only this policy (repeatable) [all four]")] = None,
    calibrate: Annotated[str | None, typer.Option(
        help="Take checkpoint, notice and restart times from a `spotrun chaos --json` "
        "report")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Simulate a fleet of spot and on-demand workers under each checkpoint policy.

    Prices: SPOTRUN_PRICES ("spot=0.35,on-demand=1.20") and SPOTRUN_ON_DEMAND_PRICE.
    """
    from spotrun import simulate as simulate_mod

    raise typer.Exit(simulate_mod.main(
        as_json=as_json, calibrate=calibrate, policies=policy, echo=typer.echo,
        workers=workers_, spot_fraction=spot_fraction, zones=zones, job_minutes=job_minutes,
        arrival_rate=arrival_rate, hours=hours, preemption_rate=preemption_rate,
        wave_at=wave_at, wave_fraction=wave_fraction, notice_seconds=notice_seconds,
        notice_miss=notice_miss,
        replace_seconds=replace_seconds, checkpoint_seconds=checkpoint_seconds,
        notice_checkpoint_seconds=notice_checkpoint_seconds, restart_seconds=restart_seconds,
        checkpoint_interval=checkpoint_interval, max_preemptions=max_preemptions, seed=seed))


def _base_named(cls: type, name: str) -> type[Exception]:
    found = next(c for c in cls.__mro__ if c.__name__ == name)
    assert issubclass(found, Exception)
    return found


def main() -> None:
    """The ``spotrun`` command: usage errors are one line on stderr and exit 2."""
    import sqlalchemy.exc

    if len(sys.argv) < 2 or sys.argv[1:] in (["--help"], ["-h"]):
        app()  # the help page
        return
    # Typer's click, vendored or not: the classes behind its own BadParameter.
    usage_error = _base_named(typer.BadParameter, "UsageError")
    try:
        code = app(standalone_mode=False)
    except usage_error as exc:
        ctx = getattr(exc, "ctx", None)
        path = getattr(ctx, "command_path", "") or ""
        hint = f" (see `spotrun {path.split(' ', 1)[1]} --help`)" if " " in path else ""
        typer.echo(f"spotrun: {exc.format_message()}{hint}", err=True)  # type: ignore[attr-defined]
        sys.exit(EXIT_BAD_INPUT)
    except typer.Abort:
        typer.echo("spotrun: interrupted", err=True)
        sys.exit(130)
    except ConfigError as exc:
        typer.echo(f"spotrun: {exc}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except sqlalchemy.exc.ArgumentError:
        typer.echo("spotrun: the database URL is not one spotrun can use: give "
                   "sqlite:///PATH or postgresql://USER@HOST/DB", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except OSError as exc:
        typer.echo(f"spotrun: {exc.strerror or exc}"
                   + (f": {exc.filename}" if exc.filename else ""), err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
