"""Events carry their facts as data: every wording the store and the worker wrote is the
rendering of a payload, rows written before payloads read back to the same payload, and a
cost report computed from the data equals the one the old regexes computed from the words.

The recorded histories in tests/data/ are real rows written before events carried data:
one from a chaos drill (SIGTERM, SIGKILL, freezes), one with every other wording, written
through the store's, the worker's and the policy's own code.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import Env, wait_until
from spotrun import cost
from spotrun.events import (
    Cancelled,
    Checkpointed,
    CheckpointUnusable,
    Escalated,
    EscalationWhy,
    FailCause,
    Failed,
    HandBackCause,
    HandedBack,
    LeaseExpired,
    Note,
    Preempted,
    Resume,
    Resumed,
    ResumeHow,
    Started,
    Unread,
    from_json,
    kind_of,
    payload_of,
    read_legacy,
    render,
    to_json,
)
from spotrun.jobs import Event, EventKind, Job, JobState, OnPreempt, Progress, Worker
from spotrun.policy import escalation, escalation_reason
from spotrun.store import JobStore, Lease
from spotrun.worker import StopReason, stop_outcome
from test_worker import FAST, final, running_on, submit

DATA = Path(__file__).parent / "data"
RECORDED = sorted(DATA.glob("events-*.json"))
PRICES = cost.Prices(by_pool={"spot": 0.10, "on-demand": 1.00}, on_demand=1.00, source="test")


def _t(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _load(path: Path) -> tuple[list[Job], list[Worker], dt.datetime]:
    raw = json.loads(path.read_text())
    workers = [Worker(id=w["id"], name=w["name"], host="h", pid=0, pool=w["pool"],
                      state="stopped", has_cuda=False, current_job=None,
                      started_at=_t(w["started_at"]), last_heartbeat=_t(w["last_heartbeat"]),
                      price_per_hour=w["price_per_hour"]) for w in raw["workers"]]
    jobs = []
    for j in raw["jobs"]:
        events = tuple(Event(at=_t(e["at"]), kind=e["kind"], worker=e["worker"],
                             attempt=e["attempt"], message=e["message"], detail=e["detail"])
                       for e in j["events"])
        created = _t(j["created_at"])
        jobs.append(Job(id=j["id"], pipeline=j["pipeline"], params={},
                        state=JobState(j["state"]), priority=0, attempt=events[-1].attempt,
                        preemptions=0, retries=0, max_retries=4, on_preempt=OnPreempt.RESUME,
                        timeout=None, worker_id=None, worker=None, lease_expires_at=None,
                        progress=Progress(), result=None, error=None, error_traceback=None,
                        checkpoint=None, checkpoint_prev=None, requires_cuda=False,
                        cancel_requested=False, run_seconds=0.0, owner=None,
                        created_at=created, updated_at=created, events=events))
    return jobs, workers, _t(raw["now"])


# --------------------------------------------- the reference: cost.py's old reader

_AT_STEP = re.compile(r"\bat step (\d+)")
_FROM_STEP = re.compile(r"\bfrom step (\d+)")
_RESUME_AT = re.compile(r"from the checkpoint at step (\d+)")
_CHECKPOINT_AT = re.compile(r"checkpoint at step (\d+)")
_SAVED_IN = re.compile(r"saved in (\d+(?:\.\d+)?)\s*(ms|s)\b")


def _saved_seconds(message: str) -> float:
    m = _SAVED_IN.search(message)
    if m is None:
        return 0.0
    value = float(m.group(1))
    return value / 1000.0 if m.group(2) == "ms" else value


def _resume_hint(kind: str, message: str, end_step: int | None,
                 last_checkpoint: int | None) -> int | None:
    if kind == EventKind.LEASE_EXPIRED.value:
        return last_checkpoint
    if "checkpoint saved in" in message:
        return end_step
    m = _RESUME_AT.search(message)
    if m is not None:
        return int(m.group(1))
    if "from the beginning" in message:
        return 0
    return last_checkpoint


def regex_spans(job: Job) -> list[cost.Span]:
    """The attempts as cost.py read them from the words before events carried data
    (kept here only, as the reference)."""
    out: list[cost.Span] = []
    current: cost.Span | None = None
    last_checkpoint: int | None = None
    for ev in job.events:
        if ev.kind in cost.START_KINDS:
            if current is not None:
                current.ended_at, current.end = ev.at, "unknown"
            m = _FROM_STEP.search(ev.message) if ev.kind == EventKind.RESUMED.value else None
            current = cost.Span(ev.attempt, ev.worker, ev.at, int(m.group(1)) if m else 0)
            out.append(current)
        elif ev.kind == EventKind.CHECKPOINT.value:
            m = _CHECKPOINT_AT.search(ev.message)
            if m is not None:
                last_checkpoint = int(m.group(1))
            if current is not None and ev.attempt == current.attempt:
                current.checkpoint_seconds += _saved_seconds(ev.message)
                if m is not None:
                    current.checkpoints.append((int(m.group(1)), ev.at))
        elif ev.kind in cost.END_KINDS and current is not None and ev.attempt == current.attempt:
            m = _AT_STEP.search(ev.message)
            current.ended_at, current.end = ev.at, ev.kind
            current.end_step = int(m.group(1)) if m else None
            current.checkpoint_seconds += _saved_seconds(ev.message)
            current.resume_hint = _resume_hint(ev.kind, ev.message, current.end_step,
                                               last_checkpoint)
            if "from the beginning" in ev.message or "on_preempt=restart" in ev.message:
                last_checkpoint = None
            current = None
    return out


def _report(jobs: list[Job], workers: list[Worker], now: dt.datetime,
            read: Any = None) -> dict[str, Any]:
    notes: list[str] = []
    figures = tuple(cost.job_cost(j, workers, PRICES, now, notes,
                                  read=None if read is None else read(j)) for j in jobs)
    report = cost.CostReport(generated_at=now, since=None, prices=PRICES, jobs=figures,
                             warnings=tuple(notes))
    return report.to_json()


def _as_new_rows(job: Job) -> Job:
    """The job with its events as this version writes them: facts in data; the words
    blanked, so that a reader that still looked at them would be caught."""
    events = tuple(dataclasses.replace(e, message="", data=to_json(payload_of(e)))
                   for e in job.events)
    return dataclasses.replace(job, events=events)


# ------------------------------------------------------------------------- tests


@pytest.mark.parametrize("path", RECORDED, ids=[p.stem for p in RECORDED])
def test_every_recorded_wording_is_the_rendering_of_the_payload_read_back(path: Path) -> None:
    jobs, _, _ = _load(path)
    events = [e for j in jobs for e in j.events]
    assert len(events) > 50
    for e in events:
        p = read_legacy(e.kind, e.message, worker=e.worker, attempt=e.attempt, detail=e.detail)
        assert not isinstance(p, Unread), e.message
        assert render(p)[:2] == (e.kind, e.message)
        assert from_json(e.kind, to_json(p)) == p
        # Stored as JSON text in events.data: the round trip through the text too.
        assert from_json(e.kind, json.loads(json.dumps(to_json(p)))) == p


@pytest.mark.parametrize("path", RECORDED, ids=[p.stem for p in RECORDED])
def test_a_recorded_runs_cost_report_is_the_same_read_from_the_data(path: Path) -> None:
    """The old regex reader over the words, the compatibility reader over old rows, and
    the data reader over rows with data (and no words) give one report."""
    jobs, workers, now = _load(path)
    reference = _report(jobs, workers, now, read=regex_spans)
    assert reference["totals"]["preemptions"] > 0
    assert reference["totals"]["lease_expiries"] > 0
    assert reference["totals"]["checkpoint_seconds"] > 0
    assert _report(jobs, workers, now) == reference
    assert _report([_as_new_rows(j) for j in jobs], workers, now) == reference


def test_the_stored_payload_is_read_and_an_old_row_falls_back_to_its_words() -> None:
    at = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    p = Preempted("spot-1", 40, 100, resume=Resume(ResumeHow.SAVED, 40, 0.0123))
    kind, message, data = render(p)
    assert (kind, message) == ("preempted", "preempted on spot-1 at step 40/100; checkpoint "
                               "saved in 0.012 s")
    assert data["resume"] == {"how": "saved", "step": 40, "seconds": 0.0123}
    # The data holds the exact seconds the words round.
    assert payload_of(Event(at, kind, "spot-1", 1, message, data=data)) == p
    old = payload_of(Event(at, kind, "spot-1", 1, message))
    assert isinstance(old, Preempted) and old.saved_seconds == 0.012
    # A note's detail was the only data before; it is still the dashboard's detail.
    note = payload_of(Event(at, "note", None, 1, "checkpoints every 52 s",
                            detail="sqrt(2 x C x M)", data={"detail": "sqrt(2 x C x M)"}))
    assert note == Note("checkpoints every 52 s", "sqrt(2 x C x M)")
    assert to_json(note)["detail"] == "sqrt(2 x C x M)"
    # Data a newer version wrote in a shape this one cannot read: the words still tell.
    odd = payload_of(Event(at, "lease_expired", "w", 2,
                           "lease of worker w expired at step 3; back in the queue",
                           data={"v": 1, "worker": "w", "step": "three"}))
    assert odd == LeaseExpired("w", 3)
    # An unknown kind, or words no wording matches, are kept as words.
    assert payload_of(Event(at, "paused", None, 1, "paused by an operator")) == \
        Unread("paused", "paused by an operator")
    assert kind_of(Unread("paused", "x")) == "paused"


WHERE = [(12, 50), (0, None)]


@pytest.mark.parametrize("step,total", WHERE)
@pytest.mark.parametrize("in_flight", [False, True])
@pytest.mark.parametrize("unwinding", [None, "OSError: broken pipe"])
def test_every_stop_outcome_is_the_rendering_of_a_payload(
        step: int, total: int | None, in_flight: bool, unwinding: str | None) -> None:
    """What the worker's one stop policy writes today, payload by payload: the worker
    can hand the store payloads without a word of any history changing."""
    resumes = [Resume(ResumeHow.SAVED, step, 0.0042), Resume(ResumeHow.REUSED, step),
               Resume(ResumeHow.FAILED, 10, error="OSError: disk full"),
               Resume(ResumeHow.FAILED, None, error="OSError: disk full"),
               Resume(ResumeHow.KEPT, 10), Resume(ResumeHow.NONE)]
    kw: dict[str, Any] = dict(worker="spot-1", step=step, total=total, in_flight=in_flight,
                              unwinding=unwinding)
    for r in resumes:
        out = stop_outcome(StopReason.PREEMPTED, OnPreempt.RESUME, resume=r, **kw)
        preempted = Preempted("spot-1", step, total, OnPreempt.RESUME, r, in_flight, unwinding)
        assert out.event == preempted and out.message == preempted.message()
        out = stop_outcome(StopReason.SHUTDOWN, OnPreempt.RESTART, resume=r, **kw)
        handed = HandedBack("spot-1", step, total, HandBackCause.STOPPED, r, in_flight,
                            unwinding)
        assert out.event == handed and out.message == handed.message()
    saved = Resume(ResumeHow.SAVED, step, 0.1)
    out = stop_outcome(StopReason.PREEMPTED, OnPreempt.RESTART, resume=saved, **kw)
    restart = Preempted("spot-1", step, total, OnPreempt.RESTART, saved, in_flight, unwinding)
    assert out.event == restart and out.message == restart.message()
    assert restart.resumes_from == 0 and restart.saved_seconds == 0.0
    out = stop_outcome(StopReason.PREEMPTED, OnPreempt.FAIL, **kw)
    failed = Failed.preempted(worker="spot-1", step=step, total=total, in_flight=in_flight,
                              unwinding=unwinding)
    assert out.event == failed and out.message == failed.error
    out = stop_outcome(StopReason.TIMED_OUT, OnPreempt.RESUME, detail="it ran past 5 s", **kw)
    timed = Failed.timed_out(step=step, total=total, limit="it ran past 5 s",
                             in_flight=in_flight, unwinding=unwinding)
    assert out.event == timed and out.message == timed.error


@pytest.mark.parametrize("kw", [
    dict(preemptions=3, max_preemptions=2, deadline=None, step=5, total=10),
    dict(preemptions=1, max_preemptions=5, deadline=100.0, step=5, total=1000),
    dict(preemptions=1, max_preemptions=5, deadline=1000.0, step=5, total=1000),
    dict(preemptions=1, max_preemptions=5, deadline=1000.0, step=0, total=1000),
    dict(preemptions=1, max_preemptions=5, deadline=1000.0, step=999, total=1000),
])
def test_an_escalation_is_its_payload_and_its_words_as_before(kw: dict[str, Any]) -> None:
    args = dict(kw, now=400.0, created=0.0, pool="spot")
    why = escalation(**args)
    words = escalation_reason(**args)
    if why is None:
        assert words is None
        return
    assert why.message() == words and why.from_pool == "spot" and why.to_pool == "on-demand"
    assert read_legacy("escalated", words) == dataclasses.replace(
        why, from_pool=None, rate=None if why.rate is None else round(why.rate, 2),
        need_seconds=None if why.need_seconds is None else round(why.need_seconds),
        left_seconds=None if why.left_seconds is None or why.why is
        EscalationWhy.DEADLINE_PASSED else round(why.left_seconds))
    assert escalation(**dict(args, pool="on-demand")) is None


def test_payloads_say_the_facts_readers_need() -> None:
    assert Resumed("w", 40, 100).message() == "resumed on w from step 40/100"
    assert Started("w", 3).message() == "restarted on w from the beginning (attempt 3)"
    assert Started("w").message() == "started on w"
    assert CheckpointUnusable(15, "bad sha256", True, 10).message() == (
        "checkpoint at step 15 is unusable: bad sha256; resuming from the previous "
        "checkpoint at step 10")
    assert Cancelled().message() == "cancelled at the user's request"
    assert Failed.lease_expired(worker="w", step=6, total=9, retries=2, max_retries=1) \
        .message() == ("failed: lost its worker 2 times (last: lease of worker w expired at "
                       "step 6/9); giving up after max_retries=1")
    assert Failed.worker_error(worker="w", error_type="KeyError").error == (
        "worker w could not run the job (KeyError; the worker's log has the details)")
    kept = HandedBack("w", cause=HandBackCause.CHECKPOINT_UNREADABLE, error="EIO")
    assert kept.resumes_from is None  # the checkpoint the job points to
    assert Escalated(EscalationWhy.DEADLINE_PASSED).message() == (
        "moved to the on-demand pool: its deadline has passed")


def test_every_event_the_store_writes_renders_from_what_is_read_back(store: JobStore) -> None:
    """On both databases (PostgreSQL words the claim in its own SQL): whatever each write
    stores, the payload read back renders the event's exact message."""
    w = store.register_worker(name="w1", host="h", pid=1, pool="spot", has_cuda=False,
                              lease_seconds=0.3)

    def claim() -> Lease:
        got = store.claim(worker_id=w, worker_name="w1", lease_seconds=0.3)
        assert got is not None
        return got[0]

    job = store.submit("sleep", {}).id
    lease = claim()
    store.save_progress(lease, 10, 20, {})
    store.commit_checkpoint(lease, "ck/10", 10, event=Checkpointed(10, 0.012))
    store.hand_back(lease, Preempted("w1", 10, 20, resume=Resume(ResumeHow.SAVED, 10, 0.01)))
    lease = claim()  # resumed, from step 10/20
    store.save_progress(lease, 12, 20, {})
    time.sleep(0.5)
    store.sweep_expired()  # lease expired
    lease = claim()
    store.cancel(job)
    store.finish_cancelled(lease)
    other = store.submit("sleep", {}).id
    store.cancel(other)
    third = store.submit("sleep", {}, on_preempt=OnPreempt.RESTART).id
    lease = claim()
    store.save_progress(lease, 3, None, {})
    store.commit_checkpoint(lease, "ck/3", 3)
    store.hand_back(lease, Preempted("w1", 3, None, OnPreempt.RESTART), keep_checkpoint=False)
    lease = claim()  # restarted from the beginning, attempt 2
    store.add_event(lease, Note("interval chosen", "how"))
    store.add_event(lease, CheckpointUnusable(3, "bad sha256"))
    store.hand_back(lease, HandedBack("w1", 0, None, resume=Resume(ResumeHow.NONE)))
    lease = claim()
    store.hand_back(lease, Preempted("w1", 0), escalation=Escalated(EscalationWhy.DEADLINE_PASSED))
    lease = claim()
    store.fail(lease, Failed("ValueError: no", FailCause.PIPELINE, worker="w1", step=0))
    store.add_note(third, Note("callback not delivered"))
    fourth = store.submit("sleep", {}).id
    store.complete(claim(), {"ok": True})
    seen = set()
    for job_id in (job, other, third, fourth):
        seen |= _renders_from_its_data(store.events(job_id))
    assert seen >= {"submitted", "started", "resumed", "checkpoint", "preempted",
                    "lease_expired", "cancel_requested", "cancelled", "failed", "note",
                    "checkpoint_corrupt", "handed_back", "escalated", "succeeded"}


def _renders_from_its_data(events: list[Event]) -> set[str]:
    """Check that every event records its facts and its words are rendered from them;
    return the kinds seen."""
    for e in events:
        assert e.data is not None, (e.kind, e.message)
        p = payload_of(e)
        assert not isinstance(p, Unread), e.message
        assert render(p)[:2] == (e.kind, e.message)
        assert e.to_json()["data"] == dict(e.data)
    return {e.kind for e in events}


@pytest.mark.slow
def test_every_event_of_real_runs_records_its_facts(env_factory: Callable[..., Env],
                                                     db_url: str) -> None:
    """Real workers fail a job, checkpoint, note their interval, are preempted (SIGTERM)
    and stopped (SIGINT), and run a job cancelled while it runs: every event they caused
    reads back with its data, and its words are rendered from it."""
    env = env_factory(db_url, SPOTRUN_CHECKPOINT_MIN_SECONDS="1")
    st = env.store()
    try:
        broken = submit(env, "sleep", "seconds=0.2", "steps=2", "fail=true")
        # Its checkpoint interval is chosen (a note) once it has run a second.
        noted = submit(env, "sleep", "seconds=2", "steps=20")
        long = submit(env, "sleep", "seconds=120", "steps=1200",
                      extra=("--checkpoint-every-steps", "10"))
        w1 = env.worker("w1", *FAST)
        assert final(st, broken).state is JobState.FAILED
        assert final(st, noted).state is JobState.SUCCEEDED
        running_on(st, long, min_step=1)
        wait_until(lambda: any(e.kind == EventKind.CHECKPOINT for e in st.events(long)),
                   60, "a periodic checkpoint",
                   on_fail=lambda: "\n".join(e.message for e in st.events(long)))
        w1.signal(signal.SIGTERM)
        assert w1.wait(30) == 0, w1.log()
        w2 = env.worker("w2", *FAST)
        running_on(st, long, min_step=1)
        w2.signal(signal.SIGINT)
        assert w2.wait(30) == 0, w2.log()
        env.worker("w3", *FAST)
        running_on(st, long, min_step=1)
        env.cli("cancel", long)
        assert final(st, long).state is JobState.CANCELLED
        seen = set().union(*(_renders_from_its_data(st.events(j))
                             for j in (broken, noted, long)))
        assert seen >= {"submitted", "started", "failed", "checkpoint", "note", "preempted",
                        "resumed", "handed_back", "cancel_requested", "cancelled"}, seen
    finally:
        st.close()
