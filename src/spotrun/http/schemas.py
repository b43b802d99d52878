"""The API's documents: the pydantic models of its requests and answers (``/openapi.json``).

:class:`SubmitRequest` takes its limits from :mod:`spotrun.service.submission`, the same
that the CLI's options take, and turns into a :class:`Submission` for the service.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from spotrun.config import POOL_PATTERN, check_pool
from spotrun.jobs import JobState, OnPreempt
from spotrun.service import callback_urls
from spotrun.service import submission as limits
from spotrun.service.submission import Submission

# The pattern of text without NUL: the store cannot keep one (bad_value's rule), and the
# document says so wherever the server checks it.
NO_NUL = "^[^\\x00]*$"


class FieldError(BaseModel):
    field: str = Field(description="where the problem is, e.g. body.params.epochs")
    reason: str


class ApiError(BaseModel):
    """Every error answer: one line for people, and the fields at fault for 422."""

    detail: str
    errors: list[FieldError] = Field(default_factory=list)


# The form the server takes (callback_urls.URL_PATTERN, which check_callback_url applies
# with its own messages); pydantic only documents it.
CallbackUrl = Annotated[str, Field(
    min_length=1, max_length=callback_urls.MAX_URL_LENGTH,
    json_schema_extra={"format": "uri", "pattern": callback_urls.URL_PATTERN})]
# check_pool's rule; it answers with its own message, pydantic only documents it.
PoolName = Annotated[str, Field(min_length=1, max_length=32,
                                json_schema_extra={"pattern": POOL_PATTERN})]


class SubmitRequest(BaseModel):
    """A job to queue. ``params`` are checked against the pipeline's schema
    (see ``GET /v1/pipelines``)."""

    model_config = ConfigDict(extra="forbid")

    pipeline: str = Field(min_length=1, max_length=100, examples=["sleep"],
                          description="name of a pipeline from GET /v1/pipelines")
    params: dict[str, Any] = Field(default_factory=dict, examples=[{"seconds": 2}])
    priority: int = Field(0, ge=limits.PRIORITY[0], le=limits.PRIORITY[1],
                          description="higher runs first")
    max_retries: int = Field(4, ge=limits.MAX_RETRIES[0], le=limits.MAX_RETRIES[1],
                             description="times a lost worker may send the job back")
    on_preempt: OnPreempt = Field(
        OnPreempt.RESUME, description="on a preemption notice: resume from the last "
        "checkpoint, restart from the beginning, or fail")
    timeout: float | None = Field(None, gt=0, le=limits.TIMEOUT_MAX_SECONDS,
                                  description="time limit in seconds of running")
    callback_url: CallbackUrl | None = Field(
        None, description="receives a POST of the job as JSON on every state change. A URL of "
        "this form whose destination the server will not call (a name that does not "
        "resolve and, unless the operator allows it, a port other than 80 and 443 or a "
        "loopback, private or link-local address) answers 403 naming "
        "body.callback_url")
    pool: PoolName | None = Field(
        None, examples=["spot"],
        description="run only on workers of this pool (spot, on-demand, or a name of "
        "your own: lower-case letters, digits and '-')")
    checkpoint_every_steps: int | None = Field(
        None, ge=limits.CHECKPOINT_EVERY_STEPS[0], le=limits.CHECKPOINT_EVERY_STEPS[1],
        description="checkpoint every N steps")
    checkpoint_every_seconds: float | None = Field(
        None, ge=limits.CHECKPOINT_EVERY_SECONDS[0], le=limits.CHECKPOINT_EVERY_SECONDS[1],
        description="checkpoint every S seconds (default: the Young/Daly interval)")
    max_preemptions: int | None = Field(
        None, ge=limits.MAX_PREEMPTIONS[0], le=limits.MAX_PREEMPTIONS[1],
        description="move to on-demand workers after N preemptions (default: the "
        "workers' SPOTRUN_MAX_PREEMPTIONS, 5)")
    deadline: float | None = Field(
        None, ge=limits.DEADLINE_SECONDS[0], le=limits.DEADLINE_SECONDS[1],
        description="seconds from now by which the job should be done; it moves to "
        "on-demand workers when spot progress cannot make it")

    @field_validator("pool")
    @classmethod
    def _pool_name(cls, value: str | None) -> str | None:
        # The CLI's own check (`spotrun submit --pool`), raised as pydantic's ValueError.
        return None if value is None else check_pool(value)

    def submission(self, *, strict_params: bool = False) -> Submission:
        """The request for the service; ``strict_params`` for JSON params (the API's),
        which must be exactly of their schema's types."""
        return Submission(
            pipeline=self.pipeline, params=self.params, priority=self.priority,
            max_retries=self.max_retries, on_preempt=self.on_preempt, timeout=self.timeout,
            pool=self.pool, checkpoint_every_steps=self.checkpoint_every_steps,
            checkpoint_every_seconds=self.checkpoint_every_seconds,
            max_preemptions=self.max_preemptions, deadline=self.deadline,
            callback_url=self.callback_url, strict_params=strict_params)


class BatchJob(SubmitRequest):
    """One job of a batch: the document of ``POST /v1/jobs``, with its own idempotency
    key (the header's part for a job on its own)."""

    idempotency_key: str | None = Field(
        None, min_length=1, max_length=200, json_schema_extra={"pattern": NO_NUL},
        description="a retried batch with this job's key returns the job queued first; "
        "a key may appear once in a batch")


class BatchRequest(BaseModel):
    """Jobs to queue at once: all of them, or none when any is refused (the answer names
    it as ``body.jobs.<index>``)."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[BatchJob] = Field(min_length=1, max_length=limits.MAX_BATCH,
                                 description=f"1 to {limits.MAX_BATCH} jobs (and a body "
                                 "of at most 1 MB)")


class ProgressOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    step: int
    total: int | None


class EventOut(BaseModel):
    at: str = Field(description="ISO 8601 time, UTC")
    kind: str
    worker: str | None
    attempt: int
    message: str
    detail: str | None = Field(
        None, description="How the message was worked out (a formula and its inputs)")
    data: dict[str, Any] | None = Field(
        None, description="The facts the message is rendered from, by kind: \"v\" (the "
        "version of their shape, 1) and the fields of the event's kind (a preemption's "
        "\"worker\", \"step\", \"total\", \"resume\"; a failure's \"error\", \"cause\"; "
        "...); fields without a value are left out. null for events recorded before "
        "spotrun stored them")


class JobOut(BaseModel):
    """The job's JSON shape, the same as ``spotrun show --json``."""

    id: str
    pipeline: str
    params: dict[str, Any]
    state: JobState
    priority: int
    attempt: int
    preemptions: int
    retries: int
    max_retries: int
    on_preempt: OnPreempt
    timeout: float | None
    worker: str | None
    progress: ProgressOut
    result: Any
    error: str | None
    created_at: str
    updated_at: str
    events: list[EventOut] = Field(
        default_factory=list, description="the job's history (absent in lists)")


class BatchOut(BaseModel):
    jobs: list[JobOut] = Field(description="the jobs queued, in the request's order")


class JobPage(BaseModel):
    jobs: list[JobOut]
    limit: int
    offset: int
    next_offset: int | None = Field(description="offset of the next page; null on the last")


class ResultOut(BaseModel):
    id: str
    state: JobState
    result: Any = Field(description="the pipeline's result once the job succeeded")
    error: str | None


class EventsOut(BaseModel):
    events: list[EventOut]


class LogLineOut(BaseModel):
    at: str
    attempt: int
    level: str
    message: str


class LogsOut(BaseModel):
    logs: list[LogLineOut]


class PipelineOut(BaseModel):
    name: str
    description: str
    params: dict[str, Any] = Field(description="JSON Schema of the params")


class WorkerOut(BaseModel):
    id: str
    name: str
    host: str
    pid: int
    pool: str
    state: str
    has_cuda: bool
    current_job: str | None
    started_at: str
    last_heartbeat: str


class PreemptOut(BaseModel):
    worker: str
    pid: int
    message: str


class CallbackSecretOut(BaseModel):
    owner: str
    secret: str = Field(description="the key your jobs' callbacks are signed with")
    header: str = Field(description="the header that carries the signature")
    scheme: str = Field(description="how the signature is made")


class Status(BaseModel):
    status: str
    detail: str | None = None


def errors_doc(*codes: int) -> dict[int | str, dict[str, Any]]:
    words = {401: "no valid token", 403: "not allowed (the detail says why)",
             404: "not found, or not yours (a job, or a job a submission's params name)",
             409: "cannot be done in the current state (a submission: what its params "
                  "name is not usable now, e.g. a model job that has not succeeded)",
             413: "request body too large",
             422: "invalid input", 429: "over a limit (the detail names it)",
             503: "the database cannot be reached"}
    return {c: {"model": ApiError, "description": words[c]} for c in codes}


def document_pipelines(doc: dict[str, Any], params_of: dict[str, dict[str, Any]]) -> None:
    """Say in the API document ``doc`` which pipelines a job may name and, for each, the
    JSON Schema its ``params`` must meet (``params_of``: name to schema, as
    ``GET /v1/pipelines`` answers it)."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    requests = [schemas[name] for name in ("SubmitRequest", "BatchJob") if name in schemas]
    for request in requests:
        request["properties"]["pipeline"]["enum"] = sorted(params_of)
    branches = []
    for name, schema in sorted(params_of.items()):
        prefix = "".join(part.title() for part in name.replace("_", "-").split("-"))
        body = _hoist_defs(_without_nul(schema), prefix, schemas)
        ref = f"{prefix}Params"
        schemas[ref] = body
        # A schema that {} cannot meet (a required param, "one of these") needs params.
        needs = bool(body.get("required") or body.get("anyOf") or body.get("oneOf"))
        required = ["pipeline"] + (["params"] if needs else [])
        branches.append({"properties": {"pipeline": {"const": name},
                                        "params": {"$ref": f"#/components/schemas/{ref}"}},
                         "required": required})
    for request in requests:
        request["oneOf"] = branches


def _without_nul(node: Any) -> Any:
    """``node`` with :data:`NO_NUL` as the pattern of every string that has none (every
    string of a job's params is checked for NUL; a pattern of its own excludes NUL)."""
    if isinstance(node, list):
        return [_without_nul(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _without_nul(v) for k, v in node.items()}
    if out.get("type") == "string" and "pattern" not in out and "enum" not in out \
            and "const" not in out:
        out["pattern"] = NO_NUL
    return out


def _hoist_defs(schema: dict[str, Any], prefix: str, schemas: dict[str, Any]
                ) -> dict[str, Any]:
    """``schema`` with its ``$defs`` moved into the document's components (named with
    ``prefix``), its references rewritten to match."""
    schema = dict(schema)
    defs = schema.pop("$defs", {})

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: rewrite(v) for k, v in node.items()}
            ref = out.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                out["$ref"] = f"#/components/schemas/{prefix}{ref.removeprefix('#/$defs/')}"
            return out
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    for key, value in defs.items():
        schemas[f"{prefix}{key}"] = rewrite(value)
    return dict(rewrite(schema))
