"""The facts of a job's history: one typed payload per event kind, and its words.

An event is a kind plus a payload; the payload is stored as JSON in ``events.data`` and
the event's message is rendered from it (:meth:`message`), never the other way round.
Whoever needs a fact of the history (cost, the chaos audit) reads it with
:func:`payload_of`. Rows written before payloads existed carry no data:
:func:`read_legacy` recovers their payload from their words, and is the only code that
reads an event's message. Plain values, no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from spotrun.jobs import Event, EventKind, OnPreempt

# The version of the JSON shape in events.data; a row without it was written before
# payloads existed (at most ``{"detail": ...}``) and is read by :func:`read_legacy`.
DATA_VERSION = 1
ON_DEMAND = "on-demand"


def seconds(x: float) -> str:
    """A duration as people read it: 0.004 s, 0.12 s, 3.4 s."""
    return f"{x:.3f} s" if x < 0.1 else f"{x:.2f} s" if x < 10 else f"{x:.1f} s"


def where(step: int | None, total: int | None) -> str:
    """``step 40/100``, or ``step 40`` when the total is not known."""
    return f"step {step}/{total}" if total else f"step {step}"


def _at(step: int | None, total: int | None, in_flight: bool) -> str:
    return f"at {where(step, total)}" + (" before the step in flight finished"
                                         if in_flight else "")


def _tail(unwinding: str | None) -> str:
    return f"; the pipeline raised {unwinding} while it unwound" if unwinding else ""


# ---------------------------------------------------------------- parts of payloads


class ResumeHow(enum.StrEnum):
    """What a stopped attempt leaves the next one to resume from."""

    SAVED = "saved"  # a checkpoint saved on the stop, at ``step``
    REUSED = "reused"  # the periodic checkpoint of this very step serves the stop
    FAILED = "failed"  # saving one failed; ``step``: the previous one, or None
    KEPT = "kept"  # no new one; ``step``: the last one (None: not said)
    NONE = "none"  # no checkpoint: the next attempt starts from the beginning


@dataclass(frozen=True)
class Resume:
    """Where the next attempt of a stopped job resumes, and how that came to be."""

    how: ResumeHow
    step: int | None = None
    seconds: float | None = None  # SAVED: what saving the checkpoint took
    error: str | None = None  # FAILED: why it could not be saved

    def words(self) -> str:
        if self.how is ResumeHow.SAVED:
            return f"checkpoint saved in {seconds(self.seconds or 0.0)}"
        if self.how is ResumeHow.REUSED:
            return f"the checkpoint at step {self.step} was saved at that step already"
        if self.how is ResumeHow.FAILED:
            fallback = (f"it will resume from the checkpoint at step {self.step}"
                        if self.step is not None
                        else "the next attempt starts from the beginning")
            return f"the checkpoint could not be saved ({self.error}); {fallback}"
        if self.how is ResumeHow.KEPT and self.step is not None:
            return f"will resume from the checkpoint at step {self.step}"
        if self.how is ResumeHow.KEPT:
            return "will resume from its last checkpoint"
        return "no checkpoint, the next attempt starts from the beginning"

    @property
    def from_beginning(self) -> bool:
        """Whether the next attempt starts over (no checkpoint to resume from)."""
        return self.how is ResumeHow.NONE or (self.how is ResumeHow.FAILED
                                               and self.step is None)


class HandBackCause(enum.StrEnum):
    STOPPED = "stopped"  # the worker was stopped (SIGINT): no preemption
    CHECKPOINT_UNREADABLE = "checkpoint_unreadable"  # the checkpoint store was out of reach


class CancelCause(enum.StrEnum):
    QUEUED = "queued"  # cancelled before it started
    RUNNING = "running"  # the running job stopped at the user's request
    LEASE_EXPIRED = "lease_expired"  # a cancel was asked, then its worker vanished


class FailCause(enum.StrEnum):
    PIPELINE = "pipeline"  # the pipeline raised (or returned without being asked to stop)
    TIMED_OUT = "timed_out"  # its time limit
    PREEMPTED = "preempted"  # preempted, and on_preempt=fail
    LEASE_EXPIRED = "lease_expired"  # lost its worker more than max_retries times
    WORKER = "worker"  # a fault of the worker itself
    WORKER_DIED = "worker_died"  # its worker's process died under it, max_retries+1 times
    MEMORY_LIMIT = "memory_limit"  # an allocation past the worker's per-job memory limit


class EscalationWhy(enum.StrEnum):
    MAX_PREEMPTIONS = "max_preemptions"
    DEADLINE_PASSED = "deadline_passed"
    DEADLINE_RATE = "deadline_rate"  # the rate achieved cannot make the deadline


# ------------------------------------------------------------------------ payloads


class _Payload:
    """What every payload has: its kind, its words, its JSON (see :func:`to_json`)."""

    kind: ClassVar[EventKind]

    def message(self) -> str:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        return to_json(self)


@dataclass(frozen=True)
class Submitted(_Payload):
    kind: ClassVar[EventKind] = EventKind.SUBMITTED

    def message(self) -> str:
        return "queued"


@dataclass(frozen=True)
class Started(_Payload):
    """Claimed with nothing to resume from: a first start, or a restart from step 0."""

    kind: ClassVar[EventKind] = EventKind.STARTED
    worker: str
    attempt: int = 1

    def message(self) -> str:
        if self.attempt > 1:
            return (f"restarted on {self.worker} from the beginning "
                    f"(attempt {self.attempt})")
        return f"started on {self.worker}"


@dataclass(frozen=True)
class Resumed(_Payload):
    """Claimed with a checkpoint: the attempt resumes from ``step``."""

    kind: ClassVar[EventKind] = EventKind.RESUMED
    worker: str
    step: int
    total: int | None = None

    def message(self) -> str:
        return f"resumed on {self.worker} from step {self.step}" + (
            f"/{self.total}" if self.total else "")


@dataclass(frozen=True)
class Checkpointed(_Payload):
    """A periodic checkpoint committed (one taken on a notice is told by the stop)."""

    kind: ClassVar[EventKind] = EventKind.CHECKPOINT
    step: int | None  # None only for old rows whose words did not say
    seconds: float = 0.0

    def message(self) -> str:
        return f"checkpoint at step {self.step} saved in {seconds(self.seconds)}"


@dataclass(frozen=True)
class CheckpointUnusable(_Payload):
    """A checkpoint failed verification on load; the previous one (or none) is used."""

    kind: ClassVar[EventKind] = EventKind.CHECKPOINT_CORRUPT
    step: int | None
    error: str
    previous: bool = False  # whether the previous checkpoint is tried instead
    previous_step: int | None = None

    def message(self) -> str:
        fallback = (f"resuming from the previous checkpoint at step {self.previous_step}"
                    if self.previous else "starting from the beginning")
        return f"checkpoint at step {self.step} is unusable: {self.error}; {fallback}"


@dataclass(frozen=True)
class Preempted(_Payload):
    """Handed back on a preemption notice (SIGTERM, a cloud's notice); counts as one."""

    kind: ClassVar[EventKind] = EventKind.PREEMPTED
    worker: str
    step: int | None
    total: int | None = None
    policy: OnPreempt = OnPreempt.RESUME  # resume or restart (fail ends the job: Failed)
    resume: Resume = Resume(ResumeHow.NONE)
    in_flight: bool = False  # the deadline came before the step in flight finished
    unwinding: str | None = None  # what the pipeline raised while it unwound

    def message(self) -> str:
        at = _at(self.step, self.total, self.in_flight)
        if self.policy is OnPreempt.RESTART:
            return (f"preempted on {self.worker} {at}; it will restart from the beginning "
                    f"(on_preempt=restart){_tail(self.unwinding)}")
        return f"preempted on {self.worker} {at}; {self.resume.words()}{_tail(self.unwinding)}"

    @property
    def resumes_from(self) -> int | None:
        """The step the next attempt resumes from (0: the beginning)."""
        if self.policy is OnPreempt.RESTART or self.resume.from_beginning:
            return 0
        return self.resume.step

    @property
    def saved_seconds(self) -> float:
        """What the checkpoint saved on this stop took (0 without one)."""
        if self.policy is OnPreempt.RESTART or self.resume.how is not ResumeHow.SAVED:
            return 0.0
        return self.resume.seconds or 0.0


@dataclass(frozen=True)
class HandedBack(_Payload):
    """Back in the queue without a preemption: the worker was stopped (SIGINT), or it
    could not read the job's checkpoint."""

    kind: ClassVar[EventKind] = EventKind.HANDED_BACK
    worker: str
    step: int | None = None
    total: int | None = None
    cause: HandBackCause = HandBackCause.STOPPED
    resume: Resume = Resume(ResumeHow.KEPT)
    in_flight: bool = False
    unwinding: str | None = None
    error: str | None = None  # CHECKPOINT_UNREADABLE: why the store could not be read

    def message(self) -> str:
        if self.cause is HandBackCause.CHECKPOINT_UNREADABLE:
            return (f"{self.worker} could not read the job's checkpoint ({self.error}); "
                    "back in the queue with its checkpoint kept")
        return (f"worker {self.worker} was stopped {_at(self.step, self.total, self.in_flight)}"
                f"; {self.resume.words()}{_tail(self.unwinding)}")

    @property
    def resumes_from(self) -> int | None:
        return 0 if self.resume.from_beginning else self.resume.step

    @property
    def saved_seconds(self) -> float:
        return (self.resume.seconds or 0.0) if self.resume.how is ResumeHow.SAVED else 0.0


@dataclass(frozen=True)
class LeaseExpired(_Payload):
    """The worker vanished (its lease ran out); the job is back in the queue."""

    kind: ClassVar[EventKind] = EventKind.LEASE_EXPIRED
    worker: str
    step: int | None
    total: int | None = None
    retries: int | None = None  # the job's retries, this one counted
    max_retries: int | None = None
    # The worker's process was found gone (a dead pid on the sweeper's own host): the
    # kernel killed it, or it crashed. False: not known (another host, a frozen worker).
    died: bool = False

    def message(self) -> str:
        how = " (its process had died)" if self.died else ""
        return (f"lease of worker {self.worker} expired at {where(self.step, self.total)}"
                f"{how}; back in the queue")


@dataclass(frozen=True)
class Escalated(_Payload):
    """The job may from now on run only in ``to_pool``, and why."""

    kind: ClassVar[EventKind] = EventKind.ESCALATED
    why: EscalationWhy
    to_pool: str = ON_DEMAND
    from_pool: str | None = None
    preemptions: int | None = None
    max_preemptions: int | None = None
    rate: float | None = None  # steps/s achieved so far
    remaining: int | None = None  # steps left
    need_seconds: float | None = None  # at that rate (None: the rate is 0)
    left_seconds: float | None = None  # before the deadline

    def message(self) -> str:
        head = f"moved to the {self.to_pool} pool: "
        if self.why is EscalationWhy.MAX_PREEMPTIONS:
            return head + (f"preempted {self.preemptions} times, more than its limit of "
                           f"{self.max_preemptions} (max_preemptions)")
        if self.why is EscalationWhy.DEADLINE_PASSED:
            return head + "its deadline has passed"
        need = (f"{self.need_seconds:.0f} s" if self.need_seconds is not None
                else "more time than is left")
        return head + (f"at the {self.rate or 0.0:.2f} steps/s achieved so far on spot "
                       f"(preemptions included), the remaining {self.remaining} steps need "
                       f"{need}, but only {self.left_seconds or 0.0:.0f} s are left before "
                       "its deadline")


@dataclass(frozen=True)
class CancelRequested(_Payload):
    kind: ClassVar[EventKind] = EventKind.CANCEL_REQUESTED

    def message(self) -> str:
        return "cancel requested; the job stops at its next step"


@dataclass(frozen=True)
class Cancelled(_Payload):
    kind: ClassVar[EventKind] = EventKind.CANCELLED
    cause: CancelCause = CancelCause.RUNNING
    worker: str | None = None  # LEASE_EXPIRED: the worker that vanished
    step: int | None = None  # LEASE_EXPIRED: the step it had reached
    total: int | None = None
    run_seconds: float | None = None

    def message(self) -> str:
        if self.cause is CancelCause.QUEUED:
            return "cancelled at the user's request before it started"
        if self.cause is CancelCause.LEASE_EXPIRED:
            return (f"lease of worker {self.worker} expired at "
                    f"{where(self.step, self.total)}; cancelled as requested")
        return "cancelled at the user's request"


@dataclass(frozen=True)
class Succeeded(_Payload):
    kind: ClassVar[EventKind] = EventKind.SUCCEEDED
    run_seconds: float | None = None

    def message(self) -> str:
        return "succeeded"


@dataclass(frozen=True)
class Failed(_Payload):
    """The job ended failed. ``error`` is what the job's ``error`` says; the other
    fields are the facts behind it where the failure is a stop (``step``: where)."""

    kind: ClassVar[EventKind] = EventKind.FAILED
    error: str
    cause: FailCause | None = None
    worker: str | None = None
    step: int | None = None
    total: int | None = None
    in_flight: bool = False
    retries: int | None = None
    max_retries: int | None = None
    run_seconds: float | None = None

    def message(self) -> str:
        return f"failed: {self.error}"

    @classmethod
    def timed_out(cls, *, step: int, total: int | None, limit: str, in_flight: bool = False,
                  unwinding: str | None = None, run_seconds: float | None = None) -> Failed:
        """Stopped by its time limit (``limit`` says which)."""
        hung = "; the step in flight never returned" if in_flight else ""
        return cls(f"stopped at {where(step, total)}: {limit}{hung}{_tail(unwinding)}",
                   FailCause.TIMED_OUT, step=step, total=total, in_flight=in_flight,
                   run_seconds=run_seconds)

    @classmethod
    def preempted(cls, *, worker: str, step: int, total: int | None,
                  in_flight: bool = False, unwinding: str | None = None,
                  run_seconds: float | None = None) -> Failed:
        """Preempted, and the job asked not to be resumed (on_preempt=fail)."""
        return cls(f"the machine running this job ({worker}) was preempted "
                   f"{_at(step, total, in_flight)}; this job asked not to be resumed "
                   f"(on_preempt=fail), so it was stopped{_tail(unwinding)}",
                   FailCause.PREEMPTED, worker=worker, step=step, total=total,
                   in_flight=in_flight, run_seconds=run_seconds)

    @classmethod
    def lease_expired(cls, *, worker: str, step: int, total: int | None, retries: int,
                      max_retries: int) -> Failed:
        """Its worker vanished once more than ``max_retries`` allows."""
        return cls(f"lost its worker {retries} times (last: lease of worker {worker} expired "
                   f"at {where(step, total)}); giving up after max_retries={max_retries}",
                   FailCause.LEASE_EXPIRED, worker=worker, step=step, total=total,
                   retries=retries, max_retries=max_retries)

    @classmethod
    def worker_died(cls, *, worker: str, step: int, total: int | None, crashes: int,
                    retries: int, max_retries: int) -> Failed:
        """Its worker's process died while running it, ``crashes`` times in a row, and
        once more than ``max_retries`` allows: a poison job, not retried further."""
        more = f"; it lost its worker {retries} times in all" if retries > crashes else ""
        return cls(f"the job's worker died {crashes} times in a row while running it (killed "
                   f"by the kernel or a crash; last: {worker} at {where(step, total)}){more}; "
                   f"not retried further (max_retries={max_retries})",
                   FailCause.WORKER_DIED, worker=worker, step=step, total=total,
                   retries=retries, max_retries=max_retries)

    @classmethod
    def memory_limit(cls, *, limit_gb: float, error: str, step: int | None,
                     total: int | None, run_seconds: float | None = None) -> Failed:
        """An allocation failed at the worker's per-job memory limit (``error``: what the
        allocator raised); the worker lives on."""
        return cls(f"the job used more than {limit_gb:g} GB (its memory limit) at "
                   f"{where(step, total)}: {error}", FailCause.MEMORY_LIMIT, step=step,
                   total=total, run_seconds=run_seconds)

    @classmethod
    def worker_error(cls, *, worker: str, error_type: str,
                     run_seconds: float | None = None) -> Failed:
        """A fault of the worker: the user reads its type, its words stay in the log."""
        return cls(f"worker {worker} could not run the job ({error_type}; the worker's log "
                   "has the details)", FailCause.WORKER, worker=worker,
                   run_seconds=run_seconds)


@dataclass(frozen=True)
class Note(_Payload):
    """A line that changes nothing (a callback not delivered, a choice explained)."""

    kind: ClassVar[EventKind] = EventKind.NOTE
    text: str
    detail: str | None = None  # how the line was worked out, for a reader who asks

    def message(self) -> str:
        return self.text


@dataclass(frozen=True)
class Unread(_Payload):
    """An old row whose words no known wording matches, or an event of a kind this
    version does not know: its words, kept as they are."""

    kind: ClassVar[EventKind] = EventKind.NOTE
    event_kind: str
    text: str
    detail: str | None = None

    def message(self) -> str:
        return self.text


Payload = (Submitted | Started | Resumed | Checkpointed | CheckpointUnusable | Preempted
           | HandedBack | LeaseExpired | Escalated | CancelRequested | Cancelled | Succeeded
           | Failed | Note | Unread)

PAYLOADS: dict[str, type[_Payload]] = {cls.kind.value: cls for cls in (
    Submitted, Started, Resumed, Checkpointed, CheckpointUnusable, Preempted, HandedBack,
    LeaseExpired, Escalated, CancelRequested, Cancelled, Succeeded, Failed, Note)}


def kind_of(payload: Payload) -> str:
    """The event kind a payload is written as."""
    return payload.event_kind if isinstance(payload, Unread) else payload.kind.value


def render(payload: Payload) -> tuple[str, str, dict[str, Any]]:
    """``(kind, message, data)`` of the event to write: what an emission site stores in
    ``events.kind``, ``events.message`` and (as JSON) ``events.data``."""
    return kind_of(payload), payload.message(), payload.to_json()


# ---------------------------------------------------------------------------- JSON


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if getattr(value, f.name) is not None}
    return value


def to_json(payload: _Payload) -> dict[str, Any]:
    """The payload as stored in ``events.data``: its fields (None left out) and the
    version of the shape."""
    out: dict[str, Any] = {"v": DATA_VERSION}
    out.update(_plain(payload))
    return out


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:  # resolving the annotations is slow: once per class
        hints = _HINTS[cls] = typing.get_type_hints(cls, globalns=globals())
    return hints


def _value(hint: Any, raw: Any) -> Any:
    """``raw`` (from JSON) as a value of the field type ``hint``."""
    if raw is None:
        return None
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for t in options:
        if t is type(None):
            continue
        if isinstance(t, type) and issubclass(t, enum.Enum):
            return t(raw)
        if t is Resume:
            return _build(Resume, raw)
        if t is float and isinstance(raw, int | float) and not isinstance(raw, bool):
            return float(raw)
        if t is int and isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if t is bool and isinstance(raw, bool):
            return raw
        if t is str and isinstance(raw, str):
            return raw
    raise ValueError(f"{raw!r} is not a {hint}")


def _build(cls: type[Any], data: Mapping[str, Any]) -> Any:
    if not isinstance(data, Mapping):
        raise ValueError(f"{data!r} is not an object")
    hints = _hints(cls)
    values = {f.name: _value(hints[f.name], data[f.name])
              for f in dataclasses.fields(cls) if f.name in data}
    return cls(**values)


def from_json(kind: str, data: Mapping[str, Any]) -> Payload:
    """The payload of an event of ``kind`` from its stored data; ValueError if the data
    is not a payload of this version (an old row: see :func:`read_legacy`)."""
    if not isinstance(data, Mapping) or data.get("v") != DATA_VERSION:
        raise ValueError("not a payload: no version")
    cls = PAYLOADS.get(kind)
    if cls is None:
        raise ValueError(f"unknown event kind {kind!r}")
    try:
        payload: Payload = _build(cls, data)
    except TypeError as exc:  # a field without a default is missing
        raise ValueError(str(exc)) from None
    return payload


def payload_of(event: Event) -> Payload:
    """The facts of an event: its stored payload, or for a row written before payloads
    existed, what its words say (:func:`read_legacy`). The one accessor readers use."""
    if event.data is not None:
        try:
            return from_json(event.kind, event.data)
        except ValueError:
            pass
    return read_legacy(event.kind, event.message, worker=event.worker,
                       attempt=event.attempt, detail=event.detail)


# ------------------------------------------------------------ rows written before


_STEP = r"step (?P<step>\d+)(?:/(?P<total>\d+))?"
_IN_FLIGHT = r"(?P<in_flight> before the step in flight finished)?"
_UNWIND = r"(?:; the pipeline raised (?P<unwinding>.*) while it unwound)?"
_RESUME_WORDS = (
    r"(?:checkpoint saved in (?P<saved>\d+(?:\.\d+)?)\s*(?P<unit>ms|s)"
    r"|the checkpoint at step (?P<reused>\d+) was saved at that step already"
    r"|the checkpoint could not be saved \((?P<ck_error>.*)\); (?:it will resume from the "
    r"checkpoint at step (?P<failed_step>\d+)|the next attempt starts from the beginning)"
    r"|will resume from the checkpoint at step (?P<kept>\d+)"
    r"|(?P<none>no checkpoint, the next attempt starts from the beginning))")

_LEGACY: dict[str, list[re.Pattern[str]]] = {k: [re.compile(p + r"\Z", re.S) for p in ps]
                                             for k, ps in {
    "started": [r"started on (?P<worker>.+)",
                r"restarted on (?P<worker>.+) from the beginning \(attempt (?P<attempt>\d+)\)"],
    "resumed": [r"resumed on (?P<worker>.+) from " + _STEP],
    "checkpoint": [r"checkpoint at " + _STEP + r" saved in (?P<saved>\d+(?:\.\d+)?)\s*"
                   r"(?P<unit>ms|s)"],
    "checkpoint_corrupt": [
        r"checkpoint at step (?P<step>\d+|None) is unusable: (?P<error>.*); (?:resuming from "
        r"the previous checkpoint at step (?P<previous>\d+|None)|starting from the beginning)"],
    "preempted": [
        r"preempted on (?P<worker>.+?) at " + _STEP + _IN_FLIGHT + r"; it will restart from "
        r"the beginning \(on_preempt=restart\)" + _UNWIND,
        r"preempted on (?P<worker>.+?) at " + _STEP + _IN_FLIGHT + "; " + _RESUME_WORDS
        + _UNWIND],
    "handed_back": [
        r"worker (?P<worker>.+?) was stopped at " + _STEP + _IN_FLIGHT + "; " + _RESUME_WORDS
        + _UNWIND,
        r"(?P<worker>\S+) could not read the job's checkpoint \((?P<error>.*)\); back in the "
        r"queue with its checkpoint kept"],
    "lease_expired": [r"lease of worker (?P<worker>.+?) expired at " + _STEP
                      + r"; back in the queue"],
    "escalated": [
        r"moved to the (?P<to>.+?) pool: preempted (?P<n>\d+) times, more than its limit of "
        r"(?P<max>\d+) \(max_preemptions\)",
        r"moved to the (?P<to>.+?) pool: its deadline has passed",
        r"moved to the (?P<to>.+?) pool: at the (?P<rate>\d+\.\d+) steps/s achieved so far "
        r"on spot \(preemptions included\), the remaining (?P<remaining>\d+) steps need "
        r"(?:(?P<need>\d+) s|more time than is left), but only (?P<left>-?\d+) s are left "
        r"before its deadline"],
    "cancelled": [r"cancelled at the user's request before it started",
                  r"lease of worker (?P<worker>.+?) expired at " + _STEP
                  + r"; cancelled as requested",
                  r"cancelled at the user's request" + _UNWIND],
    "failed": [
        r"failed: (?P<error>stopped at " + _STEP + r": .*)",
        r"failed: (?P<error>the machine running this job \((?P<worker>.+?)\) was preempted at "
        + _STEP + _IN_FLIGHT + r"; this job asked not to be resumed \(on_preempt=fail\), so "
        r"it was stopped.*)",
        r"failed: (?P<error>lost its worker (?P<retries>\d+) times \(last: lease of worker "
        r"(?P<worker>.+?) expired at " + _STEP + r"\); giving up after "
        r"max_retries=(?P<max_retries>\d+))",
        r"failed: (?P<error>worker (?P<worker>.+?) could not run the job \(.*)",
        r"failed: (?P<error>.*)"],
}.items()}

# What the old readers took from any message (cost.py's and the chaos audit's): a wording
# no pattern above knows keeps these facts.
_LOOSE_AT_STEP = re.compile(r"\bat step (\d+)")
_LOOSE_FROM_STEP = re.compile(r"\bfrom step (\d+)")
_LOOSE_RESUME_AT = re.compile(r"from the checkpoint at step (\d+)")
_LOOSE_CHECKPOINT_AT = re.compile(r"checkpoint at step (\d+)")
_LOOSE_SAVED_IN = re.compile(r"saved in (\d+(?:\.\d+)?)\s*(ms|s)\b")


def _int(text: str | None) -> int | None:
    return None if text is None or text == "None" else int(text)


def _secs(value: str | None, unit: str | None) -> float | None:
    if value is None:
        return None
    return float(value) / 1000.0 if unit == "ms" else float(value)


def _match(kind: str, message: str) -> tuple[int, dict[str, str]] | None:
    for i, pattern in enumerate(_LEGACY.get(kind, ())):
        m = pattern.match(message)
        if m is not None:
            return i, {k: v for k, v in m.groupdict().items() if v is not None}
    return None


def _resume(g: Mapping[str, str], step: int | None) -> Resume:
    if "saved" in g:
        return Resume(ResumeHow.SAVED, step, _secs(g["saved"], g.get("unit")))
    if "reused" in g:
        return Resume(ResumeHow.REUSED, int(g["reused"]))
    if "ck_error" in g:
        return Resume(ResumeHow.FAILED, _int(g.get("failed_step")), error=g["ck_error"])
    if "kept" in g:
        return Resume(ResumeHow.KEPT, int(g["kept"]))
    return Resume(ResumeHow.NONE)


def _loose_resume(message: str, step: int | None) -> Resume:
    """What an unknown wording of a stop says the next attempt resumes from."""
    if "checkpoint saved in" in message:
        m = _LOOSE_SAVED_IN.search(message)
        return Resume(ResumeHow.SAVED, step, _secs(m.group(1), m.group(2)) if m else None)
    m = _LOOSE_RESUME_AT.search(message)
    if m is not None:
        return Resume(ResumeHow.KEPT, int(m.group(1)))
    if "from the beginning" in message:
        return Resume(ResumeHow.NONE)
    return Resume(ResumeHow.KEPT)


def read_legacy(kind: str, message: str, *, worker: str | None = None, attempt: int = 0,
                detail: str | None = None) -> Payload:
    """The payload of a row written before payloads existed, from its words.

    The only code that reads an event's message. The wordings are those the store and
    the worker wrote (each is :meth:`message` of the payload returned, so rendering it
    gives the words back); a wording none of them matches keeps the facts the old
    readers took from any message (``at step N``, ``from step N``, ``saved in X s``).
    """
    who = worker or "?"
    hit = _match(kind, message)
    g: dict[str, str] = hit[1] if hit else {}
    i = hit[0] if hit else -1
    step, total = _int(g.get("step")), _int(g.get("total"))
    in_flight = "in_flight" in g
    at_m = _LOOSE_AT_STEP.search(message)
    loose_at = int(at_m.group(1)) if at_m else None
    if kind == EventKind.SUBMITTED:
        return Submitted() if message == "queued" else Unread(kind, message, detail)
    if kind == EventKind.STARTED:
        if hit:
            return Started(g["worker"], int(g.get("attempt", 1)))
        return Unread(kind, message, detail)
    if kind == EventKind.RESUMED:
        if hit:
            return Resumed(g["worker"], int(g["step"]), total)
        m = _LOOSE_FROM_STEP.search(message)
        if m is not None:
            return Resumed(who, int(m.group(1)))
        return Unread(kind, message, detail)
    if kind == EventKind.CHECKPOINT:
        if hit:
            return Checkpointed(step, _secs(g["saved"], g["unit"]) or 0.0)
        m = _LOOSE_CHECKPOINT_AT.search(message)
        s = _LOOSE_SAVED_IN.search(message)
        return Checkpointed(int(m.group(1)) if m else None,
                            _secs(s.group(1), s.group(2)) or 0.0 if s else 0.0)
    if kind == EventKind.CHECKPOINT_CORRUPT:
        if hit:
            return CheckpointUnusable(step, g["error"], "previous" in g,
                                      _int(g.get("previous")))
        return Unread(kind, message, detail)
    if kind == EventKind.PREEMPTED:
        unwinding = g.get("unwinding")
        if hit and i == 0:
            return Preempted(g["worker"], step, total, OnPreempt.RESTART, Resume(ResumeHow.NONE),
                             in_flight, unwinding)
        if hit:
            return Preempted(g["worker"], step, total, OnPreempt.RESUME, _resume(g, step),
                             in_flight, unwinding)
        policy = OnPreempt.RESTART if "on_preempt=restart" in message else OnPreempt.RESUME
        return Preempted(who, loose_at, None, policy, _loose_resume(message, loose_at))
    if kind == EventKind.HANDED_BACK:
        if hit and i == 0:
            return HandedBack(g["worker"], step, total, HandBackCause.STOPPED,
                              _resume(g, step), in_flight, g.get("unwinding"))
        if hit:
            return HandedBack(g["worker"], cause=HandBackCause.CHECKPOINT_UNREADABLE,
                              resume=Resume(ResumeHow.KEPT), error=g["error"])
        return HandedBack(who, loose_at, resume=_loose_resume(message, loose_at))
    if kind == EventKind.LEASE_EXPIRED:
        if hit:
            return LeaseExpired(g["worker"], step, total)
        return LeaseExpired(who, loose_at)
    if kind == EventKind.ESCALATED:
        if not hit:
            return Unread(kind, message, detail)
        if i == 0:
            return Escalated(EscalationWhy.MAX_PREEMPTIONS, g["to"], preemptions=int(g["n"]),
                             max_preemptions=int(g["max"]))
        if i == 1:
            return Escalated(EscalationWhy.DEADLINE_PASSED, g["to"])
        return Escalated(EscalationWhy.DEADLINE_RATE, g["to"], rate=float(g["rate"]),
                         remaining=int(g["remaining"]),
                         need_seconds=None if "need" not in g else float(g["need"]),
                         left_seconds=float(g["left"]))
    if kind == EventKind.CANCEL_REQUESTED:
        if message == CancelRequested().message():
            return CancelRequested()
        return Unread(kind, message, detail)
    if kind == EventKind.CANCELLED:
        if hit and i == 0:
            return Cancelled(CancelCause.QUEUED)
        if hit and i == 1:
            return Cancelled(CancelCause.LEASE_EXPIRED, g["worker"], step, total)
        if hit and "unwinding" not in g:
            return Cancelled(CancelCause.RUNNING)
        return Unread(kind, message, detail) if loose_at is None else \
            Cancelled(CancelCause.RUNNING, worker, loose_at)
    if kind == EventKind.SUCCEEDED:
        return Succeeded() if message == "succeeded" else Unread(kind, message, detail)
    if kind == EventKind.FAILED:
        if not hit:  # not "failed: ..."
            return Failed(message, step=loose_at)
        cause = (FailCause.TIMED_OUT, FailCause.PREEMPTED, FailCause.LEASE_EXPIRED,
                 FailCause.WORKER, None)[i]
        # The old readers took "at step N" from any failure's words, a pipeline's error
        # text included; that is kept, so that old reports read the same.
        return Failed(g["error"], cause, g.get("worker"), step if i < 3 else loose_at,
                      total, in_flight, _int(g.get("retries")), _int(g.get("max_retries")))
    if kind == EventKind.NOTE:
        return Note(message, detail)
    return Unread(kind, message, detail)


# ------------------------------------------------------------------- readers' facts


def end_step(payload: Payload) -> int | None:
    """The step an attempt had reached when this event ended it (None: not known)."""
    if isinstance(payload, Preempted | HandedBack | LeaseExpired | Cancelled | Failed):
        return payload.step
    return None


def start_step(payload: Payload) -> int:
    """The step an attempt that this event started begins at."""
    return payload.step if isinstance(payload, Resumed) else 0
