"""The command line: a thin layer over the store, the worker and the tools.

Its output is a contract that scripts rely on: ``submit`` prints the job id alone, ``--json``
prints the job's JSON shape, failures are one line on stderr and a non-zero exit.
Commands that run no pipeline import no ML library, so they start fast.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from spotrun import preload as ml_preload
from spotrun.capacity import job_unrunnable, unrunnable_reason
from spotrun.config import ConfigError, Settings, check_pool
from spotrun.jobs import Job, JobState, OnPreempt
from spotrun.logconfig import setup_logging
from spotrun.quotas import DESCRIPTIONS, Quota
from spotrun.service import submission as bounds
from spotrun.service.submission import ServiceError, Submission

if TYPE_CHECKING:
    from spotrun.store import JobStore

# The store (SQLAlchemy), the HTTP stack, the worker and the ML libraries are imported
# inside the commands that use them, each marked "start-up": `spotrun --help` and the
# commands that need none of them stay fast.

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain help pages: rich's formatting (with pygments and markdown) took longer to
    # import than the rest of the CLI together.
    rich_markup_mode=None,
    help="Run machine-learning jobs on preemptible / spot workers without losing work.",
)
token_app = typer.Typer(no_args_is_help=True, help="Manage API tokens.")
app.add_typer(token_app, name="token")
quota_app = typer.Typer(no_args_is_help=True, help="Users' quotas on the shared fleet.")
app.add_typer(quota_app, name="quota")
intake_app = typer.Typer(no_args_is_help=True, help="Take jobs from a message bus.")
app.add_typer(intake_app, name="intake")

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
        from spotrun.checkpoints import CheckpointConfigError  # start-up
        from spotrun.pipelines.base import SubmitRefused  # start-up
        from spotrun.pipelines.registry import UnknownPipeline  # start-up
        from spotrun.store import DatabaseUnavailable, StoreError  # start-up

        try:
            return fn(*args, **kwargs)
        except DatabaseUnavailable as exc:
            fail(str(exc), 1)
        except (StoreError, ConfigError, UnknownPipeline, SubmitRefused,
                CheckpointConfigError, ServiceError) as exc:
            fail(str(exc.args[0]) if exc.args else str(exc))
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper  # type: ignore[return-value]


def settings() -> Settings:
    return Settings.from_env(home=_state.home, database_url=_state.database_url)


@contextlib.contextmanager
def open_store(s: Settings | None = None, *, read_only: bool = False
               ) -> Iterator[JobStore]:
    """The job store; with ``read_only`` a SQLite file that is not there is an error, not
    a new empty database (a mistyped path must not look like an empty queue)."""
    from spotrun.store import JobStore, normalize_url  # start-up

    s = s or settings()
    url = normalize_url(s.database_url)
    if read_only and url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        path = Path(url.removeprefix("sqlite:///").split("?", 1)[0])
        if not path.is_file():
            fail(f"no database at {path} (check --home, SPOTRUN_HOME or "
                 "SPOTRUN_DATABASE_URL; a worker or `spotrun submit` creates it)", 1)
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
    priority: Annotated[int, typer.Option(
        min=bounds.PRIORITY[0], max=bounds.PRIORITY[1], help="Higher runs first")] = 0,
    max_retries: Annotated[int, typer.Option(
        min=bounds.MAX_RETRIES[0], max=bounds.MAX_RETRIES[1],
        help="Times a lost worker may send the job back to the queue")] = 4,
    timeout: Annotated[float | None, typer.Option(
        min=0.001, help="Time limit in seconds of running")] = None,
    on_preempt: Annotated[OnPreempt, typer.Option(
        help="On a preemption notice: resume from a checkpoint, restart, or fail")
    ] = OnPreempt.RESUME,
    pool: Annotated[str | None, typer.Option(help="Run only on workers of this pool")] = None,
    checkpoint_every_steps: Annotated[int | None, typer.Option(
        min=bounds.CHECKPOINT_EVERY_STEPS[0], max=bounds.CHECKPOINT_EVERY_STEPS[1],
        help="Checkpoint every N steps")] = None,
    checkpoint_every_seconds: Annotated[float | None, typer.Option(
        min=bounds.CHECKPOINT_EVERY_SECONDS[0], max=bounds.CHECKPOINT_EVERY_SECONDS[1],
        help="Checkpoint every S seconds [default: Young/Daly]")] = None,
    max_preemptions: Annotated[int | None, typer.Option(
        min=bounds.MAX_PREEMPTIONS[0], max=bounds.MAX_PREEMPTIONS[1],
        help="Move to on-demand workers after N preemptions "
        "[env SPOTRUN_MAX_PREEMPTIONS, default 5]")] = None,
    deadline: Annotated[float | None, typer.Option(
        min=bounds.DEADLINE_SECONDS[0], max=bounds.DEADLINE_SECONDS[1],
        help="Seconds from now by which the job should be done; it moves to "
        "on-demand workers when spot progress cannot make it")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job as JSON")] = False,
    wait_: Annotated[bool, typer.Option("--wait", help="Wait until the job ends")] = False,
    wait_timeout: Annotated[float | None, typer.Option(
        "--wait-timeout", min=0, help="With --wait: give up after S seconds (exit 3)")] = None,
    env: Annotated[list[str] | None, typer.Option(
        "-e", "--env", help="command jobs: KEY=VALUE added to the program's environment, "
        "repeatable")] = None,
    cwd: Annotated[str | None, typer.Option(
        help="command jobs: the program's working directory on the worker")] = None,
    argv: Annotated[list[str] | None, typer.Argument(
        help="command jobs: `-- PROGRAM ARG...`, the program to run on the worker",
        show_default=False)] = None,
) -> None:
    """Queue a job; print its id (or the job as JSON).

    `spotrun submit command [options] -- PROGRAM ARG...` runs a program on a worker (see
    docs/command-jobs.md).
    """
    from spotrun.service import queue  # start-up

    raw: dict[str, Any] = {}
    for item in param or []:
        key, value = parse_param(item)
        if key in raw:
            fail(f"param {key!r} is given twice")
        raw[key] = value
    _command_params(pipeline, raw, argv or [], env or [], cwd)
    if pool is not None:
        check_pool(pool, "--pool")
    request = Submission(
        pipeline, raw, priority=priority, max_retries=max_retries, on_preempt=on_preempt,
        timeout=timeout, pool=pool, checkpoint_every_steps=checkpoint_every_steps,
        checkpoint_every_seconds=checkpoint_every_seconds, max_preemptions=max_preemptions,
        deadline=deadline)
    with open_store() as store:
        job = queue.submit(store, request, caller=None)
        unrunnable = unrunnable_reason(job.requires_cuda, pool,
                                       store.list_workers(include_stopped=False))
        if unrunnable:
            typer.echo(f"spotrun: warning: {unrunnable}", err=True)
        if not wait_:
            _echo_json(job.to_json()) if as_json else typer.echo(job.id)
            return
        if not as_json:
            typer.echo(job.id)
        final = _wait_for(store, job.id, wait_timeout)
        if as_json:
            _echo_json(final.to_json())
        raise typer.Exit(_exit_code(final))


def _command_params(pipeline: str, raw: dict[str, Any], argv: list[str], env: list[str],
                    cwd: str | None) -> None:
    """Fold `-- PROGRAM ARG...`, --env and --cwd into a command job's params."""
    if pipeline != "command":
        if argv or env or cwd is not None:
            what = "-- PROGRAM ARG..." if argv else "--env" if env else "--cwd"
            fail(f"{what} is only for command jobs (`spotrun submit command -- PROGRAM ARG...`)"
                 f"; {pipeline!r} takes params with -p")
        return
    if argv and "argv" in raw:
        fail("the program is given twice: after `--` and as -p argv=...")
    if argv:
        raw["argv"] = argv
    if "argv" not in raw:
        fail("nothing to run: give the program after `--`, as in "
             "`spotrun submit command -- python train.py`")
    if env:
        if "env" in raw:
            fail("env is given twice: with --env and as -p env=...")
        variables: dict[str, str] = {}
        for item in env:
            key, sep, value = item.partition("=")
            if not sep or not key:
                fail(f"--env {item!r} is not KEY=VALUE")
            if key in variables:
                fail(f"--env {key} is given twice")
            variables[key] = value
        raw["env"] = variables
    if cwd is not None:
        if "cwd" in raw:
            fail("cwd is given twice: with --cwd and as -p cwd=...")
        raw["cwd"] = cwd


# ------------------------------------------------------------------ show / jobs


def _get(store: JobStore, job_id: str) -> Job:
    from spotrun.store import JobNotFound  # start-up

    try:
        job: Job = store.get(job_id)
    except JobNotFound:
        fail(f"no job with id {job_id!r}")
    return job


def _fmt_time(t: Any) -> str:
    return str(t.astimezone().strftime("%H:%M:%S.%f")[:-3])


RESULT_WIDTH = 100  # characters of a result shown on one line by `show`


def result_lines(result: Any) -> list[str]:
    """A result as `show` prints it: on one line when short; else a line per key, each
    value cut at :data:`RESULT_WIDTH` with its full length said (``--json`` has it all)."""
    whole = json.dumps(result, sort_keys=True)
    if len(whole) <= RESULT_WIDTH or not isinstance(result, dict):
        return [f"result: {_cut(whole)}"]
    return ["result:", *(f"  {k}: {_cut(json.dumps(result[k]))}" for k in sorted(result))]


def _cut(text: str) -> str:
    if len(text) <= RESULT_WIDTH:
        return text
    return f"{text[:RESULT_WIDTH]}... ({len(text):,} characters; `show --json` has it all)"


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
        lines.extend(result_lines(job.result))
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
    with open_store(read_only=True) as store:
        job = _get(store, job_id)
        unrunnable = None if as_json or job.state.is_final else job_unrunnable(
            job, store.list_workers(include_stopped=False))
    if as_json:
        _echo_json(job.to_json())
        return
    text = describe(job)
    if unrunnable:
        head, _, rest = text.partition("\n")
        text = f"{head}\nwarning: {unrunnable}\n{rest}"
    typer.echo(text)


@app.command("jobs")
@friendly
def list_jobs(
    state: Annotated[JobState | None, typer.Option(help="Only jobs in this state")] = None,
    pipeline: Annotated[str | None, typer.Option(help="Only jobs of this pipeline")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most N jobs")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List jobs, newest first."""
    with open_store(read_only=True) as store:
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
    from spotrun.service import queue  # start-up

    with open_store() as store:
        job = queue.cancel(store, job_id, caller=None)
    if job.state is JobState.CANCELLED:
        typer.echo(f"job {job_id} cancelled")
    elif job.state is JobState.RUNNING:
        typer.echo(f"job {job_id} will stop at its next step")
    else:
        typer.echo(f"job {job_id} had already ended ({job.state.value})")


def _exit_code(job: Job) -> int:
    return 0 if job.state is JobState.SUCCEEDED else 1


def progress_line(job: Job, width: int = 20) -> str:
    """One line of a job's state and progress: ``running [####....] 40/100 (40%) loss=…``."""
    p = job.progress
    line = job.state.value
    if p.total:
        done = int(width * min(p.step, p.total) / p.total)
        line += (f" [{'#' * done}{'.' * (width - done)}] {p.step}/{p.total} "
                 f"({100.0 * p.step / p.total:.0f}%)")
    elif p.step:
        line += f" step {p.step}"
    extra = " ".join(f"{k}={v}" for k, v in p.metrics.items())
    return f"{line} {extra}".rstrip()


def _wait_for(store: Any, job_id: str, timeout: float | None, *,
              show_progress: bool = False) -> Job:
    """Poll until the job ends; with ``show_progress``, redraw its progress line on stderr
    (for a terminal: nothing is written when it is not one)."""
    give_up = None if timeout is None else time.monotonic() + timeout
    shown = ""
    try:
        while True:
            job: Job = store.get(job_id, with_events=False)
            if show_progress:
                line = progress_line(job)
                if line != shown:
                    # \r and clear-to-end-of-line: the bar is redrawn in place.
                    sys.stderr.write(f"\r{line}\x1b[K")
                    sys.stderr.flush()
                    shown = line
            if job.state.is_final:
                return store.get(job_id)  # type: ignore[no-any-return]
            if give_up is not None and time.monotonic() >= give_up:
                if shown:
                    sys.stderr.write("\n")
                    shown = ""
                typer.echo(f"spotrun: job {job_id} still {job.state.value} after "
                           f"{timeout:g} s", err=True)
                raise typer.Exit(EXIT_TIMEOUT)
            time.sleep(0.2)
    finally:
        if shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


@app.command()
@friendly
def wait(
    job_id: str,
    timeout: Annotated[float | None, typer.Option(
        min=0, help="Give up after S seconds (exit 3)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the ended job as JSON")
                       ] = False,
) -> None:
    """Wait until a job ends: exit 0 succeeded, 1 failed/cancelled/unknown, 3 gave up.

    On a terminal a progress bar is drawn on stderr while it waits."""
    from spotrun.store import JobNotFound  # start-up

    with open_store(read_only=True) as store:
        try:
            store.get(job_id, with_events=False)
        except JobNotFound:
            fail(f"no job with id {job_id!r}", 1)
        tty = sys.stderr.isatty() and sys.stdout.isatty()
        job = _wait_for(store, job_id, timeout, show_progress=tty and not as_json)
    if as_json:
        _echo_json(job.to_json())
    else:
        typer.echo(f"job {job_id} {job.state.value}" + (f": {job.error}" if job.error else ""))
    raise typer.Exit(_exit_code(job))


@app.command()
@friendly
def logs(job_id: str) -> None:
    """The log lines a job's pipeline wrote."""
    from spotrun.store import JobNotFound  # start-up

    with open_store(read_only=True) as store:
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
    with open_store(read_only=True) as store:
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
    from spotrun.pipelines.registry import registry  # start-up

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


@app.command()
@friendly
def worker(
    name: Annotated[str | None, typer.Option(help="Worker name [default: host-pid]")] = None,
    concurrency: Annotated[int, typer.Option(min=1, max=256, help="Jobs at once")] = 1,
    lease_seconds: Annotated[float | None, typer.Option(
        min=0.2, help="Lease length [env SPOTRUN_LEASE_SECONDS, default 10]")] = None,
    heartbeat_seconds: Annotated[float | None, typer.Option(
        min=0.05, help="Heartbeat period [env SPOTRUN_HEARTBEAT_SECONDS, default 2.5]")] = None,
    grace_seconds: Annotated[float | None, typer.Option(
        min=0.5, help="Budget after a notice [env SPOTRUN_GRACE_SECONDS, default 15]")] = None,
    pool: Annotated[str | None, typer.Option(help="spot or on-demand [env SPOTRUN_POOL]")
                    ] = None,
    price_per_hour: Annotated[float | None, typer.Option(
        min=0, help="What this worker costs per hour [env SPOTRUN_PRICE_PER_HOUR]")] = None,
    max_jobs: Annotated[int | None, typer.Option(min=1, help="Exit after N jobs")] = None,
    memory_limit: Annotated[float | None, typer.Option(
        min=0.01, help="GB a job may use, CPU workers only: an allocation past it fails the "
        "job, not the worker [env SPOTRUN_JOB_MEMORY_GB]")] = None,
    preload: Annotated[bool, typer.Option(help="Import the ML libraries at start")] = True,
) -> None:
    """Run jobs until stopped. SIGTERM/SIGINT: checkpoint, hand the job back and exit 0.

    Exit 3: a step ignored a cancel or time limit; its job ended, the others handed back.
    """
    from spotrun import shutdown, watchers  # start-up
    from spotrun.worker import Worker  # start-up

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
    if memory_limit is not None:
        changes["job_memory_gb"] = memory_limit
    if changes:
        s = s.with_(**changes)
    setup_logging()
    coordinator = shutdown.coordinator(grace_seconds=s.grace_seconds,
                                       safety_margin=s.safety_margin_seconds)
    coordinator.install_signal_handlers()
    _import_plugins()
    # Check the notice sources before anything starts, so a typo is one line, not a worker
    # that never hears its cloud.
    cloud_watchers = watchers.watchers_from_env(coordinator)
    if preload:
        ml_preload.start()
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


# ---------------------------------------------------------------------- intake


@intake_app.command("pubsub")
@friendly
def intake_pubsub(
    project: Annotated[str, typer.Option(envvar="SPOTRUN_PUBSUB_PROJECT",
                                         help="Google Cloud project of the subscription")],
    subscription: Annotated[str, typer.Option(
        envvar="SPOTRUN_PUBSUB_SUBSCRIPTION", help="Subscription to take requests from")],
    events_topic: Annotated[str | None, typer.Option(
        envvar="SPOTRUN_PUBSUB_EVENTS_TOPIC",
        help="Topic to publish the jobs' events (and rejections) to")] = None,
    owner: Annotated[str, typer.Option(envvar="SPOTRUN_PUBSUB_OWNER",
                                       help="Owner of the jobs")] = "pubsub",
    owner_attribute: Annotated[str | None, typer.Option(
        help="Let messages name their owner in this attribute")] = None,
    allow_owner: Annotated[list[str] | None, typer.Option(
        help="With --owner-attribute: an owner messages may name (repeatable; "
             "default any)")] = None,
    max_messages: Annotated[int, typer.Option(
        min=1, max=10_000, help="Messages held at once (flow control)")] = 100,
    grace_seconds: Annotated[float | None, typer.Option(
        min=0.5, help="Budget to stop after SIGTERM [env SPOTRUN_GRACE_SECONDS, "
                      "default 15]")] = None,
) -> None:
    """Queue the jobs that messages of a Pub/Sub subscription ask for, until SIGTERM."""
    from spotrun.intake import pubsub  # start-up
    from spotrun.service import callback_urls  # start-up

    s = settings()
    config = pubsub.PubSubConfig(
        project=project, subscription=subscription, events_topic=events_topic or None,
        owner=owner, owner_attribute=owner_attribute,
        allowed_owners=frozenset(allow_owner or ()), max_messages=max_messages)
    if not owner.strip() or len(owner) > 100:
        fail("--owner: must be 1 to 100 characters")
    setup_logging()
    with open_store(s) as store:
        code = pubsub.run(store, config, echo=typer.echo,
                          grace_seconds=grace_seconds or s.grace_seconds,
                          allow_private_callbacks=callback_urls.allow_private_from_env())
    raise typer.Exit(code)


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
    from spotrun.service import preempt as preemption  # start-up

    if not worker_name and not all_:
        fail("name a worker, or use --all")
    s = settings()
    with open_store(s) as store:
        if all_:
            targets = preemption.workers_here(store)
            if not targets:
                fail("no live workers on this host")
        else:
            assert worker_name is not None
            targets = [preemption.live_worker(store, worker_name)]
    grace = s.grace_seconds if grace_seconds is None else grace_seconds
    sig = signal.SIGKILL if hard else signal.SIGTERM
    for w in targets:
        try:
            preemption.signal_worker(w, sig)
        except preemption.NotRunning as exc:
            typer.echo(str(exc))
            continue
        typer.echo(f"sent {sig.name} to worker {w.name} (pid {w.pid})")
    if hard or no_wait:
        return
    give_up = time.monotonic() + grace
    for w in targets:
        while preemption.is_spotrun_process(w.pid) and time.monotonic() < give_up:
            time.sleep(0.05)
        if preemption.is_spotrun_process(w.pid):
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
    from spotrun import demo as demo_mod  # start-up

    raise typer.Exit(demo_mod.run_demo(settings(), epochs=epochs, step_delay=step_delay,
                                       echo=typer.echo))


# ---------------------------------------------------------------------- tokens


@token_app.command("create")
@friendly
def token_create(
    name: str, admin: Annotated[bool, typer.Option("--admin")] = False,
    expires_in: Annotated[str | None, typer.Option(
        "--expires-in", help="Stop working after this long: 30m, 24h, 7d, 2w "
        "[default: never]")] = None,
) -> None:
    """Create an API token; it is printed once, alone on the last line."""
    if not re.fullmatch(r"[A-Za-z0-9._@-]{1,64}", name):
        fail(f"bad token name {name!r}: use 1 to 64 letters, digits and . _ @ -")
    seconds = None
    if expires_in is not None:
        m = re.fullmatch(r"(\d{1,6})([mhdw])", expires_in.strip())
        if m is None or int(m.group(1)) == 0:
            fail(f"bad --expires-in {expires_in!r}: give a duration like 30m, 24h, 7d or 2w")
        seconds = int(m.group(1)) * {"m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    with open_store() as store:
        token = store.tokens.create(name, admin=admin, expires_in=seconds)
    typer.echo(f"created {'admin ' if admin else ''}token {name!r}; keep it, it is not shown "
               "again:", err=True)
    typer.echo(token)


@token_app.command("callback-secret")
@friendly
def token_callback_secret(name: Annotated[str | None, typer.Argument(
        help="the user whose key to print [default: the operators' jobs, which have no "
             "owner]")] = None) -> None:
    """Print the key that signs the callbacks of NAME's jobs (X-Spotrun-Signature)."""
    with open_store() as store:
        typer.echo(store.callbacks.secret(name))


@token_app.command("list")
@friendly
def token_list() -> None:
    """API tokens (names only; the tokens themselves are stored hashed)."""
    with open_store() as store:
        tokens = store.tokens.list()
    now = dt.datetime.now(dt.UTC)
    for t in tokens:
        expired = t.expires_at is not None and t.expires_at <= now
        status = "revoked" if t.revoked else "expired" if expired else "active"
        expiry = "" if t.expires_at is None else f"  expires {t.expires_at:%Y-%m-%d %H:%M} UTC"
        typer.echo(f"{t.name:<20} {'admin' if t.is_admin else 'user':<6} {status:<7}  "
                   f"created {t.created_at:%Y-%m-%d}{expiry}")


@token_app.command("revoke")
@friendly
def token_revoke(name: str) -> None:
    """Revoke an API token."""
    with open_store() as store:
        store.tokens.revoke(name)
    typer.echo(f"token {name!r} revoked")


# ---------------------------------------------------------------------- quotas


def _echo_quota(name: str, quota: Quota) -> None:
    typer.echo(f"quotas of {name}:")
    for key, value in quota.to_json().items():
        typer.echo(f"  {key:<17} {value:>8}  {DESCRIPTIONS[key]}")


@quota_app.command("show")
@friendly
def quota_show(name: str) -> None:
    """The limits that apply to user NAME (their own, or the defaults)."""
    with open_store() as store:
        _echo_quota(name, store.quota_for(name))


@quota_app.command("set")
@friendly
def quota_set(
    name: str,
    queued: Annotated[int | None, typer.Option(min=0, help="Jobs waiting at once")] = None,
    running: Annotated[int | None, typer.Option(
        min=0, help="Jobs running at once (0: no limit)")] = None,
    max_retries: Annotated[int | None, typer.Option(
        min=0, help="Highest max_retries a job may ask for")] = None,
    max_priority: Annotated[int | None, typer.Option(
        min=-1000, max=1000, help="Highest priority a job may have")] = None,
    params_bytes: Annotated[int | None, typer.Option(
        min=0, help="Largest params of a job, in bytes")] = None,
) -> None:
    """Set some of user NAME's limits; the others keep theirs."""
    limits = {"max_queued": queued, "max_running": running, "max_retries": max_retries,
              "max_priority": max_priority, "max_params_bytes": params_bytes}
    given: dict[str, int | None] = {k: v for k, v in limits.items() if v is not None}
    if not given:
        fail("give at least one limit, e.g. --queued 100")
    with open_store() as store:
        _echo_quota(name, store.set_quota(name, given))


# ------------------------------------------------------------------ operations


@app.command()
@friendly
def doctor(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Check this deployment: signal path, database, checkpoint store, GPUs, notices."""
    from spotrun import doctor as doctor_mod  # start-up

    raise typer.Exit(doctor_mod.main(settings(), as_json=as_json, echo=typer.echo))


@app.command()
@friendly
def server(
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on")] = 8000,
    processes: Annotated[int, typer.Option(
        min=1, max=64, help="Processes serving the one port (about one per core)")] = 1,
) -> None:
    """Serve the HTTP API and the dashboard."""
    from spotrun import serve  # start-up: uvicorn and FastAPI

    raise typer.Exit(serve.serve(settings(), host=host, port=port, echo=typer.echo,
                                 processes=processes))


@app.command()
@friendly
def up(
    workers_: Annotated[int, typer.Option("--workers", min=0, max=64,
                                          help="Local workers to start")] = 2,
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on")] = 8000,
) -> None:
    """The API, the dashboard and N local workers in one process tree (Ctrl-C stops all)."""
    from spotrun import serve  # start-up: uvicorn and FastAPI

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
    from spotrun import chaos as chaos_mod  # start-up

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
    from spotrun import cost as cost_mod  # start-up

    raise typer.Exit(cost_mod.main(settings(), since=since, as_json=as_json, per_job=per_job,
                                   echo=typer.echo))


@app.command()
@friendly
def audit(
    db: Annotated[str | None, typer.Option(
        "--db", help="The store to audit [default: --database-url, SPOTRUN_DATABASE_URL]")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Check from the store alone that no job was lost, none completed twice, every result
    came from the attempt holding the lease and every resume from the last checkpoint.

    Exit 0 when every check passes, 1 when one fails.
    """
    # start-up: SQLAlchemy, the store
    from spotrun.chaos import audit as audit_mod

    raise typer.Exit(audit_mod.main(db or settings().database_url, as_json=as_json,
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
    from spotrun import simulate as simulate_mod  # start-up: simpy

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
    except OSError as exc:
        typer.echo(f"spotrun: {exc.strerror or exc}"
                   + (f": {exc.filename}" if exc.filename else ""), err=True)
        sys.exit(1)
    except Exception as exc:
        # Only the store raises it, so it is looked up only if the store was imported:
        # importing it here would cost every command SQLAlchemy's import.
        errors = sys.modules.get("spotrun.store.errors")
        if errors is None or not isinstance(exc, errors.BadDatabaseURL):
            raise
        typer.echo("spotrun: the database URL is not one spotrun can use: give "
                   "sqlite:///PATH or postgresql://USER@HOST/DB", err=True)
        sys.exit(EXIT_BAD_INPUT)
    sys.exit(code if isinstance(code, int) else 0)
