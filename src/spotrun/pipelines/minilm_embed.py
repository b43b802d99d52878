"""``minilm-embed``: batch inference with MiniLM, exactly once per item across preemptions.

The texts (inline, or a UTF-8 file with one text per line under ``inputs/`` in the
checkpoint store) are cut into chunks of ``chunk_size``; one chunk is one step. Each chunk's
output is kept as its own file and every checkpoint commits all the chunk files done so
far, with ``progress.json`` saying how many there are. A resumed job reads those files back
and goes on at the first chunk they lack, so a chunk done before the last checkpoint is
never redone and one done after it is redone from scratch, replacing nothing: the output
holds every item exactly once. A chunk is computed from the same texts in the same batch
shape on every attempt, so its bytes are the same too, and the final output, the chunk
files joined in order, is byte-identical to an uninterrupted run's (same device type,
library versions and thread count, as for training).

Without ``model`` the output is ``embeddings.safetensors`` (tensors ``embeddings``, float32
[n, 384], L2-normalised, and ``index``, int64 [n], the item each row belongs to). With
``model`` (a succeeded minilm-finetune job) it is ``predictions.jsonl``, one line per item:
``{"index": i, "label": ..., "score": ...}``. The output is saved with the job's model, at
``models/<job id>/a<attempt>/`` in the checkpoint store (the succeeded attempt).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from spotrun.pipelines.base import JobContext, Params, State, SubmitRefused, pipeline

MAX_ITEMS = 20_000
MAX_TEXT = 10_000
EMBEDDINGS = "embeddings.safetensors"
PREDICTIONS = "predictions.jsonl"
PROGRESS = "progress.json"

Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT)]


# What check_input_path takes (parts of letters, digits, '.', '_' and '-', not '.' or
# '..'), and exactly one of texts and texts_file: for the API's document.
_PART = r"([A-Za-z0-9_-][A-Za-z0-9._-]*|\.[A-Za-z0-9_-][A-Za-z0-9._-]*|\.\.[A-Za-z0-9._-]+)"
INPUT_PATH_PATTERN = rf"^inputs/({_PART}/)*{_PART}$"


class MiniLMEmbedParams(Params):
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["texts"], "properties": {"texts": {"type": "array"},
                                               "texts_file": {"type": "null"}}},
        {"required": ["texts_file"], "properties": {"texts_file": {"type": "string"},
                                                    "texts": {"type": "null"}}}]})
    texts: list[Text] | None = Field(
        None, min_length=1, max_length=MAX_ITEMS, description="the texts, inline")
    texts_file: str | None = Field(
        None, max_length=512, json_schema_extra={"pattern": INPUT_PATH_PATTERN},
        description="or a UTF-8 file under inputs/ in the checkpoint store, one text a line")
    model: str | None = Field(
        None, min_length=1, max_length=64,
        description="id of a succeeded minilm-finetune job: classify instead of embed")
    chunk_size: int = Field(32, ge=1, le=1024, description="texts per step")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to run")
    step_delay: float = Field(0, ge=0, le=60, description="seconds slept after each chunk")

    @field_validator("texts_file")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        # start-up: fsspec; a pipeline module loads when the CLI starts
        from spotrun.checkpoints import check_input_path

        return v if v is None else check_input_path(v)

    @model_validator(mode="after")
    def _one_source(self) -> MiniLMEmbedParams:
        if (self.texts is None) == (self.texts_file is None):
            raise ValueError("give exactly one of texts and texts_file")
        return self


def _check(p: BaseModel, store: Any) -> None:
    assert isinstance(p, MiniLMEmbedParams)
    if p.model is None:
        return
    job = store.find(p.model)
    if job is None:
        raise SubmitRefused(f"param 'model': no job with id {p.model!r}", param="model",
                            missing=True)
    if job.pipeline != "minilm-finetune":
        raise SubmitRefused(f"param 'model': job {p.model} is a {job.pipeline} job, "
                            "not minilm-finetune", param="model")
    if job.state.value != "succeeded":
        raise SubmitRefused(f"param 'model': job {p.model} has not succeeded "
                            f"(it is {job.state.value})", param="model")


def _requires_cuda(p: BaseModel) -> bool:
    return isinstance(p, MiniLMEmbedParams) and p.device == "cuda"


def parse_texts(data: bytes, path: str) -> list[str]:
    """One text per line (a final newline is optional); ValueError names a bad line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 (byte {exc.start})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise ValueError(f"{path} holds no texts")
    if len(lines) > MAX_ITEMS:
        raise ValueError(f"{path} holds {len(lines)} texts; the limit is {MAX_ITEMS}")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"{path} line {i} is empty")
        if len(line) > MAX_TEXT:
            raise ValueError(f"{path} line {i} has {len(line)} characters; "
                             f"the limit is {MAX_TEXT}")
    return [line.rstrip("\r") for line in lines]


def chunk_name(i: int, mode: str) -> str:
    return f"chunk-{i:06d}." + ("safetensors" if mode == "embed" else "jsonl")


@pipeline("minilm-embed", params=MiniLMEmbedParams, requires_cuda=_requires_cuda,
          check=_check, description="Embed or classify texts with MiniLM, in chunks")
def run(ctx: JobContext) -> dict[str, Any]:
    import torch

    # start-up: torch; every command that reads the registry imports this module
    from spotrun.integrations import torch as spt

    # start-up: torch; every command that reads the registry imports this module
    from spotrun.pipelines import digits, minilm

    p = ctx.params
    assert isinstance(p, MiniLMEmbedParams)
    if p.texts is not None:
        texts = list(p.texts)
    else:
        assert p.texts_file is not None
        texts = parse_texts(ctx.read_input(p.texts_file), p.texts_file)
    device = digits.pick_device(p.device)
    n = len(texts)
    n_chunks = (n + p.chunk_size - 1) // p.chunk_size
    mode = "classify" if p.model else "embed"
    digest = hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()
    env = {**spt.environment(device.type), **minilm.versions()}

    encoder = minilm.load_encoder(device)
    labels: list[str] = []
    classifier: minilm.Classifier | None = None
    if p.model:
        trained = ctx.load_model(p.model)
        labels = list(trained.meta["labels"])
        classifier = _classifier(encoder, trained.files["model.safetensors"], labels,
                                 float(trained.meta.get("dropout", 0.0)), device)

    done: list[bytes] = []
    if ctx.resume is not None:
        saved = json.loads(ctx.resume.files[PROGRESS])
        if saved["input_sha256"] != digest:
            raise ValueError("the input changed since the job started (its sha256 is not the "
                             "one the checkpoint recorded); submit a new job for new texts")
        if saved["chunk_size"] != p.chunk_size or saved["mode"] != mode:
            raise ValueError("the checkpoint was written with other params")
        done = [ctx.resume.files[chunk_name(i, mode)] for i in range(int(saved["chunks"]))]
        if saved.get("env") != env:
            changed = ", ".join(f"{k} {saved['env'].get(k)} -> {v}" for k, v in env.items()
                                if saved["env"].get(k) != v)
            ctx.note(f"resumed on different hardware or software ({changed}): the output "
                     "will be complete but its later chunks not byte-identical to an "
                     "uninterrupted run's")
        ctx.log.info("resumed at chunk %d/%d", len(done), n_chunks)

    def state() -> State:
        files = {chunk_name(i, mode): data for i, data in enumerate(done)}
        files[PROGRESS] = json.dumps(
            {"chunks": len(done), "chunk_size": p.chunk_size, "items": n, "mode": mode,
             "input_sha256": digest, "env": env}, sort_keys=True).encode()
        return State(len(done), files, {"env": env})

    ctx.set_state(state)
    ctx.progress(len(done), n_chunks, items=min(n, len(done) * p.chunk_size))
    started = time.perf_counter()
    fresh = 0
    while len(done) < n_chunks:
        if ctx.should_stop():
            ctx.stop()
        k = len(done)
        lo, hi = k * p.chunk_size, min(n, (k + 1) * p.chunk_size)
        batch = texts[lo:hi]
        index = torch.arange(lo, hi, dtype=torch.int64)
        if classifier is None:
            vectors = minilm.embed(encoder, batch, device).cpu()
            done.append(digits.tensors_to_bytes({"embeddings": vectors, "index": index}))
        else:
            probs = classifier.probabilities(batch, device).cpu()
            score, best = probs.max(dim=1)
            done.append(b"".join(
                json.dumps({"index": i, "label": labels[b], "score": float(s)}).encode() + b"\n"
                for i, b, s in zip(index.tolist(), best.tolist(), score.tolist(), strict=True)))
        fresh += hi - lo
        if p.step_delay:
            time.sleep(p.step_delay)
        ctx.progress(len(done), n_chunks, items=hi)
    seconds = time.perf_counter() - started

    output = _join(done, mode, n)
    name = EMBEDDINGS if mode == "embed" else PREDICTIONS
    sha = hashlib.sha256(output).hexdigest()
    path = ctx.save_model({name: output}, {
        "mode": mode, "items": n, "chunks": n_chunks, "output": name, "output_sha256": sha,
        "input_sha256": digest, "model": p.model or minilm.MODEL_NAME, "labels": labels,
        "env": env})
    result: dict[str, Any] = {
        "mode": mode, "items": n, "chunks": n_chunks, "output": f"{path}/{name}",
        "output_sha256": sha, "items_this_attempt": fresh,
        "items_per_second": round(fresh / seconds, 2) if seconds > 0 and fresh else None}
    return result


def _join(chunks: list[bytes], mode: str, n: int) -> bytes:
    """The final output: the chunk files joined in order; checks each item is there once."""
    import torch

    # start-up: torch; every command that reads the registry imports this module
    from spotrun.pipelines import digits

    if mode == "embed":
        parts = [digits.tensors_from_bytes(c) for c in chunks]
        index = torch.cat([t["index"] for t in parts])
        if not torch.equal(index, torch.arange(n)):
            raise RuntimeError("the chunks do not hold every item exactly once")
        return digits.tensors_to_bytes({"embeddings": torch.cat([t["embeddings"] for t in parts]),
                                        "index": index})
    out = b"".join(chunks)
    seen = [json.loads(line)["index"] for line in out.splitlines()]
    if seen != list(range(n)):
        raise RuntimeError("the chunks do not hold every item exactly once")
    return out


def _classifier(encoder: Any, weights: bytes, labels: list[str], dropout: float,
                device: Any) -> Any:
    # start-up: torch; every command that reads the registry imports this module
    from spotrun.pipelines import digits, minilm

    tensors = digits.tensors_from_bytes(weights)
    head = minilm.Head(len(labels), dropout)
    head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    layer = {k[6:]: v for k, v in tensors.items() if k.startswith("layer.")}
    if layer:
        minilm.last_layer(encoder).load_state_dict(layer)
    return minilm.Classifier(encoder, head).to(device).eval()


PIPELINE = run
