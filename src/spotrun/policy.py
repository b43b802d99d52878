"""Decisions a worker takes about a job from what the store has observed.

- Escalation: a job preempted more than its limit, or that can no longer make its deadline
  at the progress rate it has achieved so far, moves to the on-demand pool. The deadline
  rule follows the "uniform progress" idea of Can't Be Late (NSDI 2024): a job must keep
  making progress at the rate its deadline requires; once the rate it actually achieved on
  spot capacity (preemptions, queueing and redone work included) falls short of what the
  remaining work needs, it stops gambling on spot.
- Periodic checkpoints: every sqrt(2 C M) seconds (Young/Daly), with C what a checkpoint
  of this job costs and M the mean time between unannounced interruptions (expired leases)
  observed in its pool: a preemption with notice is covered by the checkpoint taken on
  notice, so periodic checkpoints only insure against losses without one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from spotrun.events import ON_DEMAND as ON_DEMAND
from spotrun.events import Escalated, EscalationWhy

# Until a pool has history, assume one interruption per hour of worker time: the prior
# weighs as one observed hour, so a few real preemptions quickly dominate it.
PRIOR_MTBF_SECONDS = 3600.0
# Until a job's first checkpoint is measured, assume it costs a second.
PRIOR_CHECKPOINT_SECONDS = 1.0
# Escalate when the achieved rate covers less than this share of the margin-padded need.
DEADLINE_MARGIN = 1.1


def young_daly_interval(checkpoint_seconds: float, mtbf_seconds: float, lo: float,
                        hi: float) -> float:
    """Seconds of work between periodic checkpoints: Young/Daly's sqrt(2 C M), in [lo, hi].

    C is what one checkpoint costs, M the mean time between preemptions of a worker. It
    balances time spent checkpointing (C per interval) against work lost per preemption
    (about half an interval). With no preemptions (M infinite) it is ``hi``.
    """
    if not lo <= hi:
        raise ValueError(f"young_daly_interval: lo={lo} is above hi={hi}")
    if checkpoint_seconds < 0 or not mtbf_seconds > 0:
        raise ValueError("young_daly_interval: needs checkpoint_seconds >= 0 and "
                         "mtbf_seconds > 0")
    if math.isinf(mtbf_seconds):
        return hi
    return min(hi, max(lo, math.sqrt(2.0 * checkpoint_seconds * mtbf_seconds)))


def escalation(*, preemptions: int, max_preemptions: int, deadline: float | None,
               now: float, created: float, step: int, total: int | None,
               pool: str | None) -> Escalated | None:
    """Whether a job just preempted (``preemptions`` counts this one) should go on-demand,
    and why (the event to write), or None."""
    if pool == ON_DEMAND:
        return None
    if preemptions > max_preemptions:
        return Escalated(EscalationWhy.MAX_PREEMPTIONS, ON_DEMAND, pool,
                         preemptions=preemptions, max_preemptions=max_preemptions)
    if deadline is None or not total:
        return None
    left = deadline - now
    remaining = max(0, total - step)
    if left <= 0:
        return Escalated(EscalationWhy.DEADLINE_PASSED, ON_DEMAND, pool, left_seconds=left)
    elapsed = max(now - created, 1e-9)
    rate = step / elapsed
    if rate * left < remaining * DEADLINE_MARGIN:
        return Escalated(EscalationWhy.DEADLINE_RATE, ON_DEMAND, pool, rate=rate,
                         remaining=remaining,
                         need_seconds=remaining / rate if rate > 0 else None,
                         left_seconds=left)
    return None


def escalation_reason(*, preemptions: int, max_preemptions: int, deadline: float | None,
                      now: float, created: float, step: int, total: int | None,
                      pool: str | None) -> str | None:
    """:func:`escalation` in words (its event's message), or None."""
    why = escalation(preemptions=preemptions, max_preemptions=max_preemptions,
                     deadline=deadline, now=now, created=created, step=step, total=total,
                     pool=pool)
    return None if why is None else why.message()


@dataclass(frozen=True)
class CheckpointInterval:
    seconds: float
    explanation: str  # the formula and its inputs
    summary: str = ""  # the same choice in plain words


def checkpoint_interval(*, checkpoint_seconds: float | None, lived_seconds: float,
                        interruptions: int, lo: float, hi: float) -> CheckpointInterval:
    """The Young/Daly interval for a job, with a sentence a user can read."""
    cost = PRIOR_CHECKPOINT_SECONDS if checkpoint_seconds is None else checkpoint_seconds
    mtbf = (lived_seconds + PRIOR_MTBF_SECONDS) / (interruptions + 1)
    seconds = young_daly_interval(cost, mtbf, lo, hi)
    cost_words = ("about 1 s (not measured yet)" if checkpoint_seconds is None
                  else f"{cost:.3g} s")
    seen = (f"{interruptions} lost without notice in {lived_seconds / 3600:.1f} worker-hours"
            if interruptions else "none lost without notice yet, so a prior of one an hour")
    return CheckpointInterval(seconds, (
        f"periodic checkpoints every {seconds:.0f} s: the Young/Daly optimum sqrt(2 x C x M) "
        f"with C = {cost_words} per checkpoint and M = {mtbf:.0f} s between workers lost "
        f"without notice in this pool ({seen}), kept within {lo:g}-{hi:g} s"),
        f"checkpoints every {seconds:.0f} s, chosen from how often this pool loses machines "
        "and how long a checkpoint takes")
