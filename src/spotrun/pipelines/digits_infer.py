"""``digits-infer``: classifies 8x8 digit images with the model of a digits-train job."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from spotrun.pipelines.base import JobContext, JobId, Params, SubmitRefused, pipeline


class DigitsInferParams(Params):
    model: JobId = Field(..., description="id of a succeeded digits-train job of yours")
    inputs: list[list[float]] | None = Field(
        None, max_length=10_000,
        # What _images checks, for the API's document.
        json_schema_extra={"items": {"type": "array", "minItems": 64, "maxItems": 64,
                                     "items": {"type": "number", "minimum": 0,
                                               "maximum": 16}}},
        description="images to classify, each 64 numbers from 0 to 16; "
                    "none: the held-out split")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("inputs")
    @classmethod
    def _images(cls, v: list[list[float]] | None) -> list[list[float]] | None:
        if v is None:
            return v
        for i, image in enumerate(v):
            if len(image) != 64:
                raise ValueError(f"image {i} has {len(image)} numbers, expected 64")
            if any(not (0 <= x <= 16) for x in image):
                raise ValueError(f"image {i} has values outside 0..16")
        return v


def _check(p: BaseModel, store: Any) -> None:
    assert isinstance(p, DigitsInferParams)
    # ``store`` shows only the caller's jobs: another user's model is "no job".
    job = store.find(p.model)
    if job is None:
        raise SubmitRefused(f"param 'model': no job with id {p.model!r}", param="model",
                            missing=True)
    if job.pipeline != "digits-train":
        raise SubmitRefused(f"param 'model': job {p.model} is a {job.pipeline} job, "
                            "not digits-train", param="model")
    if job.state.value != "succeeded":
        raise SubmitRefused(f"param 'model': job {p.model} has not succeeded "
                            f"(it is {job.state.value})", param="model")


def _requires_cuda(p: BaseModel) -> bool:
    return isinstance(p, DigitsInferParams) and p.device == "cuda"


@pipeline("digits-infer", params=DigitsInferParams, requires_cuda=_requires_cuda,
          check=_check, description="Classify digit images with a trained model")
def run(ctx: JobContext) -> dict[str, Any]:
    import torch

    # start-up: torch; every command that reads the registry imports this module
    from spotrun.pipelines import digits

    p = ctx.params
    assert isinstance(p, DigitsInferParams)
    device = digits.pick_device(p.device)
    model = ctx.load_model(p.model)
    weights = digits.tensors_from_bytes(model.files["model.safetensors"])
    net = digits.Net(int(model.meta["hidden"]))
    net.load_state_dict(weights)
    net.to(device).eval()
    labels: torch.Tensor | None = None
    if p.inputs is not None:
        x = torch.tensor(p.inputs, dtype=torch.float32) / 16.0
    else:
        split = digits.load_split()
        x, labels = split.x_test, split.y_test
    ctx.progress(0, 1)
    with torch.no_grad():
        predicted = net(x.to(device)).argmax(dim=1).cpu()
    ctx.progress(1, 1)
    result: dict[str, Any] = {"predictions": predicted.tolist(), "model": p.model}
    if labels is not None:
        result["accuracy"] = round(float((predicted == labels).float().mean()), 6)
    return result


PIPELINE = run
