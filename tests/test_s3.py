"""Checkpoints on s3:// against a real S3-compatible server on loopback (moto's server mode).

No fsspec or boto mocks: the code under test talks HTTP to a server in another process, and
the tests look at what that server holds through boto3. The endpoint and the credentials
reach the code only through the AWS SDK variables (``AWS_ENDPOINT_URL_S3``,
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``...), and every other source of either is shut
out, so nothing here can reach a real cloud.
"""

from __future__ import annotations

import importlib.util
import json
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import IN_CI, Env, wait_until
from s3_server import SECRET_KEY, S3Server, moto_server
from spotrun.checkpoints import MANIFEST, CheckpointCorrupt, CheckpointStore, _storage_options
from spotrun.events import end_step, payload_of
from spotrun.jobs import JobState

_MISSING = [m for m in ("s3fs", "boto3", "moto") if importlib.util.find_spec(m) is None]
if _MISSING:
    _why = f"{', '.join(_MISSING)} not installed (pip install -e '.[test]')"
    if IN_CI:
        raise ImportError(_why)
    pytest.skip(_why, allow_module_level=True)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with moto_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def aws_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process's environment pointed at the loopback server, and nowhere else."""
    for name in S3Server.cleared():
        monkeypatch.delenv(name, raising=False)
    variables = s3.env()
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return variables


@pytest.fixture
def bucket(s3: S3Server) -> str:
    return s3.new_bucket()


@pytest.fixture
def store(aws_env: dict[str, str], bucket: str) -> CheckpointStore:
    return CheckpointStore(f"s3://{bucket}/ckpts")


# -------------------------------------------------------------- the store alone


def test_round_trip_model_delete_and_probe(s3: S3Server, bucket: str,
                                           store: CheckpointStore) -> None:
    files = {"a.bin": bytes(range(256)) * 40, "state.json": b'{"k": 1}'}
    saved = store.save("job1", 2, 340, files, {"note": "hi"})
    assert saved.path == "jobs/job1/a0002-s000000340" and saved.nbytes == 10248
    prefix = f"ckpts/{saved.path}/"
    assert s3.keys(bucket, prefix) == [prefix + n for n in sorted([*files, MANIFEST])]
    manifest = json.loads(s3.client().get_object(
        Bucket=bucket, Key=prefix + MANIFEST)["Body"].read())
    assert manifest["files"]["a.bin"]["size"] == 10240 and manifest["attempt"] == 2
    assert store.exists(saved.path)
    loaded = store.load(saved.path)
    assert (loaded.step, loaded.files, loaded.meta) == (340, files, {"note": "hi"})

    # A second store, as another worker would open it, sees the same checkpoint.
    assert CheckpointStore(f"s3://{bucket}/ckpts").load(saved.path).files == files

    later = store.save("job1", 2, 400, {"a.bin": b"later"})
    store.delete(saved.path)
    assert s3.keys(bucket, prefix) == [] and not store.exists(saved.path)
    assert store.exists(later.path)

    model = store.save_model("job1", {"model.safetensors": b"w" * 100}, {"step": 400})
    assert model.path == "models/job1/a0001" and model.step == 400
    store.delete_job("job1")
    assert s3.keys(bucket, "ckpts/jobs/") == []
    assert store.load_model("job1").files == {"model.safetensors": b"w" * 100}
    store.delete_job("job1")  # nothing left to delete is not an error

    assert store.probe() > 0
    assert s3.keys(bucket, "ckpts/probe/") == []
    assert s3.keys(bucket) == ["ckpts/models/job1/a0001/MANIFEST.json",
                               "ckpts/models/job1/a0001/model.safetensors"]


@pytest.mark.parametrize("damage, reason", [
    ("flip", "fails its blake3 check"),
    ("truncate", "(truncated?)"),
    ("no-manifest", "manifest is missing"),
    ("bad-manifest", "not valid JSON"),
    ("missing-file", "file t.bin is missing"),
])
def test_a_damaged_object_is_detected_not_loaded(s3: S3Server, bucket: str,
                                                 store: CheckpointStore, damage: str,
                                                 reason: str) -> None:
    saved = store.save("job1", 1, 10, {"t.bin": bytes(range(256)) * 10})
    key = f"ckpts/{saved.path}/t.bin"
    manifest_key = f"ckpts/{saved.path}/{MANIFEST}"
    client = s3.client()
    raw = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    if damage == "flip":
        raw[100] ^= 0xFF
        client.put_object(Bucket=bucket, Key=key, Body=bytes(raw))
    elif damage == "truncate":
        client.put_object(Bucket=bucket, Key=key, Body=bytes(raw[:-7]))
    elif damage == "no-manifest":
        client.delete_object(Bucket=bucket, Key=manifest_key)
    elif damage == "bad-manifest":
        client.put_object(Bucket=bucket, Key=manifest_key, Body=b"{not json")
    else:
        client.delete_object(Bucket=bucket, Key=key)
    with pytest.raises(CheckpointCorrupt, match=re.escape(reason)):
        store.load(saved.path)
    assert store.exists(saved.path) is (damage != "no-manifest")


def test_a_manifest_written_by_another_host_is_seen_at_once(
        s3: S3Server, bucket: str, store: CheckpointStore) -> None:
    saved = store.save("job1", 1, 5, {"t.bin": b"data"})
    manifest_key = f"ckpts/{saved.path}/{MANIFEST}"
    client = s3.client()
    body = client.get_object(Bucket=bucket, Key=manifest_key)["Body"].read()
    client.delete_object(Bucket=bucket, Key=manifest_key)
    # This process lists the checkpoint while it is uncommitted...
    assert [p.rsplit("/", 1)[1] for p in store.fs.ls(store._abs(saved.path))] == ["t.bin"]
    assert not store.exists(saved.path)
    # ...then another host commits it: no listing cached here may hide the manifest.
    client.put_object(Bucket=bucket, Key=manifest_key, Body=body)
    assert store.exists(saved.path)
    assert store.load(saved.path).files == {"t.bin": b"data"}


def test_a_failed_write_leaves_no_manifest(s3: S3Server, bucket: str, store: CheckpointStore,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    real = store.fs.pipe_file

    def second_file_fails(path: str, data: bytes, **kw: object) -> None:
        if path.endswith("/b.bin"):
            raise OSError("connection reset (injected)")
        real(path, data, **kw)

    # The real S3 filesystem, with one upload failing as a dropped connection would.
    with monkeypatch.context() as m, pytest.raises(OSError, match="injected"):
        m.setattr(store.fs, "pipe_file", second_file_fails)
        store.save("job1", 1, 7, {"a.bin": b"a" * 1000, "b.bin": b"b" * 1000})
    rel = "jobs/job1/a0001-s000000007"
    assert s3.keys(bucket) == [f"ckpts/{rel}/a.bin"]
    assert not store.exists(rel)
    with pytest.raises(CheckpointCorrupt, match="manifest is missing"):
        store.load(rel)


def test_a_missing_bucket_fails_and_is_not_created(s3: S3Server, aws_env: dict[str, str]
                                                   ) -> None:
    missing = "spotrun-no-such-bucket"
    store = CheckpointStore(f"s3://{missing}/ckpts")
    with pytest.raises(FileNotFoundError):
        store.save("job1", 1, 1, {"t.bin": b"x"})
    with pytest.raises(FileNotFoundError):
        store.probe()
    names = [b["Name"] for b in s3.client().list_buckets()["Buckets"]]
    assert missing not in names


def test_the_endpoint_comes_from_the_sdk_variables(
        s3: S3Server, bucket: str, aws_env: dict[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"s3://{bucket}/ckpts"
    # The generic variable alone...
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert CheckpointStore(url).probe() > 0
    # ...and the service-specific one first, as in the AWS SDKs.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)
    assert CheckpointStore(url).probe() > 0
    assert _storage_options(url) == {"use_listings_cache": False,
                                     "endpoint_url": s3.endpoint}
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    assert _storage_options(url) == {"use_listings_cache": False}
    assert _storage_options("gs://b/p") == {"use_listings_cache": False}
    assert _storage_options("/var/lib/spotrun") == {}
    assert _storage_options("memory://x") == {}


def test_doctor_probes_the_bucket_without_showing_the_secret(
        bucket: str, aws_env: dict[str, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from spotrun import doctor
    from spotrun.config import Settings

    monkeypatch.setenv("SPOTRUN_CHECKPOINT_URL", f"s3://{bucket}/ckpts")
    check = doctor.check_checkpoints(Settings.from_env(home=str(tmp_path)),
                                     remote_expected=True)
    assert check.status == "ok", check
    assert SECRET_KEY not in repr(check)


# ---------------------------------------------------------- real worker processes


def _s3_env(env_factory: Callable[..., Env], db_url: str, s3: S3Server, url: str) -> Env:
    env = env_factory(db_url, **s3.env(), SPOTRUN_CHECKPOINT_URL=url)
    for name in S3Server.cleared():
        env.vars.pop(name, None)
    return env


@pytest.mark.slow
def test_a_job_checkpointed_to_s3_is_resumed_by_another_host_bit_identical(
        env_factory: Callable[..., Env], sqlite_url: str, s3: S3Server, bucket: str,
        aws_env: dict[str, str]) -> None:
    url = f"s3://{bucket}/ckpts"
    params = {"epochs": 3, "seed": 11, "step_delay": 0.03}
    host1 = _s3_env(env_factory, sqlite_url, s3, url)
    st = host1.store()
    args = ["submit", "digits-train"]
    for k, v in params.items():
        args += ["-p", f"{k}={v}"]
    job_id = host1.cli(*args).stdout.strip()
    w1 = host1.worker("w1", preload=True)

    def past_step_40() -> bool:
        job = st.get(job_id, with_events=False)
        return job.state is JobState.RUNNING and job.progress.step >= 40

    wait_until(past_step_40, 60, "the job running past step 40", on_fail=w1.log)
    w1.signal(signal.SIGTERM)
    assert w1.wait(30) == 0, w1.log()

    job = st.get(job_id)
    assert job.state is JobState.QUEUED and job.preemptions == 1
    handed = next(e for e in reversed(job.events) if e.kind == "preempted")
    assert "checkpoint saved in" in handed.message, handed.message
    step = end_step(payload_of(handed))
    assert step is not None, handed.message
    assert step >= 40, handed.message
    assert job.checkpoint == f"jobs/{job_id}/a0001-s{step:09d}"
    assert f"ckpts/{job.checkpoint}/{MANIFEST}" in s3.keys(bucket, f"ckpts/{job.checkpoint}/")
    assert not (host1.home / "checkpoints").exists()

    # Another host: its own home and disk, the same database and bucket.
    host2 = _s3_env(env_factory, sqlite_url, s3, url)
    w2 = host2.worker("w2", preload=True)
    from spotrun.local import run_inline

    reference = run_inline("digits-train", {**params, "step_delay": 0})["weights_sha256"]
    wait_until(lambda: st.get(job_id, with_events=False).state.is_final, 90,
               "the job to end", on_fail=w2.log)
    job = st.get(job_id)
    events = [e.message for e in job.events]
    assert job.state is JobState.SUCCEEDED, events
    assert f"resumed on w2 from step {step}/135" in events, events
    assert job.result["weights_sha256"] == reference
    # The model of the attempt whose result the store accepted.
    assert job.result["model"] == f"models/{job_id}/a0002"
    assert s3.keys(bucket, f"ckpts/models/{job_id}/") == [
        f"ckpts/models/{job_id}/a0002/{MANIFEST}",
        f"ckpts/models/{job_id}/a0002/model.safetensors"]
    assert CheckpointStore(url).load_model(job_id, job.attempt).meta["weights_sha256"] == \
        reference
    wait_until(lambda: s3.keys(bucket, f"ckpts/jobs/{job_id}/") == [], 10,
               "the job's checkpoints to be deleted")
    assert not (host2.home / "checkpoints").exists()

    # The secret key went into every process's environment and nowhere else.
    outputs = {
        "w1 log": w1.log(), "w2 log": w2.log(),
        "show --json": host2.cli("show", job_id, "--json").stdout,
        "show": host2.cli("show", job_id).stdout,
        "logs": host2.cli("logs", job_id).stdout,
    }
    for what, text in outputs.items():
        assert SECRET_KEY not in text, f"the secret key appears in {what}"
    assert job_id in outputs["show --json"]
    w2.signal(signal.SIGTERM)
    assert w2.wait(30) == 0, w2.log()
    st.close()
