"""Checkpoints and models under faults: a retried pointer move, a notice at the step of a
periodic checkpoint, a store's transient read error, a zombie that writes a model late."""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import fault_pipelines
from conftest import Env, wait_until
from spotrun.checkpoints import (
    MANIFEST,
    CheckpointExists,
    CheckpointStore,
    CheckpointUnavailable,
)
from spotrun.jobs import JobState
from spotrun.store import JobStore
from test_worker import FAST, exits_within, final, messages, running_on, submit


@pytest.fixture
def fenv(env_factory: Callable[..., Env], db_url: str, tmp_path: Path) -> Env:
    """Real processes on both databases, with the misbehaving pipeline installed."""
    return env_factory(db_url, PYTHONPATH=fault_pipelines.install(tmp_path / "plugin"))


@pytest.fixture
def st(fenv: Env) -> Iterator[JobStore]:
    s = fenv.store()
    yield s
    s.close()


# ------------------------------------------------------------- the pointer's move


def test_a_retried_checkpoint_commit_moves_no_pointer_and_frees_only_unnamed_ones(
        store: JobStore) -> None:
    job = store.submit("sleep", {"seconds": 0})
    wid = store.register_worker(name="w1", host="h", pid=1, pool="spot", has_cuda=False,
                                lease_seconds=10)
    got = store.claim(worker_id=wid, worker_name="w1", lease_seconds=10)
    assert got is not None
    lease = got[0]
    assert store.commit_checkpoint(lease, "c1", 1) is None
    assert store.commit_checkpoint(lease, "c2", 2) is None
    # The same commit again, as the retrier sends it when the reply was lost.
    assert store.commit_checkpoint(lease, "c2", 2) is None
    j = store.get(job.id)
    assert (j.checkpoint, j.checkpoint_prev) == ("c2", "c1")
    assert store.commit_checkpoint(lease, "c3", 3) == "c1"
    assert store.commit_checkpoint(lease, "c3", 3) is None
    j = store.get(job.id)
    assert (j.checkpoint, j.checkpoint_step, j.checkpoint_prev) == ("c3", 3, "c2")
    # What falls off is never a checkpoint a pointer still names.
    assert store.commit_checkpoint(lease, "c4", 4) == "c2"


def test_a_committed_checkpoint_is_never_written_again(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    saved = store.save("job1", 1, 5, {"x.bin": b"first"})
    before = (tmp_path / saved.path / MANIFEST).read_bytes()
    with pytest.raises(CheckpointExists):
        store.save("job1", 1, 5, {"x.bin": b"second"})
    assert (tmp_path / saved.path / MANIFEST).read_bytes() == before
    assert store.load(saved.path).files == {"x.bin": b"first"}


@pytest.mark.slow
def test_a_notice_at_the_step_of_a_periodic_checkpoint_keeps_that_checkpoint(
        fenv: Env, st: JobStore) -> None:
    # Step 5: a periodic checkpoint, then a SIGTERM, then progress(5) again.
    job_id = submit(fenv, "faults", "mode=same-step", "steps=20", "step_seconds=0.01",
                    extra=("--checkpoint-every-steps", "5"))
    w1 = fenv.worker("w1", *FAST)
    assert w1.wait(60) == 0, w1.log()
    job = st.get(job_id)
    assert job.state is JobState.QUEUED and job.preemptions == 1, messages(job)
    assert job.checkpoint == f"jobs/{job_id}/a0001-s000000005"
    assert job.checkpoint_prev is None, "both pointers name one checkpoint"
    assert "the checkpoint at step 5 was saved at that step already" in messages(job)[-1]
    manifests = list((fenv.home / "checkpoints" / "jobs" / job_id).glob(f"*/{MANIFEST}"))
    assert len(manifests) == 1
    fenv.worker("w2", *FAST)
    job = final(st, job_id, 60)
    assert job.state is JobState.SUCCEEDED and job.result["resumed_from"] == 5, messages(job)


# ------------------------------------------------------ a transient read error


def _loop(path: Path) -> None:
    """Make ``path`` a symbolic link to itself: opening it fails with ELOOP, an OSError."""
    os.symlink(path.name, path)


def test_a_read_error_of_a_local_store_is_no_corruption(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CheckpointStore(str(tmp_path))
    saved = store.save("job1", 1, 10, {"t.bin": b"data"})
    manifest = tmp_path / saved.path / MANIFEST
    kept = manifest.read_bytes()
    manifest.unlink()
    _loop(manifest)
    with caplog.at_level("WARNING", logger="spotrun.checkpoints"), \
            pytest.raises(CheckpointUnavailable, match="cannot be read from the checkpoint"):
        store.load(saved.path)
    assert f"Errno {errno.ELOOP}" in caplog.text  # the cause, for the operator's log
    manifest.unlink()
    manifest.write_bytes(kept)
    data = tmp_path / saved.path / "t.bin"
    data.unlink()
    _loop(data)
    with pytest.raises(CheckpointUnavailable):
        store.load(saved.path)


@pytest.mark.slow
def test_a_transient_read_error_keeps_the_pointers_and_the_job_resumes(
        env_factory: Callable[..., Env], sqlite_url: str) -> None:
    env = env_factory(sqlite_url)
    st = env.store()
    job_id = submit(env, "sleep", "seconds=30", "steps=300")
    w1 = env.worker("w1", *FAST)
    running_on(st, job_id, min_step=10)
    w1.signal(signal.SIGTERM)
    exits_within(w1, 10)
    job = st.get(job_id)
    assert job.checkpoint is not None and job.checkpoint_step is not None
    step = job.checkpoint_step
    manifest = env.home / "checkpoints" / job.checkpoint / MANIFEST
    kept = manifest.read_bytes()
    manifest.unlink()
    _loop(manifest)  # the store answers with an error, as a stale NFS handle does
    w2 = env.worker("w2", *FAST)

    def unreadable() -> bool:
        return any("could not read the job's checkpoint" in m for m in messages(st.get(job_id)))

    wait_until(unreadable, 60, "w2 to find the checkpoint unreadable", on_fail=w2.log)
    manifest.unlink()
    manifest.write_bytes(kept)  # the error was transient
    running_on(st, job_id, min_step=step + 1)
    job = st.get(job_id)
    assert f"resumed on w2 from step {step}/300" in messages(job), messages(job)
    assert not [m for m in messages(job) if "unusable" in m], messages(job)
    w2.signal(signal.SIGTERM)
    exits_within(w2, 10)
    st.close()


# ----------------------------------------------------------- a zombie's late model


@pytest.mark.slow
def test_a_zombie_cannot_overwrite_a_finished_jobs_model(
        fenv: Env, st: JobStore, tmp_path: Path) -> None:
    flag = tmp_path / "thawed"
    w1 = fenv.worker("w1", *FAST)
    job_id = submit(fenv, "faults", "mode=zombie-model", f"flag={flag}")
    running_on(st, job_id, min_step=1)  # attempt 1 waits for the flag, its model unsaved
    w1.signal(signal.SIGSTOP)
    w2 = fenv.worker("w2", *FAST)

    def taken() -> bool:
        return st.get(job_id, with_events=False).attempt == 2

    if not st.is_postgres:
        # Frozen inside a write transaction, w1 would hold SQLite's write lock: thaw it for
        # a moment and freeze it again until it is frozen outside one (it waits on the flag).
        for _ in range(5):
            try:
                wait_until(taken, 8, "w2 to take the job")
                break
            except pytest.fail.Exception:
                w1.signal(signal.SIGCONT)
                time.sleep(0.05)
                w1.signal(signal.SIGSTOP)
    job = final(st, job_id, 60)
    assert job.state is JobState.SUCCEEDED and job.worker == "w2" and job.attempt == 2
    assert job.result["model"] == f"models/{job_id}/a0002"
    # The zombie thaws and writes its model, with other weights, after the job finished.
    flag.touch()
    w1.signal(signal.SIGCONT)
    wait_until(lambda: "its model is deleted" in w1.log(), 30,
               "the zombie to delete the model it wrote", on_fail=w1.log)
    models = fenv.home / "checkpoints" / "models" / job_id
    assert sorted(p.name for p in models.iterdir()) == ["a0002"]
    model = CheckpointStore(str(fenv.home / "checkpoints")).load_model(job_id, job.attempt)
    assert model.meta == {"worker": "w2"}
    for w in (w1, w2):
        w.signal(signal.SIGTERM)
    for w in (w1, w2):
        exits_within(w, 10)


def test_a_store_error_names_no_endpoint_for_the_user(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """What reaches a job's history or error says that the checkpoint store failed, never
    where it is (a bucket, an endpoint, a path): that stays in the worker's log."""
    from spotrun.checkpoints import CheckpointStore, CheckpointUnavailable

    # Nothing listens there: the client's error names the endpoint.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    store = CheckpointStore("s3://private-bucket/prefix")
    with pytest.raises(CheckpointUnavailable) as err, caplog.at_level("WARNING"):
        store.load("jobs/x/a0001-s000000001")
    words = str(err.value)
    assert "checkpoint store" in words
    for secret in ("127.0.0.1", "private-bucket", "prefix", ":9"):
        assert secret not in words, words
    assert "private-bucket" in caplog.text  # the operator still sees where
