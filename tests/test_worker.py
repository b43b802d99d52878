"""Real `spotrun worker` processes on real databases, sent real signals."""

from __future__ import annotations

import functools
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Env, WorkerProc, wait_until
from spotrun.events import end_step, payload_of
from spotrun.jobs import Job, JobState
from spotrun.store import JobStore

pytestmark = pytest.mark.slow

FAST = ("--lease-seconds", "1.5", "--heartbeat-seconds", "0.3")


@pytest.fixture
def st(env: Env) -> Iterator[JobStore]:
    s = env.store()
    yield s
    s.close()


def submit(env: Env, pipeline: str, *params: str, extra: tuple[str, ...] = ()) -> str:
    args = ["submit", pipeline, *extra]
    for p in params:
        args += ["-p", p]
    return env.cli(*args).stdout.strip()


def running_on(st: JobStore, job_id: str, min_step: int = 0) -> str:
    def ready() -> str | None:
        job = st.get(job_id, with_events=False)
        if job.state is JobState.RUNNING and job.worker and job.progress.step >= min_step:
            return job.worker
        return None

    return str(wait_until(ready, 60, f"job {job_id} running past step {min_step}"))


def final(st: JobStore, job_id: str, timeout: float = 90) -> Job:
    wait_until(lambda: st.get(job_id, with_events=False).state.is_final, timeout,
               f"job {job_id} to end", on_fail=lambda: _describe(st, job_id))
    return st.get(job_id)


def _describe(st: JobStore, job_id: str) -> str:
    job = st.get(job_id)
    return "\n".join([f"{job.state} {job.error}"] + [e.message for e in job.events])


def messages(job: Job) -> list[str]:
    return [e.message for e in job.events]


@functools.cache
def reference_sha(**params: Any) -> str:
    from spotrun.local import run_inline

    return str(run_inline("digits-train", {**params, "step_delay": 0})["weights_sha256"])


def exits_within(w: WorkerProc, seconds: float) -> float:
    start = time.monotonic()
    code = w.wait(seconds + 30)
    took = time.monotonic() - start
    assert code == 0, w.log()
    assert took < seconds, f"worker took {took:.1f} s to exit\n{w.log()}"
    return took


# ------------------------------------------------------------------ foundation


def test_a_job_runs_its_progress_can_be_watched_and_its_result_is_shown(
        env: Env, st: JobStore) -> None:
    w = env.worker("w1", preload=True)
    job_id = submit(env, "digits-train", "epochs=3", "step_delay=0.03")
    running_on(st, job_id)
    seen: list[int] = []

    def watched() -> bool:
        import json

        shown = json.loads(env.cli("show", job_id, "--json").stdout)
        seen.append(shown["progress"]["step"])
        return shown["state"] == "succeeded"

    wait_until(watched, 90, "the job to succeed", interval=0.3)
    moving = sorted(set(s for s in seen if 0 < s < 135))
    assert len(moving) >= 2, f"progress never seen moving: {seen}"
    text = env.cli("show", job_id).stdout
    assert "succeeded" in text and "weights_sha256" in text and "accuracy" in text
    assert "started on w1" in text
    assert "test accuracy" in env.cli("logs", job_id).stdout
    trained = st.get(job_id)

    # The model classifies: the held-out split with the trained job's own accuracy, and
    # images given as params.
    infer = submit(env, "digits-infer", f"model={job_id}")
    job = final(st, infer, 60)
    assert job.state is JobState.SUCCEEDED, messages(job)
    assert job.result["accuracy"] == trained.result["accuracy"]
    assert len(job.result["predictions"]) == 359
    blank, full = [0] * 64, [16] * 64
    infer = submit(env, "digits-infer", f"model={job_id}", f"inputs=[{blank}, {full}]")
    job = final(st, infer, 60)
    assert len(job.result["predictions"]) == 2
    assert all(0 <= p <= 9 for p in job.result["predictions"])
    w.signal(signal.SIGTERM)
    exits_within(w, 5)


def test_sigkill_mid_job_another_worker_takes_it_after_the_lease(
        env: Env, st: JobStore) -> None:
    w1 = env.worker("w1", *FAST)
    w1.wait_ready()
    job_id = submit(env, "sleep", "seconds=3", "steps=30")
    running_on(st, job_id, min_step=3)
    w1.signal(signal.SIGKILL)
    w1.wait()
    w2 = env.worker("w2", *FAST)
    job = final(st, job_id)
    assert job.state is JobState.SUCCEEDED, messages(job)
    assert job.worker == "w2" and job.retries == 1 and job.attempt == 2
    assert any(m.startswith("lease of worker w1 expired at step") and
               m.endswith("back in the queue") for m in messages(job)), messages(job)
    w2.signal(signal.SIGTERM)
    exits_within(w2, 5)


def test_hundreds_of_jobs_each_run_exactly_once(env: Env, st: JobStore) -> None:
    n = 300
    ids = [st.submit("sleep", {"seconds": 0, "steps": 1}).id for _ in range(n)]
    workers = [env.worker(f"w{i}", "--concurrency", "2") for i in range(4)]
    wait_until(lambda: st.analytics.count_by_state()["succeeded"] == n, 120, "all jobs to succeed",
               on_fail=lambda: str(st.analytics.count_by_state()))
    by_worker: dict[str, int] = {}
    for job_id in ids:
        job = st.get(job_id)
        starts = [e for e in job.events if e.kind == "started"]
        ends = [e for e in job.events if e.kind == "succeeded"]
        assert job.attempt == 1 and len(starts) == 1 and len(ends) == 1, messages(job)
        assert job.worker is not None
        by_worker[job.worker] = by_worker.get(job.worker, 0) + 1
    assert len(by_worker) >= 2, by_worker
    for w in workers:
        w.signal(signal.SIGTERM)
    for w in workers:
        exits_within(w, 5)


def test_a_frozen_worker_cannot_write_to_the_job_it_lost(env: Env, st: JobStore) -> None:
    w1 = env.worker("w1", *FAST)
    w1.wait_ready()
    job_id = submit(env, "sleep", "seconds=4", "steps=40")
    running_on(st, job_id, min_step=2)
    w1.signal(signal.SIGSTOP)
    w2 = env.worker("w2", *FAST)

    def taken() -> bool:
        return st.get(job_id, with_events=False).attempt == 2

    if not st.is_postgres:
        # Frozen inside a write transaction, w1 holds SQLite's write lock and nothing can
        # end it (PostgreSQL ends it after idle_in_transaction_session_timeout): thaw for
        # a moment and freeze again, until w1 is frozen outside one.
        for _ in range(5):
            try:
                wait_until(taken, 8, "w2 to take the job")
                break
            except pytest.fail.Exception:
                w1.signal(signal.SIGCONT)
                time.sleep(0.05)
                w1.signal(signal.SIGSTOP)
    wait_until(taken, 60, "w2 to take the job")
    w1.signal(signal.SIGCONT)
    job = final(st, job_id)
    assert job.state is JobState.SUCCEEDED and job.worker == "w2" and job.attempt == 2
    wait_until(lambda: "refused" in w1.log(), 20, "w1 to learn its writes are refused",
               on_fail=w1.log)
    assert "no longer holds the lease" in w1.log()
    # Nothing attempt 1 wrote after it lost the lease reached the history.
    expired_at = next(e.at for e in job.events if e.kind == "lease_expired")
    assert all(e.attempt != 1 for e in job.events if e.at > expired_at)
    for w in (w1, w2):
        w.signal(signal.SIGTERM)
    for w in (w1, w2):
        exits_within(w, 5)


def test_cancel_timeout_and_pipeline_errors(env: Env, st: JobStore) -> None:
    w = env.worker("w1", "--concurrency", "3", *FAST)
    w.wait_ready()
    to_cancel = submit(env, "sleep", "seconds=30", "steps=300")
    too_long = submit(env, "sleep", "seconds=30", "steps=300", extra=("--timeout", "1"))
    broken = submit(env, "sleep", "seconds=0", "fail=true")
    running_on(st, to_cancel, min_step=1)
    assert "will stop at its next step" in env.cli("cancel", to_cancel).stdout
    job = final(st, to_cancel, 30)
    assert job.state is JobState.CANCELLED, messages(job)
    job = final(st, too_long, 30)
    assert job.state is JobState.FAILED
    assert job.error is not None and "time limit of 1 s" in job.error
    job = final(st, broken, 30)
    assert job.state is JobState.FAILED and job.attempt == 1 and job.retries == 0
    assert job.error == "RuntimeError: failing as asked (fail=true)"
    assert job.error_traceback is not None and "Traceback" in job.error_traceback
    w.signal(signal.SIGTERM)
    exits_within(w, 5)


def test_cuda_jobs_wait_for_a_cuda_worker(env: Env, st: JobStore) -> None:
    w = env.worker("cpu1", *FAST, SPOTRUN_WORKER_CUDA="0")
    w.wait_ready()
    cuda_job = submit(env, "digits-train", "device=cuda")
    cpu_job = submit(env, "sleep", "seconds=0")
    assert final(st, cpu_job, 30).state is JobState.SUCCEEDED
    assert st.get(cuda_job).state is JobState.QUEUED
    w.signal(signal.SIGTERM)
    exits_within(w, 5)


# --------------------------------------------------------------- preemption


def test_sigterm_three_times_resumes_bit_identical(env: Env, st: JobStore) -> None:
    params = {"epochs": 6, "seed": 3, "step_delay": 0.03}
    job_id = submit(env, "digits-train", *(f"{k}={v}" for k, v in params.items()))
    live = {name: env.worker(name, preload=True) for name in ("w1", "w2")}
    last_step = 0
    for round_ in range(3):
        name = running_on(st, job_id, min_step=last_step + 15)
        w = live.pop(name)
        w.signal(signal.SIGTERM)
        exits_within(w, 5)
        job = st.get(job_id)
        assert job.preemptions == round_ + 1
        handed = job.events[-1] if job.events[-1].kind == "preempted" else next(
            e for e in reversed(job.events) if e.kind == "preempted")
        assert handed.message.startswith(f"preempted on {name} at step ")
        assert "checkpoint saved in" in handed.message, handed.message
        at = end_step(payload_of(handed))
        assert at is not None, handed.message
        last_step = at
        assert "exits" in w.log()
        replacement = f"w{3 + round_}"
        live[replacement] = env.worker(replacement, preload=True)
    job = final(st, job_id, 120)
    assert job.state is JobState.SUCCEEDED, messages(job)
    assert job.preemptions == 3 and job.retries == 0
    # Each attempt resumed exactly where the previous one handed the job back.
    handed_at = [m.split("at step ")[1].split("/")[0] for m in messages(job)
                 if m.startswith("preempted on")]
    resumed_at = [m.split("from step ")[1].split("/")[0] for m in messages(job)
                  if m.startswith("resumed on")]
    assert len(resumed_at) == 3 and resumed_at == handed_at, messages(job)
    assert job.result["weights_sha256"] == reference_sha(epochs=6, seed=3)
    assert job.result["steps"] == 270


def _damage(path: Path, how: str) -> None:
    if how == "flip":
        data = path / "tensors.safetensors"
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x5A
        data.write_bytes(bytes(raw))
    elif how == "truncate":
        data = path / "tensors.safetensors"
        data.write_bytes(data.read_bytes()[: len(data.read_bytes()) // 2])
    else:
        (path / "MANIFEST.json").unlink()


@pytest.mark.parametrize("how, why", [
    ("flip", "fails its blake3 check"),
    ("truncate", "(truncated?)"),
    ("no-manifest", "manifest is missing"),
])
def test_a_damaged_checkpoint_is_detected_and_the_job_still_succeeds(
        env_factory: Callable[..., Env], sqlite_url: str, how: str, why: str) -> None:
    env = env_factory(sqlite_url)
    st = env.store()
    job_id = submit(env, "digits-train", "epochs=4", "seed=5", "step_delay=0.03",
                    extra=("--checkpoint-every-steps", "20"))
    w1 = env.worker("w1", preload=True)
    running_on(st, job_id, min_step=45)
    w1.signal(signal.SIGTERM)
    exits_within(w1, 5)
    job = st.get(job_id)
    assert job.checkpoint and job.checkpoint_prev
    prev_step = int(job.checkpoint_prev.rsplit("-s", 1)[1])
    _damage(env.home / "checkpoints" / job.checkpoint, how)
    env.worker("w2", preload=True)
    job = final(st, job_id, 120)
    assert job.state is JobState.SUCCEEDED, messages(job)
    corrupt = [m for m in messages(job) if "is unusable" in m]
    assert len(corrupt) == 1 and why in corrupt[0], messages(job)
    assert f"resuming from the previous checkpoint at step {prev_step}" in corrupt[0]
    assert job.result["weights_sha256"] == reference_sha(epochs=4, seed=5)
    st.close()


HOOKS = '''
import threading, time
from pathlib import Path
from spotrun import shutdown

def boom(time_left):
    raise RuntimeError("hook exploded")

def hang(time_left):
    threading.Event().wait(600)

def record(time_left):
    Path({out!r}).write_text(f"ran with {{time_left:.1f}} s left")

shutdown.register("boom", boom, order=1)
shutdown.register("hang", hang, order=2, timeout=1.0)
shutdown.register("record", record, order=3)
'''


def test_hooks_that_raise_or_hang_do_not_stop_the_hand_back(
        env_factory: Callable[..., Env], sqlite_url: str, tmp_path: Path) -> None:
    env = env_factory(sqlite_url)
    st = env.store()
    out = tmp_path / "recorded.txt"
    (tmp_path / "my_hooks.py").write_text(HOOKS.format(out=str(out)))
    w = env.worker("w1", PYTHONPATH=str(tmp_path), SPOTRUN_IMPORT="my_hooks")
    job_id = submit(env, "sleep", "seconds=20", "steps=200")
    running_on(st, job_id, min_step=2)
    w.signal(signal.SIGTERM)
    exits_within(w, 6)
    job = st.get(job_id)
    assert job.state is JobState.QUEUED and job.preemptions == 1
    assert out.read_text().startswith("ran with")
    log = w.log()
    assert "shutdown hook boom failed" in log and "hook hang still running" in log
    st.close()


def test_a_step_that_outlasts_the_budget_is_handed_back_anyway(
        env_factory: Callable[..., Env], sqlite_url: str) -> None:
    env = env_factory(sqlite_url)
    st = env.store()
    w = env.worker("w1", "--grace-seconds", "3")
    job_id = submit(env, "sleep", "seconds=60", "steps=1")
    running_on(st, job_id)
    # The pipeline's first report (step 0 of 1) reached the store: it is inside its one
    # long step now, not before it (a notice there would checkpoint at step 0 at once).
    wait_until(lambda: st.get(job_id, with_events=False).progress.total == 1, 30,
               "the pipeline to report step 0/1")
    w.signal(signal.SIGTERM)
    exits_within(w, 4)
    job = st.get(job_id)
    assert job.state is JobState.QUEUED and job.preemptions == 1
    assert "before the step in flight finished" in messages(job)[-1]
    st.close()


def test_idle_worker_exits_at_once_and_a_second_signal_exits_now(
        env_factory: Callable[..., Env], sqlite_url: str) -> None:
    env = env_factory(sqlite_url)
    w = env.worker("w1")
    w.wait_ready()
    w.signal(signal.SIGTERM)
    exits_within(w, 3)
    st = env.store()
    w2 = env.worker("w2", "--grace-seconds", "30")
    job_id = submit(env, "sleep", "seconds=60", "steps=1")
    running_on(st, job_id)
    # Inside its one long step (a notice before it would end the job at step 0 at once).
    wait_until(lambda: st.get(job_id, with_events=False).progress.total == 1, 30,
               "the pipeline to report step 0/1")
    w2.signal(signal.SIGTERM)
    time.sleep(0.3)
    w2.signal(signal.SIGTERM)
    assert w2.wait(5) == 128 + signal.SIGTERM
    st.close()


def test_a_job_preempted_past_its_limit_finishes_on_demand(
        env_factory: Callable[..., Env], sqlite_url: str) -> None:
    env = env_factory(sqlite_url)
    st = env.store()
    job_id = submit(env, "sleep", "seconds=12", "steps=120",
                    extra=("--max-preemptions", "1"))
    spot = env.worker("s1", "--pool", "spot")
    running_on(st, job_id, min_step=5)
    spot.signal(signal.SIGTERM)
    exits_within(spot, 5)
    assert st.get(job_id).pool is None  # type: ignore[attr-defined]
    spot = env.worker("s2", "--pool", "spot")
    running_on(st, job_id, min_step=15)
    spot.signal(signal.SIGTERM)
    exits_within(spot, 5)
    job = st.get(job_id)
    assert job.state is JobState.QUEUED and job.preemptions == 2
    assert messages(job)[-1] == ("moved to the on-demand pool: preempted 2 times, more than "
                                 "its limit of 1 (max_preemptions)")
    spot = env.worker("s3", "--pool", "spot")
    # Once the spot worker has run a job queued after it, it has surely seen ours.
    later = submit(env, "sleep", "seconds=0")
    assert final(st, later, 30).worker == "s3"
    assert st.get(job_id).state is JobState.QUEUED  # spot workers leave it alone
    env.worker("od1", "--pool", "on-demand")
    job = final(st, job_id, 60)
    assert job.state is JobState.SUCCEEDED and job.worker == "od1", messages(job)
    assert any(m.startswith("resumed on od1 from step") for m in messages(job))
    st.close()


def test_resuming_with_another_thread_count_is_told_in_the_history(
        env_factory: Callable[..., Env], sqlite_url: str) -> None:
    env = env_factory(sqlite_url)
    st = env.store()
    job_id = submit(env, "digits-train", "epochs=3", "step_delay=0.03")
    w1 = env.worker("w1", preload=True, OMP_NUM_THREADS="2")
    running_on(st, job_id, min_step=20)
    w1.signal(signal.SIGTERM)
    exits_within(w1, 5)
    env.worker("w2", preload=True, OMP_NUM_THREADS="1")
    job = final(st, job_id, 90)
    assert job.state is JobState.SUCCEEDED
    notes = [m for m in messages(job) if m.startswith("resumed on different hardware")]
    assert len(notes) == 1 and "threads 2 -> 1" in notes[0], messages(job)
    st.close()


def test_no_database_at_the_notice_means_a_non_zero_exit_and_the_lease_brings_it_back(
        env_factory: Callable[..., Env], pg_url: str) -> None:
    import psycopg

    env = env_factory(pg_url)
    st = env.store()
    dbname = pg_url.rsplit("/", 1)[1]
    w1 = env.worker("w1", "--grace-seconds", "3", *FAST)
    job_id = submit(env, "sleep", "seconds=6", "steps=60")
    running_on(st, job_id, min_step=2)
    admin = psycopg.connect(pg_url.rsplit("/", 1)[0] + "/postgres", autocommit=True)
    try:
        admin.execute(f"ALTER DATABASE {dbname} ALLOW_CONNECTIONS false")
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,))
        w1.signal(signal.SIGTERM)
        code = w1.wait(30)
        assert code != 0, w1.log()
        assert "lease will expire" in w1.log()
    finally:
        admin.execute(f"ALTER DATABASE {dbname} ALLOW_CONNECTIONS true")
        admin.close()
    st.close()
    st = env.store()
    env.worker("w2", *FAST)
    job = final(st, job_id, 60)
    assert job.state is JobState.SUCCEEDED and job.worker == "w2"
    assert any(m.startswith("lease of worker w1 expired") for m in messages(job))
    st.close()


def test_periodic_checkpoints_follow_young_daly_explained_once(
        env_factory: Callable[..., Env], sqlite_url: str) -> None:
    env = env_factory(sqlite_url, SPOTRUN_CHECKPOINT_MIN_SECONDS="0.5",
                      SPOTRUN_CHECKPOINT_MAX_SECONDS="1")
    st = env.store()
    w = env.worker("w1")
    job_id = submit(env, "sleep", "seconds=4", "steps=40")
    job = final(st, job_id, 60)
    assert job.state is JobState.SUCCEEDED
    # A plain line, with the formula as its detail.
    explained = [e for e in job.events if e.detail and "Young/Daly" in e.detail]
    assert len(explained) == 1, messages(job)
    assert explained[0].message == ("checkpoints every 1 s, chosen from how often this pool "
                                    "loses machines and how long a checkpoint takes")
    assert explained[0].detail.startswith("periodic checkpoints every 1 s: the Young/Daly")
    periodic = [m for m in messages(job) if m.startswith("checkpoint at step")]
    assert 2 <= len(periodic) <= 5, messages(job)
    w.signal(signal.SIGTERM)
    exits_within(w, 5)
    st.close()
