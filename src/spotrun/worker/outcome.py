"""What decides a hand-back: a stopped job's outcome, as pure functions.

Given why a job stopped (``StopReason``), its ``on_preempt`` policy, what its checkpoints
are (``CheckpointState``) and, for a preemption, whether it escalates to on-demand, these
functions say which one fenced write to make (hand back, fail, cancelled; counted as a
preemption or not; checkpoint kept or dropped) and the event of the job's history, as its
typed payload (``spotrun.events``: the words are rendered from it). The runner and the
stop path only carry the answer out: nothing here reads a clock, a store or a thread.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Literal

from spotrun.events import (
    CancelCause,
    Cancelled,
    Escalated,
    FailCause,
    Failed,
    HandBackCause,
    HandedBack,
    Preempted,
    Resume,
    ResumeHow,
)
from spotrun.jobs import OnPreempt
from spotrun.policy import escalation as escalation_of


class StopReason(enum.Enum):
    """Why a running job was asked to stop."""

    PREEMPTED = "preempted"  # a notice: SIGTERM or a cloud's metadata service
    SHUTDOWN = "shutdown"  # the operator stopped the worker (SIGINT)
    CANCELLED = "cancelled"
    TIMED_OUT = "timed out"
    LEASE_LOST = "lease lost"


# The stops a notice asks for: they checkpoint at the next step boundary.
NOTICES = (StopReason.PREEMPTED, StopReason.SHUTDOWN)
# Stops that no notice's deadline bounds: a pipeline that ignores one past the grace period
# is abandoned (the words name the stop in the worker's log). Not a lost lease: nothing of
# that job can be written any more, and a zombie's slow step (an import of torch on a
# loaded machine) must not cost its worker a restart.
UNWAITED = {StopReason.CANCELLED: "cancel", StopReason.TIMED_OUT: "time limit"}

@dataclass(frozen=True)
class NoticeCheckpoint:
    """The checkpoint a notice got."""

    step: int
    path: str
    seconds: float
    reused: bool = False  # committed at this step already (periodic), not written again


@dataclass(frozen=True)
class CheckpointState:
    """What an attempt knows of its job's checkpoints."""

    step: int | None = None  # the step of the job's committed checkpoint, if any
    path: str | None = None  # that checkpoint (the job's pointer)
    notice: NoticeCheckpoint | None = None  # saved for the notice
    error: str | None = None  # why the notice's checkpoint could not be saved


NO_CHECKPOINT = Resume(ResumeHow.NONE)

Action = Literal["hand_back", "fail", "cancel", "none"]
StopEvent = Preempted | HandedBack | Failed | Cancelled


@dataclass(frozen=True)
class StopOutcome:
    """What to write for a job that stopped: one of the store's final or hand-back writes,
    and its event. ``action`` "none": nothing of this attempt may be written (another
    attempt owns the job)."""

    action: Action
    event: StopEvent | None
    preempted: bool = False  # counts in the job's preemptions (and may escalate it)
    keep_checkpoint: bool = True
    cleanup: bool = False  # the job ended or restarts: its checkpoint files can go
    escalation: Escalated | None = None  # the hand-back moves the job to another pool

    @property
    def message(self) -> str:
        """The words of the write: a failure's error, a hand-back's history line."""
        if self.event is None:
            return ""
        return self.event.error if isinstance(self.event, Failed) else self.event.message()

    @property
    def escalate_to(self) -> str | None:
        return None if self.escalation is None else self.escalation.to_pool

    @property
    def may_escalate(self) -> bool:
        """A preemption that keeps its checkpoint may move the job to on-demand."""
        return self.action == "hand_back" and self.preempted and self.keep_checkpoint

    def escalated(self, why: Escalated | None) -> StopOutcome:
        """This outcome, moved to another pool if ``why`` (the escalation's event)."""
        if why is None or not self.may_escalate:
            return self
        return replace(self, escalation=why)


def stop_outcome(reason: StopReason | None, policy: OnPreempt, *, worker: str, step: int,
                 total: int | None, detail: str = "", resume: Resume = NO_CHECKPOINT,
                 in_flight: bool = False, unwinding: str | None = None) -> StopOutcome:
    """The one policy for a job stopped on purpose, at a step boundary or not.

    ``reason`` None: the pipeline stopped without being asked to. ``resume`` says what the
    next attempt resumes from; ``in_flight``: the pipeline never reached a step boundary
    (the deadline, or a hung step, forced the stop); ``unwinding``: the error the pipeline
    raised while it unwound after the stop was asked for. Only a preemption (SIGTERM, a
    cloud's notice) applies ``on_preempt``; SIGINT is an operator stopping the worker and
    hands the job back whatever its policy.
    """
    if reason is None:
        return StopOutcome("fail", Failed("the pipeline stopped without being asked to",
                                          FailCause.PIPELINE, worker=worker, step=step,
                                          total=total), cleanup=True)
    if reason is StopReason.LEASE_LOST:
        return StopOutcome("none", None)
    if reason is StopReason.CANCELLED:
        return StopOutcome("cancel", Cancelled(CancelCause.RUNNING), cleanup=True)
    if reason is StopReason.TIMED_OUT:
        return StopOutcome("fail", Failed.timed_out(step=step, total=total, limit=detail,
                                                    in_flight=in_flight, unwinding=unwinding),
                           cleanup=True)
    if reason is StopReason.SHUTDOWN:
        return StopOutcome("hand_back", HandedBack(worker, step, total, HandBackCause.STOPPED,
                                                   resume, in_flight, unwinding))
    if policy is OnPreempt.FAIL:
        return StopOutcome("fail", Failed.preempted(worker=worker, step=step, total=total,
                                                    in_flight=in_flight, unwinding=unwinding),
                           cleanup=True)
    if policy is OnPreempt.RESTART:
        return StopOutcome("hand_back", Preempted(worker, step, total, OnPreempt.RESTART,
                                                  resume, in_flight, unwinding),
                           preempted=True, keep_checkpoint=False, cleanup=True)
    return StopOutcome("hand_back", Preempted(worker, step, total, OnPreempt.RESUME, resume,
                                              in_flight, unwinding), preempted=True)


def resume_of(ck: CheckpointState) -> Resume:
    """What the next attempt resumes from, as the stop's event tells it."""
    if ck.notice is not None:
        if ck.notice.reused:
            return Resume(ResumeHow.REUSED, ck.notice.step)
        return Resume(ResumeHow.SAVED, ck.notice.step, ck.notice.seconds)
    if ck.error is not None:
        return Resume(ResumeHow.FAILED, ck.step, error=ck.error)
    if ck.step is not None:
        return Resume(ResumeHow.KEPT, ck.step)
    return Resume(ResumeHow.NONE)


def checkpoint_words(ck: CheckpointState) -> str:
    """What the next attempt resumes from, in the words of the hand-back."""
    return resume_of(ck).words()


def decide(reason: StopReason | None, policy: OnPreempt, checkpoint: CheckpointState, *,
           worker: str, step: int, total: int | None, detail: str = "",
           in_flight: bool = False, unwinding: str | None = None,
           escalation: Escalated | None = None) -> StopOutcome:
    """The write and the event for a stopped job, its checkpoint state and escalation
    (``escalation``: why it moves to on-demand, if it does; see ``escalation_for``)."""
    return stop_outcome(reason, policy, worker=worker, step=step, total=total, detail=detail,
                        resume=resume_of(checkpoint), in_flight=in_flight,
                        unwinding=unwinding).escalated(escalation)


def escalation_for(*, preemptions: int, max_preemptions: int | None,
                   default_max_preemptions: int, deadline: float | None, created: float,
                   job_pool: str | None, worker_pool: str, step: int, total: int | None,
                   now: float) -> Escalated | None:
    """Why a job preempted ``preemptions`` times before this one, stopped now at ``step``,
    moves to on-demand (None: it stays). Its own ``max_preemptions`` wins over the worker's
    default; a job with no pool of its own runs in the worker's."""
    return escalation_of(
        preemptions=preemptions + 1,
        max_preemptions=default_max_preemptions if max_preemptions is None
        else max_preemptions,
        deadline=deadline, now=now, created=created, step=step, total=total,
        pool=job_pool if job_pool else worker_pool)
