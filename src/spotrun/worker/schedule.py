"""When a running job checkpoints: at a notice, on an advisory, and periodically.

A periodic checkpoint comes every N steps if the job (or the worker) asks for that, and
every T seconds: a fixed T if asked for, else Young/Daly's interval (``policy.py`` holds the
formula), chosen once the job has run ``checkpoint_min_seconds`` from this job's measured
checkpoint cost and its pool's interruptions. The schedule reads no clock and no store:
its caller passes the times and the pool's history in.
"""

from __future__ import annotations

from spotrun.config import Settings
from spotrun.jobs import OnPreempt
from spotrun.policy import CheckpointInterval, checkpoint_interval
from spotrun.worker.outcome import CheckpointState


def notice_checkpoint_due(policy: OnPreempt, checkpoint: CheckpointState, *,
                          abandoned: bool) -> bool:
    """After a notice: checkpoint once at the next step boundary, if the job resumes from
    checkpoints, none was saved or tried for this notice, and the job is still ours."""
    return (policy is OnPreempt.RESUME and checkpoint.notice is None
            and checkpoint.error is None and not abandoned)


class CheckpointSchedule:
    """The periodic checkpoint schedule of one attempt of a job."""

    def __init__(self, *, every_steps: int | None, every_seconds: float | None,
                 min_seconds: float, max_seconds: float) -> None:
        self.every_steps = every_steps
        # A fixed period if asked for, else Young/Daly (until chosen: the longest period).
        self.adaptive = every_seconds is None
        self.every_seconds: float = every_seconds or max_seconds
        self.min_seconds = min_seconds
        self.max_seconds = max_seconds
        self.cost: float | None = None  # what this job's first checkpoint took, seconds
        self.interval_set = False

    @classmethod
    def for_job(cls, every_steps: int | None, every_seconds: float | None,
                settings: Settings) -> CheckpointSchedule:
        """A job's schedule: its own settings, else the worker's."""
        return cls(
            every_steps=settings.checkpoint_every_steps if every_steps is None
            else every_steps,
            every_seconds=settings.checkpoint_every_seconds if every_seconds is None
            else every_seconds,
            min_seconds=settings.checkpoint_min_seconds,
            max_seconds=settings.checkpoint_max_seconds)

    @staticmethod
    def may_checkpoint(step: int, last_step: int | None) -> bool:
        """Not at step 0, nor again at the step of the committed checkpoint."""
        return step != 0 and step != last_step

    def needs_interval(self, run_seconds: float) -> bool:
        """Whether to choose the Young/Daly interval now: only jobs that run long enough to
        need a periodic checkpoint pay for the choice."""
        return self.adaptive and not self.interval_set and run_seconds >= self.min_seconds

    def choose(self, *, lived_seconds: float, interruptions: int) -> CheckpointInterval:
        """Choose the interval from the pool's history and this job's cost (or its prior)."""
        chosen = checkpoint_interval(checkpoint_seconds=self.cost, lived_seconds=lived_seconds,
                                     interruptions=interruptions, lo=self.min_seconds,
                                     hi=self.max_seconds)
        self.every_seconds = chosen.seconds
        self.interval_set = True
        return chosen

    def measured(self, cost: float) -> bool:
        """Record a committed checkpoint's cost; True if the interval is to be chosen again
        (the first measured cost replaces the prior the interval was chosen with)."""
        if self.cost is not None or not self.adaptive:
            return False
        self.cost = cost
        return self.interval_set

    def periodic_due(self, step: int, last_step: int | None, since_last: float) -> bool:
        """Whether a periodic checkpoint is due at ``step``, ``since_last`` seconds after
        the last one (or this attempt's start)."""
        if self.every_steps:
            if last_step is not None and step - last_step >= self.every_steps:
                return True
            if last_step is None and step >= self.every_steps:
                return True
        return bool(self.every_seconds) and since_last >= self.every_seconds
