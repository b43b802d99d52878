"""What decides a hand-back: a stopped job's outcome, as pure functions.

Given why a job stopped (``StopReason``), its ``on_preempt`` policy, what its checkpoints
are (``CheckpointState``) and, for a preemption, whether it escalates to on-demand, these
functions say which one fenced write to make (hand back, fail, cancelled; counted as a
preemption or not; checkpoint kept or dropped) and the words of the job's history. The
runner and the stop path only carry the answer out: nothing here reads a clock, a store
or a thread.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Literal

from spotrun.jobs import OnPreempt
from spotrun.policy import ON_DEMAND, escalation_reason


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


def seconds(x: float) -> str:
    """A duration as people read it: 0.004 s, 0.12 s, 3.4 s."""
    return f"{x:.3f} s" if x < 0.1 else f"{x:.2f} s" if x < 10 else f"{x:.1f} s"


@dataclass(frozen=True)
class Checkpointed:
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
    notice: Checkpointed | None = None  # saved for the notice
    error: str | None = None  # why the notice's checkpoint could not be saved


Action = Literal["hand_back", "fail", "cancel", "none"]


@dataclass(frozen=True)
class StopOutcome:
    """What to write for a job that stopped: one of the store's final or hand-back writes.

    ``action`` "none": nothing of this attempt may be written (another attempt owns the job).
    """

    action: Action
    message: str
    preempted: bool = False  # counts in the job's preemptions (and may escalate it)
    keep_checkpoint: bool = True
    cleanup: bool = False  # the job ended or restarts: its checkpoint files can go
    escalate_to: str | None = None  # the pool the hand-back moves the job to
    escalation: str = ""  # why, for the job's history

    @property
    def may_escalate(self) -> bool:
        """A preemption that keeps its checkpoint may move the job to on-demand."""
        return self.action == "hand_back" and self.preempted and self.keep_checkpoint

    def escalated(self, why: str | None) -> StopOutcome:
        """This outcome, moved to the on-demand pool if ``why`` (the escalation's words)."""
        if not why or not self.may_escalate:
            return self
        return replace(self, escalate_to=ON_DEMAND, escalation=why)


def stop_outcome(reason: StopReason | None, policy: OnPreempt, *, worker: str, where: str,
                 detail: str = "", resume: str = "", in_flight: bool = False,
                 unwinding: str | None = None) -> StopOutcome:
    """The one policy for a job stopped on purpose, at a step boundary or not.

    ``reason`` None: the pipeline stopped without being asked to. ``resume`` says what the
    next attempt resumes from; ``in_flight``: the pipeline never reached a step boundary
    (the deadline, or a hung step, forced the stop); ``unwinding``: the error the pipeline
    raised while it unwound after the stop was asked for. Only a preemption (SIGTERM, a
    cloud's notice) applies ``on_preempt``; SIGINT is an operator stopping the worker and
    hands the job back whatever its policy.
    """
    at = f"at {where}" + (" before the step in flight finished" if in_flight else "")
    tail = f"; the pipeline raised {unwinding} while it unwound" if unwinding else ""
    if reason is None:
        return StopOutcome("fail", "the pipeline stopped without being asked to", cleanup=True)
    if reason is StopReason.LEASE_LOST:
        return StopOutcome("none", f"the lease was lost: {detail}" if detail
                           else "the lease was lost")
    if reason is StopReason.CANCELLED:
        return StopOutcome("cancel", "cancelled at the user's request" + tail, cleanup=True)
    if reason is StopReason.TIMED_OUT:
        hung = "; the step in flight never returned" if in_flight else ""
        return StopOutcome("fail", f"stopped {'at ' + where}: {detail}{hung}{tail}",
                           cleanup=True)
    if reason is StopReason.SHUTDOWN:
        return StopOutcome("hand_back", f"worker {worker} was stopped {at}; {resume}{tail}")
    if policy is OnPreempt.FAIL:
        return StopOutcome("fail", f"the machine running this job ({worker}) was preempted "
                           f"{at}; this job asked not to be resumed (on_preempt=fail), so it "
                           f"was stopped{tail}", cleanup=True)
    if policy is OnPreempt.RESTART:
        return StopOutcome("hand_back", f"preempted on {worker} {at}; it will restart from "
                           f"the beginning (on_preempt=restart){tail}", preempted=True,
                           keep_checkpoint=False, cleanup=True)
    return StopOutcome("hand_back", f"preempted on {worker} {at}; {resume}{tail}",
                       preempted=True)


def checkpoint_words(ck: CheckpointState) -> str:
    """What the next attempt resumes from, in the words of the hand-back."""
    if ck.notice is not None:
        if ck.notice.reused:
            return f"the checkpoint at step {ck.notice.step} was saved at that step already"
        return f"checkpoint saved in {seconds(ck.notice.seconds)}"
    if ck.error is not None:
        fallback = (f"it will resume from the checkpoint at step {ck.step}"
                    if ck.step is not None else "the next attempt starts from the beginning")
        return f"the checkpoint could not be saved ({ck.error}); {fallback}"
    if ck.step is not None:
        return f"will resume from the checkpoint at step {ck.step}"
    return "no checkpoint, the next attempt starts from the beginning"


def decide(reason: StopReason | None, policy: OnPreempt, checkpoint: CheckpointState, *,
           worker: str, where: str, detail: str = "", in_flight: bool = False,
           unwinding: str | None = None, escalation: str | None = None) -> StopOutcome:
    """The write and the words for a stopped job, its checkpoint state and escalation
    (``escalation``: why it moves to on-demand, if it does; see ``escalation_for``)."""
    return stop_outcome(reason, policy, worker=worker, where=where, detail=detail,
                        resume=checkpoint_words(checkpoint), in_flight=in_flight,
                        unwinding=unwinding).escalated(escalation)


def escalation_for(*, preemptions: int, max_preemptions: int | None,
                   default_max_preemptions: int, deadline: float | None, created: float,
                   job_pool: str | None, worker_pool: str, step: int, total: int | None,
                   now: float) -> str | None:
    """Why a job preempted ``preemptions`` times before this one, stopped now at ``step``,
    moves to on-demand (None: it stays). Its own ``max_preemptions`` wins over the worker's
    default; a job with no pool of its own runs in the worker's."""
    return escalation_reason(
        preemptions=preemptions + 1,
        max_preemptions=default_max_preemptions if max_preemptions is None
        else max_preemptions,
        deadline=deadline, now=now, created=created, step=step, total=total,
        pool=job_pool if job_pool else worker_pool)
