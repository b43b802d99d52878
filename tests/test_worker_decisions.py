"""The worker's decisions, in-process: what a stopped job writes and says, when a checkpoint
is due, what the threads of a job share, when a sweep may requeue lapsed jobs.

No process, no database, no clock: these are the pure parts that the worker's threads carry
out (the process tests in test_worker.py and test_stop_paths.py send the real signals).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from spotrun.config import Settings
from spotrun.events import (
    Cancelled,
    Escalated,
    EscalationWhy,
    FailCause,
    Failed,
    HandedBack,
    Preempted,
    Resume,
    ResumeHow,
    seconds,
)
from spotrun.jobs import JobState, OnPreempt, Progress
from spotrun.pipelines.base import State
from spotrun.policy import ON_DEMAND
from spotrun.store import JobStore
from spotrun.worker import (
    CheckpointState,
    JobRunner,
    StopOutcome,
    StopReason,
    Worker,
    checkpoint_words,
    decide,
    stop_outcome,
)
from spotrun.worker.loop import HAND_BACK_RESERVE_SECONDS, hand_back_reserve
from spotrun.worker.outcome import NoticeCheckpoint, escalation_for, resume_of
from spotrun.worker.reporter import Sweep, SweepGuard
from spotrun.worker.schedule import CheckpointSchedule, notice_checkpoint_due
from spotrun.worker.state import RunnerState

R, P = StopReason, OnPreempt
MOVED = Escalated(EscalationWhy.MAX_PREEMPTIONS, preemptions=6, max_preemptions=5)

# Checkpoint states a stop can meet.
NOTICE_SAVED = CheckpointState(4, "ck/4", notice=NoticeCheckpoint(4, "ck/4", 0.84))
NOTICE_REUSED = CheckpointState(4, "ck/4",
                                notice=NoticeCheckpoint(4, "ck/4", 0.0, reused=True))
EARLIER = CheckpointState(2, "ck/2")  # a periodic one; the notice got none (yet)
FAILED_EARLIER = CheckpointState(2, "ck/2", error="OSError: disk full")
FAILED_NONE = CheckpointState(error="OSError: disk full")
NONE = CheckpointState()
CHECKPOINTS = {"notice-saved": NOTICE_SAVED, "notice-reused": NOTICE_REUSED,
               "earlier": EARLIER, "failed-earlier": FAILED_EARLIER,
               "failed-none": FAILED_NONE, "none": NONE}
WORDS = {
    "notice-saved": "checkpoint saved in 0.84 s",
    "notice-reused": "the checkpoint at step 4 was saved at that step already",
    "earlier": "will resume from the checkpoint at step 2",
    "failed-earlier": "the checkpoint could not be saved (OSError: disk full); it will "
                      "resume from the checkpoint at step 2",
    "failed-none": "the checkpoint could not be saved (OSError: disk full); the next "
                   "attempt starts from the beginning",
    "none": "no checkpoint, the next attempt starts from the beginning",
}

# (reason, policy) -> (write, counted as a preemption, checkpoint kept, files deleted).
# None: the pipeline stopped without being asked to.
WRITES = {
    (R.PREEMPTED, P.RESUME): ("hand_back", True, True, False),
    (R.PREEMPTED, P.RESTART): ("hand_back", True, False, True),
    (R.PREEMPTED, P.FAIL): ("fail", False, True, True),
    # SIGINT is the operator stopping the worker: the job goes back whatever its policy.
    (R.SHUTDOWN, P.RESUME): ("hand_back", False, True, False),
    (R.SHUTDOWN, P.RESTART): ("hand_back", False, True, False),
    (R.SHUTDOWN, P.FAIL): ("hand_back", False, True, False),
    (R.CANCELLED, P.RESUME): ("cancel", False, True, True),
    (R.CANCELLED, P.RESTART): ("cancel", False, True, True),
    (R.CANCELLED, P.FAIL): ("cancel", False, True, True),
    (R.TIMED_OUT, P.RESUME): ("fail", False, True, True),
    (R.TIMED_OUT, P.RESTART): ("fail", False, True, True),
    (R.TIMED_OUT, P.FAIL): ("fail", False, True, True),
    # Another attempt owns the job: nothing of this one may be written.
    (R.LEASE_LOST, P.RESUME): ("none", False, True, False),
    (R.LEASE_LOST, P.RESTART): ("none", False, True, False),
    (R.LEASE_LOST, P.FAIL): ("none", False, True, False),
    (None, P.RESUME): ("fail", False, True, True),
    (None, P.RESTART): ("fail", False, True, True),
    (None, P.FAIL): ("fail", False, True, True),
}
# (reason, policy) -> the payload of the event the write records.
EVENTS: dict[tuple[StopReason | None, OnPreempt], type | None] = {
    (r, p): (type(None) if r is R.LEASE_LOST else Failed if r in (None, R.TIMED_OUT)
             else Cancelled if r is R.CANCELLED else HandedBack if r is R.SHUTDOWN
             else Failed if p is P.FAIL else Preempted)
    for r, p in WRITES}
DETAIL = {R.TIMED_OUT: "the job ran longer than its time limit of 2 s",
          R.CANCELLED: "cancel requested", R.LEASE_LOST: "heartbeat refused"}


def _decide(reason: StopReason | None, policy: OnPreempt, ck: CheckpointState, *,
            in_flight: bool = False, unwinding: str | None = None,
            escalation: Escalated | None = None) -> StopOutcome:
    return decide(reason, policy, ck, worker="w1", step=4, total=9,
                  detail=DETAIL.get(reason, "") if reason else "", in_flight=in_flight,
                  unwinding=unwinding, escalation=escalation)


def _message(reason: StopReason | None, policy: OnPreempt, ck: str, in_flight: bool,
             unwinding: str | None) -> str:
    """The history line each stop writes, spelled out once more here."""
    at = "at step 4/9" + (" before the step in flight finished" if in_flight else "")
    tail = f"; the pipeline raised {unwinding} while it unwound" if unwinding else ""
    if reason is None:
        return "the pipeline stopped without being asked to"
    if reason is R.LEASE_LOST:
        return ""  # nothing is written
    if reason is R.CANCELLED:
        return "cancelled at the user's request"
    if reason is R.TIMED_OUT:
        return ("stopped at step 4/9: the job ran longer than its time limit of 2 s"
                + ("; the step in flight never returned" if in_flight else "") + tail)
    if reason is R.SHUTDOWN:
        return f"worker w1 was stopped {at}; {WORDS[ck]}{tail}"
    if policy is P.FAIL:
        return (f"the machine running this job (w1) was preempted {at}; this job asked not "
                f"to be resumed (on_preempt=fail), so it was stopped{tail}")
    if policy is P.RESTART:
        return (f"preempted on w1 {at}; it will restart from the beginning "
                f"(on_preempt=restart){tail}")
    return f"preempted on w1 {at}; {WORDS[ck]}{tail}"


# ------------------------------------------------------------- the stop outcome


@pytest.mark.parametrize("escalation", [None, MOVED])
@pytest.mark.parametrize("unwinding", [None, "RuntimeError: DataLoader worker killed"])
@pytest.mark.parametrize("in_flight", [False, True], ids=["boundary", "forced"])
@pytest.mark.parametrize("ck", sorted(CHECKPOINTS))
@pytest.mark.parametrize("reason, policy", list(WRITES),
                         ids=lambda v: str(getattr(v, "value", None) or "unasked"))
def test_every_stop_writes_by_its_reason_policy_checkpoint_and_escalation(
        reason: StopReason | None, policy: OnPreempt, ck: str, in_flight: bool,
        unwinding: str | None, escalation: Escalated | None) -> None:
    out = _decide(reason, policy, CHECKPOINTS[ck], in_flight=in_flight,
                  unwinding=unwinding, escalation=escalation)
    action, preempted, keep, cleanup = WRITES[reason, policy]
    assert (out.action, out.preempted, out.keep_checkpoint, out.cleanup) == (
        action, preempted, keep, cleanup)
    assert out.message == _message(reason, policy, ck, in_flight, unwinding)
    # Only a preemption that keeps its checkpoint may move the job to on-demand.
    moves = escalation is not None and action == "hand_back" and preempted and keep
    assert out.escalate_to == (ON_DEMAND if moves else None)
    assert out.escalation == (MOVED if moves else None)
    # The facts are the event's data; the words above are rendered from them.
    assert type(out.event) is EVENTS[reason, policy]
    if isinstance(out.event, Preempted | HandedBack):
        assert (out.event.worker, out.event.step, out.event.total) == ("w1", 4, 9)
        assert (out.event.in_flight, out.event.unwinding) == (in_flight, unwinding)
        assert out.event.resume == resume_of(CHECKPOINTS[ck])
    if isinstance(out.event, Failed) and reason is not None:
        assert (out.event.step, out.event.total, out.event.in_flight) == (4, 9, in_flight)
        assert out.event.cause is (FailCause.TIMED_OUT if reason is R.TIMED_OUT
                                   else FailCause.PREEMPTED)


@pytest.mark.parametrize("reason, policy, action, preempted, keep", [
    (StopReason.PREEMPTED, OnPreempt.RESUME, "hand_back", True, True),
    (StopReason.PREEMPTED, OnPreempt.RESTART, "hand_back", True, False),
    (StopReason.PREEMPTED, OnPreempt.FAIL, "fail", False, True),
    (StopReason.SHUTDOWN, OnPreempt.FAIL, "hand_back", False, True),
    (StopReason.CANCELLED, OnPreempt.RESUME, "cancel", False, True),
    (StopReason.TIMED_OUT, OnPreempt.RESUME, "fail", False, True),
])
@pytest.mark.parametrize("in_flight", [False, True])
def test_one_policy_for_every_stop(reason: StopReason, policy: OnPreempt, action: str,
                                   preempted: bool, keep: bool, in_flight: bool) -> None:
    out = stop_outcome(reason, policy, worker="w", step=3, total=9, detail="d",
                       in_flight=in_flight)
    assert (out.action, out.preempted, out.keep_checkpoint) == (action, preempted, keep)


def test_a_forced_stop_says_so_and_a_boundary_stop_does_not() -> None:
    forced = _decide(R.PREEMPTED, P.RESUME, EARLIER, in_flight=True)
    assert forced.message == ("preempted on w1 at step 4/9 before the step in flight "
                              "finished; will resume from the checkpoint at step 2")
    hung = _decide(R.TIMED_OUT, P.RESUME, NONE, in_flight=True)
    assert hung.message.endswith("; the step in flight never returned")


@pytest.mark.parametrize("ck", sorted(CHECKPOINTS))
def test_the_words_say_what_the_next_attempt_resumes_from(ck: str) -> None:
    assert checkpoint_words(CHECKPOINTS[ck]) == WORDS[ck]


def test_stop_outcome_takes_the_resume_as_given() -> None:
    kept = Resume(ResumeHow.KEPT, 2)
    out = stop_outcome(R.PREEMPTED, P.RESUME, worker="w", step=3, total=None, resume=kept)
    assert out.message == "preempted on w at step 3; will resume from the checkpoint at step 2"
    assert out.may_escalate and out.escalated(None) is out
    assert out.escalated(MOVED).escalate_to == ON_DEMAND
    shutdown = stop_outcome(R.SHUTDOWN, P.RESUME, worker="w", step=3, total=None, resume=kept)
    assert not shutdown.may_escalate and shutdown.escalated(MOVED) is shutdown


def test_durations_read_as_people_read_them() -> None:
    assert [seconds(x) for x in (0.004, 0.12, 3.4, 12.34)] == [
        "0.004 s", "0.12 s", "3.40 s", "12.3 s"]


# ------------------------------------------------------------------ escalation


def _esc(**kw: object) -> str | None:
    args: dict[str, object] = dict(
        preemptions=0, max_preemptions=None, default_max_preemptions=5, deadline=None,
        created=0.0, job_pool=None, worker_pool="spot", step=0, total=None, now=100.0)
    args.update(kw)
    why = escalation_for(**args)  # type: ignore[arg-type]
    return None if why is None else why.message()


def test_escalation_counts_this_preemption_and_the_jobs_limit_wins() -> None:
    assert _esc(preemptions=4) is None  # the 5th: at the worker's limit of 5
    assert _esc(preemptions=5) == MOVED.message() == (
        "moved to the on-demand pool: preempted 6 times, more than its limit of 5 "
        "(max_preemptions)")
    assert _esc(preemptions=0, max_preemptions=0) == (
        "moved to the on-demand pool: preempted 1 times, more than its limit of 0 "
        "(max_preemptions)")
    assert _esc(preemptions=9, max_preemptions=20) is None


def test_escalation_never_moves_a_job_already_on_demand() -> None:
    assert _esc(preemptions=9, job_pool=ON_DEMAND) is None
    assert _esc(preemptions=9, worker_pool=ON_DEMAND) is None
    # The job's own pool wins over the worker's.
    assert _esc(preemptions=9, job_pool="spot", worker_pool=ON_DEMAND) is not None


def test_escalation_at_a_deadline_the_job_can_no_longer_make() -> None:
    # 10 steps in 100 s, 90 left, 50 s to go: too slow on spot.
    why = _esc(deadline=150.0, step=10, total=100)
    assert why is not None and "only 50 s are left before its deadline" in why
    assert _esc(deadline=10_000.0, step=10, total=100) is None
    assert _esc(deadline=50.0, step=10, total=100) == (
        "moved to the on-demand pool: its deadline has passed")


# --------------------------------------------------------- the checkpoint schedule


def _settings(**kw: object) -> Settings:
    return Settings(home=Path("/nonexistent"), database_url="sqlite://",
                    checkpoint_url="/nonexistent").with_(**kw)


@pytest.mark.parametrize("policy, ck, abandoned, due", [
    (P.RESUME, EARLIER, False, True),
    (P.RESUME, NONE, False, True),
    (P.RESUME, NOTICE_SAVED, False, False),  # once per notice
    (P.RESUME, NOTICE_REUSED, False, False),
    (P.RESUME, FAILED_EARLIER, False, False),  # a failed try is not tried again
    (P.RESUME, EARLIER, True, False),  # the stop path ended the job already
    (P.RESTART, NONE, False, False),  # its checkpoint would be dropped anyway
    (P.FAIL, NONE, False, False),
])
def test_a_notice_checkpoints_once_if_the_job_resumes(
        policy: OnPreempt, ck: CheckpointState, abandoned: bool, due: bool) -> None:
    assert notice_checkpoint_due(policy, ck, abandoned=abandoned) is due


def test_no_checkpoint_at_step_0_or_again_at_the_committed_step() -> None:
    may = CheckpointSchedule.may_checkpoint
    assert not may(0, None) and not may(5, 5)
    assert may(1, None) and may(6, 5)


def test_every_n_steps_counts_from_the_last_checkpoint() -> None:
    s = CheckpointSchedule(every_steps=10, every_seconds=3600.0, min_seconds=10,
                           max_seconds=600)
    assert not s.periodic_due(9, None, 0.0) and s.periodic_due(10, None, 0.0)
    assert not s.periodic_due(14, 5, 0.0) and s.periodic_due(15, 5, 0.0)


def test_every_t_seconds_counts_from_the_last_checkpoint() -> None:
    s = CheckpointSchedule(every_steps=0, every_seconds=30.0, min_seconds=10, max_seconds=600)
    assert not s.adaptive
    assert not s.periodic_due(7, 3, 29.9) and s.periodic_due(7, 3, 30.0)
    assert not s.needs_interval(10_000)  # a fixed period is never chosen


def test_the_jobs_own_schedule_wins_over_the_workers() -> None:
    settings = _settings(checkpoint_every_steps=50, checkpoint_every_seconds=120.0)
    mine = CheckpointSchedule.for_job(5, 20.0, settings)
    assert (mine.every_steps, mine.every_seconds, mine.adaptive) == (5, 20.0, False)
    theirs = CheckpointSchedule.for_job(None, None, settings)
    assert (theirs.every_steps, theirs.every_seconds) == (50, 120.0)
    adaptive = CheckpointSchedule.for_job(None, None, _settings())
    assert adaptive.adaptive and adaptive.every_seconds == 600.0  # until chosen: the longest


def test_young_daly_is_chosen_once_the_job_has_run_long_enough_then_remeasured_once() -> None:
    s = CheckpointSchedule.for_job(None, None, _settings(checkpoint_min_seconds=10.0,
                                                         checkpoint_max_seconds=600.0))
    assert not s.needs_interval(9.9) and s.needs_interval(10.0)
    # Prior cost 1 s, one interruption in an hour of life plus the prior's hour:
    # sqrt(2 x 1 x 3600) = 85 s.
    chosen = s.choose(lived_seconds=3600.0, interruptions=1)
    assert s.every_seconds == chosen.seconds == pytest.approx(84.85, abs=0.01)
    assert chosen.summary.startswith("checkpoints every 85 s")
    assert "sqrt(2 x C x M)" in chosen.explanation and "not measured yet" in chosen.explanation
    assert not s.needs_interval(10_000)  # chosen once
    # The first measured cost replaces the prior: chosen again, then never.
    assert s.measured(4.0) and s.cost == 4.0
    assert s.choose(lived_seconds=3600.0, interruptions=1).seconds == pytest.approx(169.7,
                                                                                   abs=0.1)
    assert not s.measured(9.0) and s.cost == 4.0


def test_a_cost_measured_before_the_choice_is_used_by_it() -> None:
    s = CheckpointSchedule.for_job(None, None, _settings())
    assert not s.measured(0.5)  # nothing chosen yet: nothing to choose again
    assert s.choose(lived_seconds=0.0, interruptions=0).seconds == pytest.approx(60.0)


# -------------------------------------------------------------- the shared state


def _state() -> RunnerState:
    return RunnerState(Progress(3, 9), CheckpointState(2, "ck/2"), now=100.0)


def test_the_first_stop_asked_for_wins() -> None:
    st = _state()
    assert (st.stop_reason, st.stop_detail) == (None, "")
    assert st.request_stop(R.CANCELLED, "cancel requested", 101.0)
    assert not st.request_stop(R.PREEMPTED, "SIGTERM", 102.0)
    assert (st.stop_reason, st.stop_detail) == (R.CANCELLED, "cancel requested")


def test_of_threads_racing_to_stop_a_job_exactly_one_wins() -> None:
    st = _state()
    wins: list[bool] = []
    go = threading.Barrier(8)

    def ask(reason: StopReason) -> None:
        go.wait()
        wins.append(st.request_stop(reason, reason.value, 1.0))

    threads = [threading.Thread(target=ask, args=(r,))
               for r in [*StopReason, R.CANCELLED, R.CANCELLED, R.CANCELLED]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1 and st.stop_detail == st.stop_reason.value  # type: ignore[union-attr]


def test_a_heartbeat_carries_progress_only_when_the_job_moved() -> None:
    st = _state()
    assert st.where() == "step 3/9" and st.moved() is None
    metrics = {"loss": 0.5}
    st.report(4, 9, metrics)
    got = st.moved()
    assert got == Progress(4, 9, {"loss": 0.5}) and got.metrics is not metrics
    assert st.moved() is None  # written: nothing new to write
    st.report(5, None, {})
    assert st.where() == "step 5" and (st.step, st.total) == (5, None)
    assert st.take_progress() == Progress(5, None, {}) and st.moved() is None


def test_an_advisorys_checkpoint_request_is_taken_once() -> None:
    st = _state()
    assert not st.take_checkpoint_request()
    st.ask_checkpoint()
    st.ask_checkpoint()
    assert st.take_checkpoint_request() and not st.take_checkpoint_request()


def test_checkpoint_facts_are_replaced_whole() -> None:
    st = _state()
    before = st.checkpoint
    st.update_checkpoint(step=7, path="ck/7", now=130.0)
    assert before == CheckpointState(2, "ck/2")  # a reader's snapshot never changes
    assert st.checkpoint == CheckpointState(7, "ck/7") and st.checkpoint_mono == 130.0
    st.update_checkpoint(error="OSError: x")  # a failed notice checkpoint: no new period
    assert st.checkpoint.error == "OSError: x" and st.checkpoint_mono == 130.0


@pytest.mark.parametrize("reason, hung", [
    (R.CANCELLED, True), (R.TIMED_OUT, True),
    # A notice's stop is bounded by its deadline, a lost lease needs no ending.
    (R.PREEMPTED, False), (R.SHUTDOWN, False), (R.LEASE_LOST, False)])
def test_only_an_ignored_cancel_or_time_limit_past_the_grace_is_hung(
        reason: StopReason, hung: bool) -> None:
    st = _state()
    assert not st.hung(3.0, 1e9)
    st.request_stop(reason, "", 100.0)
    assert not st.hung(3.0, 103.0)
    assert st.hung(3.0, 103.1) is hung


@pytest.mark.parametrize("end", ["done", "abandon", "finish"])
def test_a_job_that_ended_is_neither_hung_nor_reported(end: str) -> None:
    st = _state()
    st.request_stop(R.CANCELLED, "", 100.0)
    assert st.reported() and st.hung(3.0, 200.0)
    {"done": st.done.set, "abandon": st.abandon, "finish": st.finish}[end]()
    assert not st.reported() and not st.hung(3.0, 200.0)
    assert st.abandoned is (end == "abandon") and st.finishing is (end == "finish")


# ------------------------------------------------------------------ the sweep guard


def _guard(now: float = 0.0) -> SweepGuard:
    # slow = max(0.5, (10 - 0.5) / 2) = 4.75 s
    return SweepGuard(lease_seconds=10.0, heartbeat_seconds=0.5, now=now)


def test_a_sweep_waits_a_full_lease_of_timely_answers_from_the_start() -> None:
    g = _guard()
    assert g.slow == 4.75
    assert g.after_beat(5.0, 5.1) is Sweep.PROBE
    assert g.after_beat(10.0, 10.1) is Sweep.SWEEP


def test_a_slow_heartbeat_closes_the_guard_for_a_lease_after_it() -> None:
    g = _guard()
    assert g.after_beat(20.0, 25.0) is Sweep.SLOW  # took 5 s > 4.75 s
    assert g.tell_slow() and not g.tell_slow()  # logged once
    assert g.after_beat(26.0, 26.1) is Sweep.PROBE
    assert g.after_beat(34.9, 34.95) is Sweep.PROBE
    assert g.after_beat(35.0, 35.1) is Sweep.SWEEP  # a lease after the slow answer
    assert g.tell_slow()  # the guard opened: a new stall is told again


def test_a_slow_sweep_counts_like_a_slow_heartbeat() -> None:
    g = _guard()
    assert g.after_beat(10.0, 10.1) is Sweep.SWEEP
    g.sweep_was_slow(10.4)
    assert g.after_beat(11.0, 11.1) is Sweep.PROBE
    assert g.after_beat(20.4, 20.5) is Sweep.SWEEP


def test_after_an_outage_the_guard_counts_from_the_first_answer() -> None:
    g = _guard()
    g.outage()
    assert g.after_beat(50.0, 50.1) is Sweep.PROBE
    assert g.after_beat(59.9, 59.95) is Sweep.PROBE
    assert g.after_beat(60.0, 60.1) is Sweep.SWEEP


# ------------------------------------------- the runner carries the outcome out


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite database, built once and copied for each test."""
    path = tmp_path_factory.mktemp("template") / "spotrun.db"
    JobStore.open(f"sqlite:///{path}").close()
    return path


@pytest.fixture
def worker_on(template_db: Path, tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Real workers on a real SQLite store, their loops not started: the test is the
    pipeline. Keyword arguments are the workers' settings."""
    shutil.copy(template_db, tmp_path / "spotrun.db")
    made: list[Worker] = []

    def make(**changes: object) -> Worker:
        settings = Settings(home=tmp_path,
                            database_url=f"sqlite:///{tmp_path / 'spotrun.db'}",
                            checkpoint_url=str(tmp_path / "checkpoints"),
                            max_preemptions=5).with_(**changes)
        w = Worker(settings, name="w1", store=JobStore.open(settings.database_url))
        made.append(w)
        w.worker_id = w.store.register_worker(name="w1", host="h", pid=1, pool="spot",
                                              has_cuda=False, lease_seconds=10.0)
        return w

    yield make
    for w in made:
        w.store.close()
        w.hb_store.close()


@pytest.fixture
def wk(worker_on: Callable[..., Worker]) -> Worker:
    return worker_on()


def _claimed(w: Worker) -> JobRunner:
    got = w.store.claim(worker_id=w.worker_id, worker_name="w1", lease_seconds=10.0)
    assert got is not None
    return w.add_runner(*got)


def _running(w: Worker, policy: OnPreempt, *, earlier: bool,
             max_preemptions: int | None = None) -> JobRunner:
    """A claimed job at step 4/9, with a periodic checkpoint at step 2 if ``earlier``."""
    job = w.store.submit("sleep", {"seconds": 1}, on_preempt=policy,
                         max_preemptions=max_preemptions)
    r = _claimed(w)
    assert r.job.id == job.id
    if earlier:
        r.report(2, 9, {})
        r.checkpoint(State(2, {"w.bin": b"two"}))
    r.report(4, 9, {"loss": 0.25})
    return r


def _stop_at_a_boundary(r: JobRunner, reason: StopReason, detail: str = "") -> None:
    """What a pipeline does at its next step boundary once asked to stop, then JobStopped."""
    r.request_stop(reason, detail)
    assert r.stop_requested()
    if r.checkpoint_due(4):
        r.checkpoint(State(4, {"w.bin": b"four"}))
    r._stopped()


def _files(w: Worker, job_id: str) -> bool:
    return (w.settings.home / "checkpoints" / "jobs" / job_id).exists()


@pytest.mark.parametrize("earlier", [True, False], ids=["earlier-checkpoint", "none-before"])
@pytest.mark.parametrize("policy", list(OnPreempt), ids=lambda p: p.value)
def test_a_preemption_at_a_boundary_writes_by_the_jobs_policy(
        wk: Worker, policy: OnPreempt, earlier: bool) -> None:
    r = _running(wk, policy, earlier=earlier)
    _stop_at_a_boundary(r, R.PREEMPTED, "SIGTERM")
    job = wk.store.get(r.job.id)
    last = job.events[-1].message
    if policy is P.FAIL:
        assert job.state is JobState.FAILED and job.preemptions == 0
        assert job.error == ("the machine running this job (w1) was preempted at step 4/9; "
                             "this job asked not to be resumed (on_preempt=fail), so it was "
                             "stopped")
        assert not _files(wk, r.job.id)
    elif policy is P.RESTART:
        assert job.state is JobState.QUEUED and job.preemptions == 1
        assert job.checkpoint is None and job.checkpoint_prev is None  # dropped
        assert last == ("preempted on w1 at step 4/9; it will restart from the beginning "
                        "(on_preempt=restart)")
        assert not _files(wk, r.job.id)
    else:
        assert job.state is JobState.QUEUED and job.preemptions == 1
        assert (job.checkpoint is not None and "/s00000004" in job.checkpoint) or \
            (job.checkpoint is not None and job.checkpoint.endswith("4")), job.checkpoint
        assert last.startswith("preempted on w1 at step 4/9; checkpoint saved in "), last
        assert _files(wk, r.job.id)
    assert job.progress.step == 4 and job.progress.metrics == {"loss": 0.25}


@pytest.mark.parametrize("policy", list(OnPreempt), ids=lambda p: p.value)
def test_sigint_at_a_boundary_hands_back_whatever_the_policy_and_is_no_preemption(
        wk: Worker, policy: OnPreempt) -> None:
    r = _running(wk, policy, earlier=True, max_preemptions=0)
    _stop_at_a_boundary(r, R.SHUTDOWN, "SIGINT")
    job = wk.store.get(r.job.id)
    assert job.state is JobState.QUEUED and job.preemptions == 0
    assert job.pool is None  # type: ignore[attr-defined]  # no escalation either
    last = job.events[-1]
    assert last.kind == "handed_back"
    if policy is P.RESUME:  # only a job that resumes checkpoints at the notice
        assert last.message.startswith("worker w1 was stopped at step 4/9; checkpoint saved")
    else:
        assert last.message == ("worker w1 was stopped at step 4/9; will resume from the "
                                "checkpoint at step 2")
        assert job.checkpoint is not None  # the periodic one, kept


@pytest.mark.parametrize("reason, state, error", [
    (R.CANCELLED, JobState.CANCELLED, "cancelled"),
    (R.TIMED_OUT, JobState.FAILED,
     "stopped at step 4/9: the job ran longer than its time limit of 2 s"),
])
def test_a_cancel_or_time_limit_ends_the_job_and_deletes_its_checkpoints(
        wk: Worker, reason: StopReason, state: JobState, error: str) -> None:
    r = _running(wk, P.RESUME, earlier=True)
    assert _files(wk, r.job.id)
    _stop_at_a_boundary(r, reason, "the job ran longer than its time limit of 2 s")
    job = wk.store.get(r.job.id)
    assert job.state is state and job.error == error and job.preemptions == 0
    assert not _files(wk, r.job.id)


def test_a_lost_lease_writes_nothing(wk: Worker) -> None:
    r = _running(wk, P.RESUME, earlier=True)
    before = wk.store.get(r.job.id)
    _stop_at_a_boundary(r, R.LEASE_LOST, "heartbeat refused")
    job = wk.store.get(r.job.id)
    assert job.state is JobState.RUNNING and job.events == before.events
    assert _files(wk, r.job.id)


@pytest.mark.parametrize("policy, moved", [(P.RESUME, True), (P.RESTART, False)])
def test_a_preemption_past_the_limit_moves_the_job_on_demand_unless_it_restarts(
        wk: Worker, policy: OnPreempt, moved: bool) -> None:
    r = _running(wk, policy, earlier=True, max_preemptions=0)
    _stop_at_a_boundary(r, R.PREEMPTED, "SIGTERM")
    job = wk.store.get(r.job.id)
    assert job.state is JobState.QUEUED and job.preemptions == 1
    assert job.pool == (ON_DEMAND if moved else None)  # type: ignore[attr-defined]
    if moved:
        assert job.events[-1].message == ("moved to the on-demand pool: preempted 1 times, "
                                          "more than its limit of 0 (max_preemptions)")


def test_a_notice_checkpoint_that_fails_hands_back_with_the_earlier_one(
        wk: Worker) -> None:
    r = _running(wk, P.RESUME, earlier=True)
    r.request_stop(R.PREEMPTED, "SIGTERM")
    assert r.checkpoint_due(4)
    r.checkpoint(State(4, {"../w.bin": b"four"}))  # refused by the checkpoint store
    assert not r.checkpoint_due(4)  # tried once: not again
    r._stopped()
    job = wk.store.get(r.job.id)
    assert job.state is JobState.QUEUED and job.checkpoint_step == 2  # type: ignore[attr-defined]
    last = job.events[-1].message
    assert last == ("preempted on w1 at step 4/9; the checkpoint could not be saved "
                    "(ValueError: bad checkpoint file name '../w.bin'); it will resume from "
                    "the checkpoint at step 2")


@pytest.mark.parametrize("reason, policy, state, words", [
    (R.PREEMPTED, P.RESUME, JobState.QUEUED, "preempted on w1 at step 4/9 before the step in "
     "flight finished; will resume from the checkpoint at step 2"),
    (R.PREEMPTED, P.FAIL, JobState.FAILED, "the machine running this job (w1) was preempted "
     "at step 4/9 before the step in flight finished; this job asked not to be resumed "
     "(on_preempt=fail), so it was stopped"),
    (R.SHUTDOWN, P.FAIL, JobState.QUEUED, "worker w1 was stopped at step 4/9 before the step "
     "in flight finished; will resume from the checkpoint at step 2"),
    (R.CANCELLED, P.RESUME, JobState.CANCELLED, "cancelled"),
])
def test_the_deadline_forces_the_same_outcome_on_a_step_still_in_flight(
        wk: Worker, reason: StopReason, policy: OnPreempt, state: JobState,
        words: str) -> None:
    r = _running(wk, policy, earlier=True)
    wk.coordinator.notify("SIGTERM", source="signal")
    r.request_stop(reason, "SIGTERM")
    assert wk._force_stop(r, reason) == 0
    assert r.state.abandoned and not r.checkpoint_due(5)
    job = wk.store.get(r.job.id)
    assert job.state is state
    said = job.error if state is JobState.FAILED else job.events[-1].message
    assert said is not None and said.startswith(words), said
    assert job.preemptions == (1 if (reason, policy) == (R.PREEMPTED, P.RESUME) else 0)
    # At the deadline exiting in time comes first: the files are left for the next owner.
    assert _files(wk, r.job.id)


def test_the_reserve_for_ending_stuck_jobs_is_a_share_of_a_short_budget() -> None:
    assert hand_back_reserve(2.0) == pytest.approx(0.4)
    assert hand_back_reserve(14.0) == HAND_BACK_RESERVE_SECONDS
    assert hand_back_reserve(-1.0) == 0.0


def test_a_job_stuck_past_the_notice_is_handed_back_before_the_deadline(
        worker_on: Callable[..., Worker]) -> None:
    # A pipeline still in a step, or still starting (importing torch on a loaded machine),
    # when the notice comes: the stop path ends it inside the budget, not at its end.
    w = worker_on(grace_seconds=3.0, safety_margin_seconds=1.0)
    r = _running(w, P.RESUME, earlier=True)
    notice = w.coordinator.notify("SIGTERM", source="signal")
    assert w._stop() == 0
    job = w.store.get(r.job.id)
    assert job.state is JobState.QUEUED and r.state.abandoned
    handed = job.events[-1]
    assert handed.message.startswith("preempted on w1 at step 4/9 before the step in flight "
                                     "finished; will resume from the checkpoint at step 2")
    budget = notice.deadline_mono - notice.received_mono
    since = handed.at.timestamp() - notice.received_at
    # Ended at about 1.6 s of the 2 s budget (its reserve: 0.4 s), well before its end.
    assert budget == pytest.approx(2.0, abs=0.01) and since < budget - 0.1, since
    assert w._handed_back == 0  # the deadline's exit, were it to come, would exit 0


def test_the_interval_is_chosen_once_and_explained_on_the_first_attempt_only(
        worker_on: Callable[..., Worker]) -> None:
    w = worker_on(checkpoint_min_seconds=0.0, checkpoint_max_seconds=600.0)
    job_id = w.store.submit("sleep", {"seconds": 1}).id

    def explained() -> list[str]:
        return [e.message for e in w.store.get(job_id).events
                if e.detail and "Young/Daly" in e.detail]

    r = _claimed(w)
    r.report(1, 9, {})
    assert not r.checkpoint_due(1)  # the interval chosen (about 85 s), not yet due
    assert r.schedule.interval_set and explained() == [
        "checkpoints every 85 s, chosen from how often this pool loses machines and how "
        "long a checkpoint takes"]
    r.checkpoint(State(2, {"w.bin": b"two"}))  # measured: chosen again, not told again
    assert r.schedule.cost is not None and not r.checkpoint_due(3)
    assert len(explained()) == 1
    _stop_at_a_boundary(r, R.PREEMPTED, "SIGTERM")
    again = _claimed(w)
    assert again.lease.attempt == 2
    again.report(3, 9, {})
    assert not again.checkpoint_due(3) and again.schedule.interval_set
    assert len(explained()) == 1
