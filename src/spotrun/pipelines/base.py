"""The public API for pipeline authors.

A pipeline is a named function that receives a :class:`JobContext` and returns a JSON-able
result. Between steps it reports ``ctx.progress(step, total, **metrics)`` (a step boundary:
the worker may checkpoint here), which returns whether the job must stop; when it does the
pipeline calls ``ctx.stop()``, which unwinds the pipeline. ``ctx.should_stop()`` polls the
same flag anywhere else (stopping there keeps the last committed checkpoint). A pipeline
that can resume gives the worker a state provider with ``ctx.set_state(fn)`` and reads
``ctx.resume`` at start.

Nothing here imports an ML library: commands that run no pipeline must start fast.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Protocol

from pydantic import AfterValidator, BaseModel, ConfigDict, WithJsonSchema
from pydantic_core import PydanticCustomError

if TYPE_CHECKING:
    from spotrun.checkpoints import Loaded, Saved


# The shape of a job id, for params that name another job.
JOB_ID_PATTERN = r"^[0-9a-f]{28}$"
_JOB_ID = re.compile(JOB_ID_PATTERN)


def _job_id(value: str) -> str:
    if not _JOB_ID.match(value):
        raise PydanticCustomError("job_id", "is not a job id (28 hexadecimal digits)")
    return value


# A param that names another job: documented and checked as a job id.
JobId = Annotated[str, AfterValidator(_job_id),
                  WithJsonSchema({"type": "string", "pattern": JOB_ID_PATTERN})]


class Params(BaseModel):
    """Base class for a pipeline's params: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class JobStopped(BaseException):
    """Raised by :meth:`JobContext.stop` to unwind a pipeline at a step boundary.

    A ``BaseException``, as ``KeyboardInterrupt`` and asyncio's ``CancelledError`` are: a
    pipeline's ``except Exception:`` cannot swallow the stop and return a partial result
    as if the job had succeeded. Clean up in ``finally:`` blocks.
    """


class SubmitRefused(ValueError):
    """A submit-time check failed; the message names the problem.

    ``param`` names the param at fault, when there is one: the API reports it as the
    field (``body.params.<param>``) without reading it back from the message.
    ``missing``: a job the params name does not exist (or is not the caller's); the API
    answers 404 for it, and 409 for any other refusal of params that meet the schema.
    """

    def __init__(self, message: str, *, param: str | None = None,
                 missing: bool = False) -> None:
        super().__init__(message)
        self.param = param
        self.missing = missing


def _integral_as_int(value: Any) -> Any:
    """``value`` with every float that is a whole number made an int."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral_as_int(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral_as_int(v) for v in value]
    return value


@dataclass(frozen=True)
class State:
    """What a pipeline hands over to be checkpointed: files (safetensors, JSON) by name."""

    step: int
    files: Mapping[str, bytes]
    meta: Mapping[str, Any] = field(default_factory=dict)
    # Or a local directory whose files are the state (then ``files`` is empty): committed
    # by streaming them, restored into ``JobContext.state_dir`` on the next attempt.
    directory: str | None = None
    # Nothing writes ``directory`` after this commit: a local store may hard-link its files.
    directory_final: bool = False


class Driver(Protocol):
    """What the worker provides to a running pipeline (implemented by the worker)."""

    def report(self, step: int, total: int | None, metrics: dict[str, Any]) -> None: ...

    def stop_requested(self) -> bool: ...

    def checkpoint_due(self, step: int) -> bool: ...

    def checkpoint(self, state: State) -> None: ...

    def save_model(self, files: Mapping[str, bytes], meta: Mapping[str, Any]) -> Saved: ...

    def note(self, message: str) -> None: ...

    def load_model(self, job_id: str) -> Loaded: ...

    def read_input(self, path: str) -> bytes: ...


class JobContext:
    """What a running pipeline sees of its job."""

    def __init__(self, *, job_id: str, attempt: int, params: BaseModel, driver: Driver,
                 resume: Loaded | None = None, logger: logging.Logger | None = None,
                 worker: str = "", has_cuda: bool = False, state_dir: Path | None = None,
                 deadline: Callable[[], float | None] | None = None) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.params = params
        self.resume = resume
        self.worker = worker
        self.has_cuda = has_cuda
        self.log = logger or logging.getLogger(f"spotrun.job.{job_id}")
        self._driver = driver
        self._state_fn: Callable[[], State] | None = None
        # For a pipeline declared with ``state_dir=True``: a local directory holding the
        # files of the job's last committed directory checkpoint (empty on a first run).
        self.state_dir = state_dir
        self._deadline = deadline
        # Set by a pipeline whose work outlives its thread (a child process): the worker
        # calls it when it hands the job back without waiting for the pipeline.
        self.on_abandon: Callable[[], None] | None = None

    def progress(self, step: int, total: int | None = None, **metrics: Any) -> bool:
        """Report progress at a step boundary; the worker may checkpoint here.

        Returns :meth:`should_stop`, read after the checkpoint decision: a pipeline that
        stops when this is true (``if ctx.progress(...): ctx.stop()``) never stops without
        the notice checkpoint, even when the notice arrives during this call.
        """
        self._driver.report(step, total, metrics)
        if self._state_fn is not None and self._driver.checkpoint_due(step):
            self._driver.checkpoint(self._state_fn())
        stop = self._driver.stop_requested()
        if stop and self._state_fn is not None and self._driver.checkpoint_due(step):
            # The notice came in after the check above; this is still the boundary just
            # reported, so its checkpoint is taken here rather than lost.
            self._driver.checkpoint(self._state_fn())
        return stop

    def should_stop(self) -> bool:
        """True once the job must stop: preemption notice, cancel, time limit, lost lease."""
        return self._driver.stop_requested()

    def stop(self) -> NoReturn:
        """Unwind the pipeline now (call it when :meth:`should_stop` is true)."""
        raise JobStopped()

    def checkpoint_now(self, state: State) -> None:
        """Commit ``state`` now, outside the schedule; once a stop was requested, only
        where the job's policy wants a checkpoint (a notice, with on_preempt=resume)."""
        if self.should_stop() and not self._driver.checkpoint_due(state.step):
            return
        self._driver.checkpoint(state)

    def notice_deadline(self) -> float | None:
        """The ``time.monotonic()`` by which the job is handed back, once a notice set one."""
        return None if self._deadline is None else self._deadline()

    def set_state(self, fn: Callable[[], State]) -> None:
        """Give the worker a function that captures the state to checkpoint."""
        self._state_fn = fn

    def note(self, message: str) -> None:
        """Add a line to the job's history, for its user to read."""
        self._driver.note(message)

    def save_model(self, files: Mapping[str, bytes], meta: Mapping[str, Any]) -> str:
        """Store the final model where any worker or host can load it; return its path."""
        return self._driver.save_model(files, meta).path

    def load_model(self, job_id: str) -> Loaded:
        """Load and verify the final model of another job."""
        return self._driver.load_model(job_id)

    def read_input(self, path: str) -> bytes:
        """Read a file placed under ``inputs/`` in the checkpoint store (e.g.
        ``inputs/texts.txt``); raises ``spotrun.checkpoints.InputMissing`` if absent."""
        return self._driver.read_input(path)


Runner = Callable[[JobContext], Any]


@dataclass(frozen=True)
class Pipeline:
    """A named, validated unit of work."""

    name: str
    params: type[BaseModel]
    run: Runner
    description: str = ""
    # Whether a job with these params may only run on a worker with CUDA.
    requires_cuda: Callable[[BaseModel], bool] = field(default=lambda p: False)
    # Extra submit-time checks that need the store (e.g. a model exists).
    check: Callable[[BaseModel, Any], None] | None = None
    # Whether the worker gives the pipeline ``ctx.state_dir``, restored from the job's last
    # directory checkpoint, instead of ``ctx.resume`` files in memory.
    state_dir: bool = False

    def validate(self, raw: Mapping[str, Any], *, strict: bool = False) -> BaseModel:
        """The params, or pydantic's ValidationError. ``strict``: values of the types
        their JSON Schema says (as the API's document does: no text for a number, no 0
        for false), where the CLI's ``key=value`` needs text read as numbers."""
        if strict:
            # A check only, on JSON Schema's terms: 3.0 is an integer there.
            self.params.model_validate_json(json.dumps(_integral_as_int(dict(raw))),
                                            strict=True)
        return self.params.model_validate(dict(raw))

    def schema(self) -> dict[str, Any]:
        return self.params.model_json_schema()


def pipeline(name: str, *, params: type[BaseModel], description: str = "",
             requires_cuda: Callable[[BaseModel], bool] | None = None,
             check: Callable[[BaseModel, Any], None] | None = None,
             state_dir: bool = False) -> Callable[[Runner], Pipeline]:
    """Decorator that turns a function of a :class:`JobContext` into a :class:`Pipeline`."""

    def wrap(fn: Runner) -> Pipeline:
        return Pipeline(name=name, params=params, run=fn,
                        description=description or (fn.__doc__ or "").strip().split("\n")[0],
                        requires_cuda=requires_cuda or (lambda p: False), check=check,
                        state_dir=state_dir)

    return wrap
