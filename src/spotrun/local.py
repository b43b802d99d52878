"""Run a pipeline inline, outside any queue: the reference run that resumed runs must equal."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from typing import Any

from spotrun.checkpoints import CheckpointStore, Loaded, Saved
from spotrun.pipelines.base import JobContext, Pipeline, State
from spotrun.pipelines.registry import get as get_pipeline


class _InlineDriver:
    def __init__(self, store: CheckpointStore, job_id: str) -> None:
        self.store = store
        self.job_id = job_id

    def report(self, step: int, total: int | None, metrics: dict[str, Any]) -> None:
        pass

    def stop_requested(self) -> bool:
        return False

    def checkpoint_due(self, step: int) -> bool:
        return False

    def checkpoint(self, state: State) -> None:  # pragma: no cover - never due
        pass

    def note(self, message: str) -> None:
        pass

    def save_model(self, files: Mapping[str, bytes], meta: Mapping[str, Any]) -> Saved:
        return self.store.save_model(self.job_id, files, meta, attempt=1)

    def load_model(self, job_id: str) -> Loaded:
        return self.store.load_model(job_id)

    def read_input(self, path: str) -> bytes:
        return self.store.read_input(path)


def run_inline(pipeline: str | Pipeline, params: Mapping[str, Any], *,
               checkpoint_url: str | None = None) -> Any:
    """Run ``pipeline`` (a name, or a pipeline not installed) uninterrupted in this process
    and return its result."""
    pipe = get_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
    validated = pipe.validate(params)
    with tempfile.TemporaryDirectory(prefix="spotrun-inline-") as tmp:
        store = CheckpointStore(checkpoint_url or tmp)
        ctx = JobContext(job_id="inline", attempt=1, params=validated,
                         driver=_InlineDriver(store, "inline"))
        return pipe.run(ctx)
