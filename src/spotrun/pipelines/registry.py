"""The pipeline registry: the built-ins plus the entry-point group ``spotrun.pipelines``."""

from __future__ import annotations

import logging
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from pydantic import ValidationError

from spotrun.pipelines.base import Pipeline, SubmitRefused

log = logging.getLogger("spotrun.pipelines")
ENTRY_POINT_GROUP = "spotrun.pipelines"


class UnknownPipeline(LookupError):
    pass


@cache
def registry() -> dict[str, Pipeline]:
    """Every known pipeline by name."""
    from spotrun.pipelines import (
        digits_infer,
        digits_train,
        minilm_embed,
        minilm_finetune,
        sleep,
    )

    found: dict[str, Pipeline] = {}
    for p in (digits_train.PIPELINE, digits_infer.PIPELINE, minilm_finetune.PIPELINE,
              minilm_embed.PIPELINE, sleep.PIPELINE):
        found[p.name] = p
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not break the built-ins
            log.warning("pipeline entry point %s failed to load: %s", ep.name, exc)
            continue
        if not isinstance(obj, Pipeline):
            log.warning("entry point %s is not a spotrun Pipeline; ignored", ep.name)
            continue
        found.setdefault(obj.name, obj)
    return found


def get(name: str) -> Pipeline:
    pipes = registry()
    if name not in pipes:
        raise UnknownPipeline(
            f"unknown pipeline {name!r}; known pipelines: {', '.join(sorted(pipes))}"
        )
    return pipes[name]


def validate_submission(name: str, raw: dict[str, Any], store: Any = None
                        ) -> tuple[Pipeline, dict[str, Any], bool]:
    """Validate params for a submit: (pipeline, params as JSON, requires CUDA).

    Raises :class:`UnknownPipeline` or :class:`SubmitRefused` with one line naming the
    problem.
    """
    pipe = get(name)
    try:
        params = pipe.validate(raw)
    except ValidationError as exc:
        raise SubmitRefused(describe_validation_error(name, exc)) from None
    if pipe.check is not None and store is not None:
        pipe.check(params, store)
    return pipe, params.model_dump(mode="json"), pipe.requires_cuda(params)


def describe_validation_error(name: str, exc: ValidationError) -> str:
    """One line naming each bad param and why."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "params"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown param {loc!r}")
        elif err["type"] == "missing":
            parts.append(f"param {loc!r} is required")
        else:
            parts.append(f"param {loc!r}: {err['msg']}")
    return f"bad params for {name}: " + "; ".join(parts)
