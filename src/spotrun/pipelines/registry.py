"""The pipeline registry: the built-ins plus the entry-point group ``spotrun.pipelines``."""

from __future__ import annotations

import logging
import re
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from pydantic import ValidationError

from spotrun.pipelines import (
    command,
    digits_infer,
    digits_train,
    minilm_embed,
    minilm_finetune,
    sleep,
)
from spotrun.pipelines.base import JOB_ID_PATTERN, Pipeline, SubmitRefused

log = logging.getLogger("spotrun.pipelines")
ENTRY_POINT_GROUP = "spotrun.pipelines"


class UnknownPipeline(LookupError):
    pass


@cache
def registry() -> dict[str, Pipeline]:
    """Every known pipeline by name."""
    found: dict[str, Pipeline] = {}
    for p in (digits_train.PIPELINE, digits_infer.PIPELINE, minilm_finetune.PIPELINE,
              minilm_embed.PIPELINE, sleep.PIPELINE, command.PIPELINE):
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


_JOB_ID_RE = re.compile(JOB_ID_PATTERN)


class VisibleJobs:
    """The store as one caller sees it, for a pipeline's submit-time checks.

    A job of another owner does not exist here: a check that names a job (a model to
    load, a file to read) can only ever answer "no such job" for it, exactly as for an id
    nobody used, so that a caller learns nothing of other users' jobs.
    ``owner=None`` is an operator (the CLI, an admin token): every job is visible.
    """

    def __init__(self, store: Any, owner: str | None) -> None:
        self._store = store
        self.owner = owner
        # Which database it is (checks may depend on where the workers run).
        self.is_postgres = bool(getattr(store, "is_postgres", True))

    def find(self, job_id: str) -> Any:
        """The job, or None when it does not exist or the caller may not see it."""
        if not isinstance(job_id, str) or not _JOB_ID_RE.match(job_id):
            return None
        job = self._store.find(job_id)
        if job is None or (self.owner is not None and job.owner != self.owner):
            return None
        return job


def validate_submission(name: str, raw: dict[str, Any], store: Any = None, *,
                        owner: str | None = None) -> tuple[Pipeline, dict[str, Any], bool]:
    """Validate params for a submit: (pipeline, params as JSON, requires CUDA).

    ``owner`` is the submitting user (None: an operator, who may see every job); checks
    that look up other jobs see only that caller's. Raises :class:`UnknownPipeline` or
    :class:`SubmitRefused` with one line naming the problem.
    """
    pipe = get(name)
    try:
        params = pipe.validate(raw)
    except ValidationError as exc:
        raise SubmitRefused(describe_validation_error(name, exc)) from None
    if pipe.check is not None and store is not None:
        pipe.check(params, VisibleJobs(store, owner))
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
