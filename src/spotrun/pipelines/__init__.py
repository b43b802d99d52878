"""Pipelines: the public API for their authors, the registry and the built-ins."""

from spotrun.pipelines.base import (
    JobContext,
    JobStopped,
    Params,
    Pipeline,
    State,
    SubmitRefused,
    pipeline,
)
from spotrun.pipelines.registry import UnknownPipeline, get, registry, validate_submission

__all__ = [
    "JobContext",
    "JobStopped",
    "Params",
    "Pipeline",
    "State",
    "SubmitRefused",
    "UnknownPipeline",
    "get",
    "pipeline",
    "registry",
    "validate_submission",
]
