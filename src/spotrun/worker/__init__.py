"""The worker: claim, run, heartbeat, checkpoint, hand back, complete.

Its parts, one job each:

- ``loop``: ``Worker``, the claim loop, the notice handling, the stop path, exit codes;
- ``runner``: ``JobRunner``, runs one job's pipeline on its thread and makes its write;
- ``outcome``: what decides a hand-back (pure): stop reason, policy, checkpoint state and
  escalation in, the write to make and its words out;
- ``schedule``: when a checkpoint is due (notice, advisory, every N steps or T seconds);
- ``reporter``: the reporter thread, where leases are renewed, progress is written and
  lapsed leases are swept (behind the sweep guard);
- ``state``: what a job's threads share, behind one lock, and its bounded log buffer;
- ``retry``: database calls that ride out an outage.
"""

from __future__ import annotations

from spotrun.events import seconds
from spotrun.worker.loop import EXIT_STUCK, Worker, detect_cuda
from spotrun.worker.outcome import (
    CheckpointState,
    StopOutcome,
    StopReason,
    checkpoint_words,
    decide,
    stop_outcome,
)
from spotrun.worker.runner import JobRunner
from spotrun.worker.state import (
    LOG_BYTES_PER_ATTEMPT,
    LOG_LINES_PER_ATTEMPT,
    JobLogHandler,
)

# The name tests and plugins have imported the log buffer by.
_JobLogHandler = JobLogHandler

__all__ = [
    "EXIT_STUCK",
    "LOG_BYTES_PER_ATTEMPT",
    "LOG_LINES_PER_ATTEMPT",
    "CheckpointState",
    "JobLogHandler",
    "JobRunner",
    "StopOutcome",
    "StopReason",
    "Worker",
    "checkpoint_words",
    "decide",
    "detect_cuda",
    "seconds",
    "stop_outcome",
]
