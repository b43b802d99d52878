"""What a running job's threads share, behind one lock.

A job's runner thread, the reporter thread and the main thread (the claim loop and the
stop path) all see one ``RunnerState`` per job: its progress, the stop asked for, its
checkpoint state, the flags of the stop path. Every change goes through a method here;
values are handed out as copies or immutable snapshots, so no reader sees a half-made
update. The job's log lines wait in a ``JobLogHandler``, bounded, until they are written.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import Any

from spotrun.events import where
from spotrun.jobs import Progress
from spotrun.worker.outcome import UNWAITED, CheckpointState, StopReason

LOG_LINES_PER_ATTEMPT = 2000
LOG_BYTES_PER_ATTEMPT = 256_000


class RunnerState:
    """One running job's state shared between threads; every method is thread-safe."""

    def __init__(self, progress: Progress, checkpoint: CheckpointState, now: float) -> None:
        self._lock = threading.Lock()
        self._step, self._total = progress.step, progress.total
        self._metrics: dict[str, Any] = {}
        self._dirty = False  # progress reported since the last write of it
        self._stop: StopReason | None = None
        self._stop_detail = ""
        self._stop_mono: float | None = None  # when the stop was asked for
        self._checkpoint = checkpoint
        self._checkpoint_mono = now  # the last checkpoint (or failed try): the period's start
        self._early_checkpoint = False  # an advisory asked for a checkpoint now
        self._abandoned = False  # the main thread ended the job without its runner
        # Set before the final write: from then on the reporter leaves this job alone, so
        # a heartbeat racing the result is not mistaken for a lost lease.
        self._finishing = False
        self.write_failed = False  # set before ``done``: the stop path's write never landed
        self.done = threading.Event()  # the runner is through with this job

    # ---------------------------------------------------------------- progress

    def report(self, step: int, total: int | None, metrics: dict[str, Any]) -> None:
        with self._lock:
            self._step, self._total, self._metrics, self._dirty = step, total, metrics, True

    def moved(self) -> Progress | None:
        """The progress reported since the last one taken (a copy, from now on counted as
        written), or None: a heartbeat carries it only when the job moved."""
        with self._lock:
            if not self._dirty:
                return None
            self._dirty = False
            return Progress(self._step, self._total, dict(self._metrics))

    def take_progress(self) -> Progress:
        """The last progress (a copy), from now on counted as written."""
        with self._lock:
            self._dirty = False
            return Progress(self._step, self._total, dict(self._metrics))

    @property
    def step(self) -> int:
        return self._step

    @property
    def total(self) -> int | None:
        return self._total

    def where(self) -> str:
        """Where the job is, for its history: "step 3/9"."""
        with self._lock:
            step, total = self._step, self._total
        return where(step, total)

    # -------------------------------------------------------------------- stop

    def request_stop(self, reason: StopReason, detail: str, now: float) -> bool:
        """Ask the job to stop; the first request wins. Whether this one was the first."""
        with self._lock:
            if self._stop is not None:
                return False
            self._stop, self._stop_detail, self._stop_mono = reason, detail, now
            return True

    @property
    def stop_reason(self) -> StopReason | None:
        return self._stop

    @property
    def stop_detail(self) -> str:
        return self._stop_detail

    def hung(self, grace: float, now: float) -> bool:
        """A cancel or a time limit that the pipeline has ignored for longer than ``grace``
        (and that no other path is ending already)."""
        with self._lock:
            return (self._stop in UNWAITED and self._stop_mono is not None
                    and now - self._stop_mono > grace and not self.done.is_set()
                    and not self._abandoned and not self._finishing)

    # ------------------------------------------------------------- checkpoints

    @property
    def checkpoint(self) -> CheckpointState:
        return self._checkpoint

    def update_checkpoint(self, *, now: float | None = None, **changes: Any) -> None:
        """Record checkpoint facts (``CheckpointState`` fields); ``now``: a checkpoint was
        committed or tried, the period starts again."""
        with self._lock:
            if changes:
                self._checkpoint = replace(self._checkpoint, **changes)
            if now is not None:
                self._checkpoint_mono = now

    @property
    def checkpoint_mono(self) -> float:
        return self._checkpoint_mono

    def ask_checkpoint(self) -> None:
        """Checkpoint at the next step boundary (an advisory: the risk went up)."""
        with self._lock:
            self._early_checkpoint = True

    def take_checkpoint_request(self) -> bool:
        """Whether a checkpoint was asked for since the last call."""
        with self._lock:
            asked, self._early_checkpoint = self._early_checkpoint, False
            return asked

    # ------------------------------------------------------ the final write

    def abandon(self) -> None:
        """The main thread ends this job without its runner (a stuck step)."""
        with self._lock:
            self._abandoned = True

    @property
    def abandoned(self) -> bool:
        return self._abandoned

    def finish(self) -> None:
        """The runner is about to write the job's outcome."""
        with self._lock:
            self._finishing = True

    @property
    def finishing(self) -> bool:
        return self._finishing

    def reported(self) -> bool:
        """Whether the reporter still renews this job's lease and writes its progress."""
        with self._lock:
            return not (self.done.is_set() or self._abandoned or self._finishing)


class JobLogHandler(logging.Handler):
    """Buffers a job's log lines, bounded in size, until the reporter writes them."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[float, str, str]] = []
        self.count = 0
        self.nbytes = 0
        self.truncated = False
        self._lock2 = threading.Lock()
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        msg = self.format(record)
        with self._lock2:
            if self.truncated:
                return
            if self.count >= LOG_LINES_PER_ATTEMPT or self.nbytes + len(msg) > \
                    LOG_BYTES_PER_ATTEMPT:
                self.truncated = True
                self.lines.append((record.created, "WARNING",
                                   "log truncated: this attempt wrote more than the "
                                   f"{LOG_LINES_PER_ATTEMPT} lines / "
                                   f"{LOG_BYTES_PER_ATTEMPT // 1000} kB kept per attempt"))
                return
            self.count += 1
            self.nbytes += len(msg)
            self.lines.append((record.created, record.levelname, msg))

    def take(self) -> list[tuple[float, str, str]]:
        with self._lock2:
            lines, self.lines = self.lines, []
        return lines
