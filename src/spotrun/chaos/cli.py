"""``spotrun chaos``: run a drill, print its report; and the drill's reference child."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType

from spotrun.chaos.drill import Drill, Echo
from spotrun.chaos.processes import ChaosError, PrivatePostgres
from spotrun.chaos.report import Report, format_report
from spotrun.chaos.schedule import make_schedule
from spotrun.config import Settings
from spotrun.store import DatabaseUnavailable, StoreError

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Ctrl-C and SIGTERM stop the drill: stop every child, remove every file.

    SIGINT gets a handler of its own too: Python turns SIGINT into KeyboardInterrupt only
    when the process started with SIGINT at its default, and a process started in the
    background of a non-interactive shell (CI runners, ``cmd &`` in scripts) inherits it
    ignored; the drill then ran to its end on Ctrl-C.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Cleanup runs to its end even if Ctrl-C is pressed again."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def _torch_available() -> bool:
    return all(importlib.util.find_spec(m) is not None
               for m in ("torch", "sklearn", "safetensors"))


def main(settings: Settings, *, workers: int, jobs: int, duration: float,
         sigterm_rate: float, sigkill_rate: float, freeze_rate: float, db_restart: bool,
         seed: int, as_json: bool, echo: Echo, db_stall: bool = False,
         cut_replies: bool = False) -> int:
    """Run the drill; print the report; 0 if every check passed, 1 if not, 2 bad input."""
    def fail(msg: str, code: int) -> int:
        print(f"spotrun: {msg}", file=sys.stderr)
        return code

    try:
        if workers < 1 or jobs < 1 or duration <= 0:
            raise ChaosError("--workers, --jobs and --duration must be positive")
        if min(sigterm_rate, sigkill_rate, freeze_rate) < 0:
            raise ChaosError("kill rates must not be negative")
        if cut_replies and not db_restart and \
                not settings.database_url.startswith(("postgresql", "postgres:")):
            raise ChaosError("--cut-replies cuts connections to a database server: use "
                             "PostgreSQL (or --db-restart, which runs one)")
        pg = PrivatePostgres.locate() if db_restart else None
    except ChaosError as exc:
        return fail(str(exc), EXIT_BAD_INPUT)
    with_torch = _torch_available()
    schedule = make_schedule(seed=seed, workers=workers, jobs=jobs, duration=duration,
                             sigterm_rate=sigterm_rate, sigkill_rate=sigkill_rate,
                             freeze_rate=freeze_rate, db_restart=db_restart,
                             with_torch=with_torch, db_stall=db_stall,
                             cut_replies=cut_replies)
    drill: Drill | None = None
    report: Report | None = None
    error: tuple[str, int] | None = None
    try:
        with _interruptible():
            drill = Drill(settings, schedule, pg=pg, echo=None if as_json else echo)
            if not with_torch:
                drill.notes.append("torch, scikit-learn or safetensors is missing: the "
                                   "drill ran sleep jobs only")
            report = drill.run()
    except KeyboardInterrupt:
        error = ("chaos drill interrupted; its workers were stopped and its temporary "
                 "files removed", EXIT_INTERRUPTED)
    except DatabaseUnavailable as exc:
        error = (str(exc), EXIT_FAILED)
    except StoreError as exc:
        error = (str(exc), EXIT_BAD_INPUT)
    except ChaosError as exc:
        error = (f"chaos drill aborted: {exc}", EXIT_FAILED)
    finally:
        if drill is not None:
            with _no_interrupts():
                drill.abort()
                keep = None
                if report is not None and not report.ok:
                    # A failed drill is worth its logs: keep them beside the store's data.
                    keep = settings.home / "chaos-logs" / time.strftime("%Y%m%d-%H%M%S")
                kept = drill.cleanup(keep)
                if report is not None:
                    report.kept_logs = kept
    if error is not None:
        return fail(*error)
    if report is None:
        return EXIT_FAILED
    echo(json.dumps(report.to_json(), indent=2) if as_json else "\n" + format_report(report))
    return 0 if report.ok else EXIT_FAILED


def reference_main() -> int:
    """Child process: read [{key, params}] on stdin; one JSON line per reference run."""
    # start-up: the reference child's imports (torch) stay out of `spotrun chaos --help`
    from spotrun.local import run_inline

    # start-up: torch, imported here before the clock starts
    from spotrun.pipelines import digits  # noqa: F401

    for item in json.load(sys.stdin):
        start = time.perf_counter()
        try:
            result = run_inline("digits-train", item["params"])
            out = {"key": item["key"], "weights_sha256": result["weights_sha256"],
                   "seconds": round(time.perf_counter() - start, 3)}
        except Exception as exc:
            out = {"key": item["key"], "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(out), flush=True)
    return 0

