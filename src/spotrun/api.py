"""The HTTP API: a thin FastAPI layer over the store, documented at ``/openapi.json``.

Everything under ``/v1`` needs a bearer token (see ``spotrun token create``); a user sees
and cancels only the jobs they submitted, an admin sees all. A job of someone else
answers 404, exactly like a job that does not exist. Client mistakes answer 4xx with a
one-line ``detail`` (and, for 422, the fields at fault); they never answer 5xx.

Live progress (Server-Sent Events under ``/v1/stream``) is driven by one
:class:`ChangeFeed` per server process, not by each client polling: on PostgreSQL it waits
on the store's NOTIFY channel through a single LISTEN connection, on SQLite it polls
:meth:`JobStore.change_marker`; either way it then reads the jobs that changed once and
fans them out to every client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from spotrun import callbacks
from spotrun.config import ConfigError, Settings
from spotrun.jobs import EventKind, Job, JobState, OnPreempt, Worker
from spotrun.local import is_spotrun_process
from spotrun.quotas import QuotaExceeded
from spotrun.store import Conflict, DatabaseUnavailable, JobNotFound, JobStore

log = logging.getLogger("spotrun.api")

MAX_BODY_BYTES = 1_000_000
# The dashboard's session cookie: a session id, never an API token. Over HTTPS it carries
# the __Host- prefix (Secure, Path=/, no Domain: no subdomain can set or shadow it).
SESSION_COOKIE = "spotrun_session"
SECURE_SESSION_COOKIE = "__Host-spotrun_session"
JOB_ID_RE = re.compile(r"^[0-9A-Za-z_-]{1,32}$")
LIVE_WORKER_STATES = ("idle", "busy", "stopping")


# ------------------------------------------------------------------------- JSON


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by null (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def json_bytes(value: Any) -> bytes:
    """Strict JSON: a pipeline's result or metrics may hold NaN, which JSON cannot carry."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:
        text = json.dumps(_finite(value), ensure_ascii=False, allow_nan=False,
                          separators=(",", ":"))
    return text.encode("utf-8", errors="replace")


class StrictJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json_bytes(content)


# ---------------------------------------------------------------- API documents


class FieldError(BaseModel):
    field: str = Field(description="where the problem is, e.g. body.params.epochs")
    reason: str


class ApiError(BaseModel):
    """Every error answer: one line for people, and the fields at fault for 422."""

    detail: str
    errors: list[FieldError] = Field(default_factory=list)


class SubmitRequest(BaseModel):
    """A job to queue. ``params`` are checked against the pipeline's schema
    (see ``GET /v1/pipelines``)."""

    model_config = ConfigDict(extra="forbid")

    pipeline: str = Field(min_length=1, max_length=100, examples=["sleep"],
                          description="name of a pipeline from GET /v1/pipelines")
    params: dict[str, Any] = Field(default_factory=dict, examples=[{"seconds": 2}])
    priority: int = Field(0, ge=-1000, le=1000, description="higher runs first")
    max_retries: int = Field(4, ge=0, le=1000,
                             description="times a lost worker may send the job back")
    on_preempt: OnPreempt = Field(
        OnPreempt.RESUME, description="on a preemption notice: resume from the last "
        "checkpoint, restart from the beginning, or fail")
    timeout: float | None = Field(None, gt=0, le=30 * 86_400,
                                  description="time limit in seconds of running")
    callback_url: str | None = Field(
        None, min_length=1, max_length=callbacks.MAX_URL_LENGTH,
        description="receives a POST of the job as JSON on every state change")


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


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    words = {401: "no valid token", 403: "not allowed", 404: "not found (or not yours)",
             409: "cannot be done in the current state", 413: "request body too large",
             422: "invalid input", 429: "over a limit (the detail names it)",
             503: "the database cannot be reached"}
    return {c: {"model": ApiError, "description": words[c]} for c in codes}


# ------------------------------------------------------------------ principals


@dataclass(frozen=True)
class Principal:
    """Who is calling: the name of their token, and whether it is an admin's."""

    name: str
    is_admin: bool

    def can_see(self, job: Job) -> bool:
        return self.is_admin or job.owner == self.name


class ApiProblem(Exception):
    """An error answer with a status, a one-line detail and optionally the fields at fault."""

    def __init__(self, status: int, detail: str, errors: Iterable[FieldError] = (),
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = list(errors)
        self.headers = headers


def _unauthorized(detail: str) -> ApiProblem:
    return ApiProblem(401, detail, headers={"WWW-Authenticate": "Bearer"})


def _not_found(job_id: str) -> ApiProblem:
    return ApiProblem(404, f"no job with id {job_id[:64]!r}")


def _invalid(field: str, reason: str, detail: str | None = None) -> ApiProblem:
    return ApiProblem(422, detail or f"{field}: {reason}", [FieldError(field=field,
                                                                       reason=reason)])


_bearer = HTTPBearer(auto_error=False, description="an API token from `spotrun token create`")


def principal_for_token(store: JobStore, token: str | None) -> Principal | None:
    """The principal of a token; None for a missing, unknown, expired or revoked one."""
    if not token or len(token) > 512:
        return None
    found = store.tokens.verify(token)
    return None if found is None else Principal(found.name, found.is_admin)


def session_id_of(request: Request) -> str | None:
    """The dashboard session id the request's cookie carries, if any."""
    return request.cookies.get(SECURE_SESSION_COOKIE) or request.cookies.get(SESSION_COOKIE)


def principal_for_session(store: JobStore, session_id: str | None) -> Principal | None:
    """The principal of a live dashboard session; None once it or its token ended."""
    if not session_id or len(session_id) > 512:
        return None
    found = store.tokens.verify_session(session_id)
    return None if found is None else Principal(found.name, found.is_admin)


@dataclass(frozen=True)
class Credential:
    """How a request proved who it is: a bearer token, or a dashboard session."""

    value: str
    is_session: bool

    def principal(self, store: JobStore) -> Principal | None:
        if self.is_session:
            return principal_for_session(store, self.value)
        return principal_for_token(store, self.value)


def credential_of(request: Request) -> Credential | None:
    token = _header_token(request)
    if token:
        return Credential(token, False)
    # The dashboard's session cookie is accepted for reads only (EventSource cannot send
    # headers); writes need the header, so a cross-site form can never act with it.
    session = session_id_of(request) if request.method in ("GET", "HEAD") else None
    return Credential(session, True) if session else None


def _caller(request: Request,
            creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
            ) -> Principal:
    cred = (Credential(creds.credentials, False) if creds is not None
            else credential_of(request))
    if cred is None:
        raise _unauthorized("missing token: send `Authorization: Bearer TOKEN`")
    who = cred.principal(request.app.state.ctx.store)
    if who is None:
        raise _unauthorized("invalid, expired or revoked token" if not cred.is_session
                            else "the session ended: sign in again")
    return who


# Module level, so that FastAPI can resolve it from the routes' (string) annotations.
Caller = Annotated[Principal, Depends(_caller)]


def _known_query_only(request: Request) -> None:
    """Refuse unknown and repeated query parameters: ``?stat=running`` must not quietly
    list every job."""
    route = request.scope.get("route")
    if not request.query_params or not isinstance(route, APIRoute) \
            or not request.url.path.startswith("/v1/"):
        return  # the dashboard's pages ignore what they do not know (e.g. utm_source)
    known = _route_query_names.get(id(route))
    if known is None:
        known = set()
        todo = [route.dependant]
        while todo:
            dependant = todo.pop()
            known.update(p.alias for p in dependant.query_params)
            todo.extend(dependant.dependencies)
        _route_query_names[id(route)] = known
    for name in request.query_params:
        if name not in known:
            raise _invalid(f"query.{name[:40]}", "unknown query parameter")
        if len(request.query_params.getlist(name)) > 1:
            raise _invalid(f"query.{name}", "given more than once")


_route_query_names: dict[int, set[str]] = {}


# ----------------------------------------------------------------- live feed


class Subscription:
    """One live client: the changed jobs it has not been sent yet, newest state per job."""

    def __init__(self, principal: Principal, job_id: str | None) -> None:
        self.principal = principal
        self.job_id = job_id
        self.pending: dict[str, dict[str, Any]] = {}
        self.closed = False
        self._ready = asyncio.Event()

    def offer(self, job: dict[str, Any]) -> None:
        self.pending[job["id"]] = job
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def next(self, timeout: float) -> list[dict[str, Any]] | None:
        """The jobs changed since the last call; [] on timeout; None once closed."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout)
        self._ready.clear()
        if self.closed:
            return None
        items, self.pending = list(self.pending.values()), {}
        return items


class ChangeFeed:
    """The one task per server that learns which jobs changed and tells every client.

    It wakes on NOTIFY (PostgreSQL, one LISTEN connection) or when
    :meth:`JobStore.change_marker` moves (SQLite, polled every ``poll_seconds``), waits
    ``settle_seconds`` so that a burst of progress writes becomes one read, then reads the
    changed jobs once. It keeps a watermark of ``updated_at`` and looks ``slack_seconds``
    behind it, because a transaction can commit after a later one.
    """

    def __init__(self, store: JobStore, *, poll_seconds: float = 0.25,
                 settle_seconds: float = 0.1, slack_seconds: float = 5.0) -> None:
        self.store = store
        self.poll_seconds = poll_seconds
        self.settle_seconds = settle_seconds
        self.slack_seconds = slack_seconds
        self.subscribers: set[Subscription] = set()
        self.listeners: list[Callable[[], None]] = []
        self.stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watermark: float | None = None
        self._seen: dict[str, float] = {}

    def subscribe(self, principal: Principal, job_id: str | None = None) -> Subscription:
        sub = Subscription(principal, job_id)
        if self.stopped:
            sub.close()
        self.subscribers.add(sub)
        return sub

    def streams_of(self, principal: Principal) -> int:
        """How many live streams ``principal`` has open on this server process."""
        return sum(1 for s in self.subscribers if s.principal.name == principal.name)

    def unsubscribe(self, sub: Subscription) -> None:
        self.subscribers.discard(sub)

    def stop(self) -> None:
        """End the feed and every live stream (call from the event loop)."""
        self.stopped = True
        for sub in list(self.subscribers):
            sub.close()

    def stop_threadsafe(self) -> None:
        """:meth:`stop`, from any thread (e.g. the one that heard Ctrl-C)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.stop)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        waker = self.store.waker() if self.store.is_postgres else None
        marker: tuple[int, float] | None = None
        try:
            while not self.stopped:
                try:
                    if waker is not None:
                        changed = await asyncio.to_thread(waker.wait, 0.25)
                    else:
                        await asyncio.sleep(self.poll_seconds)
                        new = await asyncio.to_thread(self.store.change_marker)
                        changed, marker = new != marker, new
                    if not changed or self.stopped:
                        continue
                    for listener in self.listeners:
                        listener()
                    if not self.subscribers:
                        # Nobody watches: forget the watermark rather than read what changed.
                        self._watermark = None
                        continue
                    await asyncio.sleep(self.settle_seconds)
                    await self._publish()
                except Exception as exc:  # the database may be away for a while
                    log.warning("live feed: %s", exc)
                    await asyncio.sleep(1.0)
        finally:
            if waker is not None:
                waker.close()

    async def _publish(self) -> None:
        changed = await asyncio.to_thread(self._changed)
        if not changed:
            return
        watched = {s.job_id for s in self.subscribers if s.job_id is not None}
        full: dict[str, dict[str, Any]] = {}
        for job in changed:
            if job.id in watched:
                # One read with the history per changed job, shared by all its viewers.
                with contextlib.suppress(JobNotFound):
                    full[job.id] = (await asyncio.to_thread(self.store.get, job.id)).to_json()
        for sub in list(self.subscribers):
            for job in changed:
                if sub.job_id is None and sub.principal.can_see(job):
                    sub.offer(job.to_json(with_events=False))
                elif sub.job_id == job.id and job.id in full and sub.principal.can_see(job):
                    sub.offer(full[job.id])

    def _changed(self) -> list[Job]:
        if self._watermark is None:
            self._watermark = self.store.now() - self.slack_seconds
            self._seen.clear()
        found = self.store.jobs_updated_since(self._watermark - self.slack_seconds)
        out: list[Job] = []
        for job in found:
            t = job.updated_at.timestamp()
            if self._seen.get(job.id) != t:
                self._seen[job.id] = t
                out.append(job)
            self._watermark = max(self._watermark, t)
        cutoff = self._watermark - self.slack_seconds
        self._seen = {k: v for k, v in self._seen.items() if v >= cutoff}
        return out


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: ".encode() + json_bytes(data) + b"\n\n"


# ---------------------------------------------------------------- body limit


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Answer 413 to a request body over ``limit`` bytes, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    await self._refuse(send)
                    return
        seen = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge()
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json_bytes({"detail": f"request body larger than {self.limit} bytes",
                           "errors": []})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------- validation


def _bad_strings(value: Any, where: str) -> tuple[str, str] | None:
    """The first string, key or number the store or JSON cannot carry: (field, reason)."""
    stack: list[tuple[str, Any]] = [(where, value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if "\x00" in v:
                return path, "contains a NUL character"
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return path, "is not valid Unicode text"
        elif isinstance(v, float) and not math.isfinite(v):
            return path, "must be a finite number"
        elif isinstance(v, dict):
            for k, item in v.items():
                bad = _bad_strings(k, f"{path}.{k!s:.40}") if isinstance(k, str) else None
                if bad:
                    return bad
                stack.append((f"{path}.{k}", item))
        elif isinstance(v, list):
            stack.extend((f"{path}.{i}", item) for i, item in enumerate(v))
    return None


def _check_text(field: str, value: str | None) -> None:
    if value is not None:
        bad = _bad_strings(value, field)
        if bad:
            raise _invalid(*bad)


def command_refusal(pipeline: str, params: dict[str, Any], who: Principal) -> str | None:
    """Why ``who`` may not submit this job, for command jobs (they run programs on the
    workers: an admin's token, or a program the operator allowed); else None."""
    if pipeline != "command":
        return None
    from spotrun.pipelines.command import may_submit

    return may_submit(params, is_admin=who.is_admin)


def validate_job_request(store: JobStore, req: SubmitRequest, *, allow_private: bool,
                         owner: str | None = None) -> tuple[dict[str, Any], bool]:
    """Validate a submission at the edge: (params as stored, requires CUDA).

    ``owner`` is the caller (None for an admin): params that name another job see only
    the caller's jobs.
    Raises :class:`ApiProblem` (422) naming the field and the reason.
    """
    from spotrun.pipelines.base import SubmitRefused
    from spotrun.pipelines.registry import (
        UnknownPipeline,
        describe_validation_error,
        get,
        validate_submission,
    )

    try:
        pipe = get(req.pipeline)
    except UnknownPipeline as exc:
        raise _invalid("body.pipeline", str(exc.args[0])) from None
    bad = _bad_strings(req.params, "body.params")
    if bad:
        raise _invalid(*bad)
    try:
        pipe.validate(req.params)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"])
            reason = "unknown param" if err["type"] == "extra_forbidden" else err["msg"]
            errors.append(FieldError(field=f"body.params.{loc}" if loc else "body.params",
                                     reason=reason))
        raise ApiProblem(422, describe_validation_error(req.pipeline, exc), errors) from None
    try:
        _pipe, params, cuda = validate_submission(req.pipeline, req.params, store,
                                                  owner=owner)
    except (SubmitRefused, UnknownPipeline) as exc:
        message = str(exc.args[0]) if exc.args else str(exc)
        m = re.match(r"param '([^']+)'", message)
        field = f"body.params.{m.group(1)}" if m else "body.params"
        raise _invalid(field, message, message) from None
    if req.callback_url is not None:
        try:
            callbacks.check_callback_url(req.callback_url, allow_private=allow_private)
        except callbacks.CallbackRefused as exc:
            raise _invalid("body.callback_url", str(exc), f"callback_url: {exc}") from None
    return params, cuda


# -------------------------------------------------------------------- preempt


def simulate_preemption(store: JobStore, worker: str) -> tuple[Worker, str]:
    """Send SIGTERM (a preemption notice) to a live local worker: (worker, message).

    Raises :class:`ApiProblem`: 404 for no such live worker, 409 when it runs on another
    host or its pid is no spotrun process.
    """
    found = [w for w in store.find_workers(worker) if w.state in LIVE_WORKER_STATES]
    if not found:
        raise ApiProblem(404, f"no live worker named {worker!r}")
    w = found[0]
    here = socket.gethostname()
    if w.host != here:
        raise ApiProblem(409, f"worker {w.name} runs on host {w.host}, not on this server's "
                              f"host ({here}); run `spotrun preempt {w.name}` on that host")
    if not is_spotrun_process(w.pid):
        raise ApiProblem(409, f"worker {w.name} (pid {w.pid}) is not running any more")
    try:
        os.kill(w.pid, signal.SIGTERM)
    except OSError as exc:
        raise ApiProblem(409, f"cannot signal worker {w.name} (pid {w.pid}): "
                              f"{exc.strerror}") from None
    log.info("sent SIGTERM to worker %s (pid %d) to simulate a preemption", w.name, w.pid)
    return w, (f"Sent a preemption notice to worker {w.name}: it saves a checkpoint, hands "
               "its job back and stops; another worker picks the job up.")


# ------------------------------------------------------------------ metrics


HANDOFF_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_FINAL_KINDS = (EventKind.SUCCEEDED.value, EventKind.FAILED.value, EventKind.CANCELLED.value)
# A hand-off not resumed after this many is forgotten (a bound on memory, not a rule).
_MAX_PENDING_HANDOFFS = 100_000


class Metrics:
    """The Prometheus exposition, cheap at any size of the history.

    Gauges of the live states come from two indexed counts; everything else is a counter
    kept in this process by reading only the events added since the last scrape (by
    primary key). The first scrape reads the history once.
    """

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._cursor = 0
        self._finished = {k: 0 for k in _FINAL_KINDS}
        self._preemptions = 0
        self._pending: dict[str, float] = {}  # job id -> when it was handed back
        self._handoffs = [0] * len(HANDOFF_BUCKETS)
        self._handoff_count = 0
        self._handoff_sum = 0.0

    def _follow(self) -> None:
        while True:
            batch = self.store.analytics.event_kinds_after(self._cursor)
            for event_id, job_id, kind, at in batch:
                self._cursor = event_id
                if kind in self._finished:
                    self._finished[kind] += 1
                    self._pending.pop(job_id, None)
                elif kind == EventKind.PREEMPTED.value:
                    self._preemptions += 1
                    if len(self._pending) < _MAX_PENDING_HANDOFFS:
                        self._pending[job_id] = at
                elif kind in (EventKind.STARTED.value, EventKind.RESUMED.value):
                    since = self._pending.pop(job_id, None)
                    if since is not None:
                        took = max(0.0, at - since)
                        self._handoff_count += 1
                        self._handoff_sum += took
                        for i, bound in enumerate(HANDOFF_BUCKETS):
                            if took <= bound:
                                self._handoffs[i] += 1
            if len(batch) < 5000:
                return

    def text(self) -> str:
        """The Prometheus text exposition of the queue's state."""
        with self._lock:
            self._follow()
            counts = self.store.analytics.count_by_state((JobState.QUEUED, JobState.RUNNING))
            live = self.store.list_workers(include_stopped=False)
            out = [
                "# HELP spotrun_jobs Jobs waiting or running, by state.",
                "# TYPE spotrun_jobs gauge",
                *(f'spotrun_jobs{{state="{s}"}} {n}' for s, n in sorted(counts.items())),
                "# HELP spotrun_queue_depth Jobs waiting for a worker.",
                "# TYPE spotrun_queue_depth gauge",
                f"spotrun_queue_depth {counts.get(JobState.QUEUED.value, 0)}",
                "# HELP spotrun_jobs_finished_total Jobs that ended, by final state.",
                "# TYPE spotrun_jobs_finished_total counter",
                *(f'spotrun_jobs_finished_total{{state="{k}"}} {n}'
                  for k, n in sorted(self._finished.items())),
                "# HELP spotrun_preemptions_total Jobs handed back on a preemption notice.",
                "# TYPE spotrun_preemptions_total counter",
                f"spotrun_preemptions_total {self._preemptions}",
                "# HELP spotrun_handoff_seconds Seconds from a job's hand-back on a "
                "preemption notice to its next start on a worker (hand-offs still waiting "
                "are not counted).",
                "# TYPE spotrun_handoff_seconds histogram",
                *(f'spotrun_handoff_seconds_bucket{{le="{bound}"}} {n}'
                  for bound, n in zip(HANDOFF_BUCKETS, self._handoffs, strict=True)),
                f'spotrun_handoff_seconds_bucket{{le="+Inf"}} {self._handoff_count}',
                f"spotrun_handoff_seconds_sum {self._handoff_sum:.6f}",
                f"spotrun_handoff_seconds_count {self._handoff_count}",
                "# HELP spotrun_workers Live workers by state.",
                "# TYPE spotrun_workers gauge"]
        by_state = {s: 0 for s in LIVE_WORKER_STATES}
        for w in live:
            by_state[w.state] = by_state.get(w.state, 0) + 1
        out += [f'spotrun_workers{{state="{s}"}} {n}' for s, n in sorted(by_state.items())]
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------------- app


@dataclass
class AppContext:
    """What the routes share: the store, the live feed, the settings."""

    settings: Settings
    store: JobStore
    feed: ChangeFeed
    allow_private_callbacks: bool
    deliverer: callbacks.CallbackDeliverer | None = None
    # A live stream re-checks its token this often, and one principal may hold this many
    # streams on one server process (SPOTRUN_STREAM_RECHECK_SECONDS, SPOTRUN_MAX_STREAMS).
    stream_recheck_seconds: float = 15.0
    max_streams_per_principal: int = 20
    # How long a dashboard sign-in lasts (SPOTRUN_SESSION_SECONDS).
    session_seconds: float = 12 * 3600.0


def create_app(settings: Settings, *, store: JobStore | None = None,
               deliverer: callbacks.CallbackDeliverer | Literal[False] | None = None
               ) -> FastAPI:
    """The API and the dashboard over ``store`` (opened from ``settings`` if not given).

    Its lifespan runs the live feed and the callback deliverer (a default one if
    ``deliverer`` is None, none if it is False).
    """
    from spotrun import web
    from spotrun.web import apidocs

    owns_store = store is None
    the_store = store if store is not None else JobStore.open(settings.database_url)
    ctx = AppContext(settings=settings, store=the_store, feed=ChangeFeed(the_store),
                     allow_private_callbacks=callbacks.allow_private_from_env(),
                     stream_recheck_seconds=_env_number("SPOTRUN_STREAM_RECHECK_SECONDS",
                                                        15.0, low=0.1),
                     max_streams_per_principal=int(_env_number("SPOTRUN_MAX_STREAMS", 20,
                                                               low=1)),
                     session_seconds=_env_number("SPOTRUN_SESSION_SECONDS", 12 * 3600.0,
                                                 low=60))
    if deliverer is None:
        deliverer = callbacks.CallbackDeliverer(
            the_store, allow_private=ctx.allow_private_callbacks)
    if deliverer is not False:
        ctx.deliverer = deliverer
        ctx.feed.listeners.append(deliverer.poke)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        feed = asyncio.create_task(ctx.feed.run(), name="spotrun-live-feed")
        delivering = None
        if ctx.deliverer is not None:
            delivering = asyncio.create_task(ctx.deliverer.run(), name="spotrun-callbacks")
        try:
            yield
        finally:
            ctx.feed.stop()
            if delivering is not None:
                delivering.cancel()
                await asyncio.gather(delivering, return_exceptions=True)
            # The feed notices the stop within its wait (under a second); cancelling it
            # instead would close its LISTEN connection under a thread still using it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(feed), 3.0)
            feed.cancel()
            await asyncio.gather(feed, return_exceptions=True)
            if owns_store:
                the_store.close()

    app = FastAPI(
        title="spotrun", version="1",
        description="Run machine-learning jobs on preemptible / spot workers without "
                    "losing work. Authenticate with `Authorization: Bearer TOKEN`.",
        lifespan=lifespan, default_response_class=StrictJSONResponse,
        dependencies=[Depends(_known_query_only)],
        docs_url=None)  # /docs is served offline by web.apidocs
    app.state.ctx = ctx
    app.add_middleware(BodyLimit)
    _install_error_handlers(app)
    _install_routes(app, ctx)
    web.install(app, ctx)
    apidocs.install(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    def answer(status: int, detail: str, errors: list[FieldError] | None = None,
               headers: dict[str, str] | None = None) -> Response:
        body = ApiError(detail=detail, errors=errors or []).model_dump()
        return StrictJSONResponse(body, status_code=status, headers=headers)

    async def on_problem(_r: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiProblem)
        return answer(exc.status, exc.detail, exc.errors, exc.headers)

    async def on_validation(_r: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = []
        for err in exc.errors():
            loc = [str(x) for x in err.get("loc", ())]
            if err.get("type") == "json_invalid":
                field, reason = "body", f"not valid JSON ({err.get('ctx', {}).get('error')})"
            else:
                field, reason = ".".join(loc) or "request", str(err.get("msg", "invalid"))
            if err.get("type") == "extra_forbidden":
                reason = "unknown field"
            errors.append(FieldError(field=field, reason=reason))
        detail = "; ".join(f"{e.field}: {e.reason}" for e in errors) or "invalid request"
        return answer(422, detail, errors)

    async def on_http(_r: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400:
            # FastAPI's answer to a body it cannot even decode (e.g. not UTF-8): for the
            # client it is invalid input like any other.
            reason = "could not be read as JSON"
            return answer(422, f"body: {reason}", [FieldError(field="body", reason=reason)])
        return answer(exc.status_code, str(exc.detail),
                      headers=dict(exc.headers) if exc.headers else None)

    async def on_db(_r: Request, exc: Exception) -> Response:
        log.warning("database error: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return answer(503, "the database cannot be reached; try again shortly")

    async def on_quota(_r: Request, exc: Exception) -> Response:
        assert isinstance(exc, QuotaExceeded)
        return answer(429, str(exc))

    app.add_exception_handler(ApiProblem, on_problem)
    app.add_exception_handler(QuotaExceeded, on_quota)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(DatabaseUnavailable, on_db)


def _install_routes(app: FastAPI, ctx: AppContext) -> None:
    store = ctx.store
    collector = Metrics(store)

    def visible_job(job_id: str, who: Principal, *, with_events: bool = True) -> Job:
        if not JOB_ID_RE.match(job_id):
            raise _not_found(job_id)
        job = store.find(job_id) if with_events else _find_plain(store, job_id)
        if job is None or not who.can_see(job):
            raise _not_found(job_id)
        return job

    # ---------------------------------------------------------------- health

    @app.get("/healthz", tags=["health"], response_model=Status,
             summary="The process is up")
    def healthz() -> Response:
        return StrictJSONResponse({"status": "ok"})

    @app.get("/readyz", tags=["health"], summary="The database is reachable",
             response_model=Status, responses={503: {"model": Status}})
    def readyz() -> Response:
        try:
            store.now()
        except Exception as exc:
            # The cause goes to the log, not to whoever asks (readyz needs no token).
            log.warning("not ready: %s", str(exc).splitlines()[0] if str(exc) else exc)
            return StrictJSONResponse({"status": "unavailable",
                                       "detail": "the database cannot be reached"},
                                      status_code=503)
        return StrictJSONResponse({"status": "ok"})

    # The errors answer JSON like every route; only the metrics themselves are text.
    @app.get("/metrics", tags=["health"], response_model=None,
             summary="Prometheus metrics (admin token)",
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
                        **_errors(401, 403, 503)})
    def metrics(who: Caller) -> Response:
        # Operators only: the fleet's size and state are not every user's business.
        if not who.is_admin:
            raise ApiProblem(403, "only an admin token can read the metrics")
        return PlainTextResponse(collector.text(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    # ------------------------------------------------------------------ jobs

    @app.post("/v1/jobs", tags=["jobs"], status_code=201, response_model=JobOut,
              summary="Queue a job (within the caller's quotas: 429 names the one exceeded)",
              responses=_errors(401, 403, 409, 413, 422, 429, 503))
    def submit_job(
        body: SubmitRequest, who: Caller,
        idempotency_key: Annotated[str | None, Header(
            alias="Idempotency-Key", max_length=200,
            description="a retried create with the same key returns the first job")] = None,
    ) -> Response:
        _check_text("header.Idempotency-Key", idempotency_key)
        params, cuda = validate_job_request(store, body,
                                            allow_private=ctx.allow_private_callbacks,
                                            owner=None if who.is_admin else who.name)
        refused = command_refusal(body.pipeline, params, who)
        if refused:
            raise ApiProblem(403, refused)
        quota = None if who.is_admin else store.quota_for(who.name)

        def submit() -> Job:
            return store.submit(
                body.pipeline, params, priority=body.priority, max_retries=body.max_retries,
                on_preempt=body.on_preempt, timeout=body.timeout, requires_cuda=cuda,
                owner=who.name, idempotency_key=idempotency_key,
                callback_url=body.callback_url, quota=quota)

        try:
            job = submit()
        except Conflict:
            # A concurrent retry with the same key won the insert: answer with its job.
            job = submit()
        if idempotency_key is not None and (job.pipeline, job.params) != (body.pipeline,
                                                                           params):
            raise ApiProblem(409, "this Idempotency-Key was used for a different job "
                                  f"({job.id}); use a new key for a new job")
        return StrictJSONResponse(job.to_json(), status_code=201)

    @app.get("/v1/jobs", tags=["jobs"], response_model=JobPage, summary="List jobs",
             responses=_errors(401, 422, 503))
    def list_jobs(
        who: Caller,
        state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
        pipeline: Annotated[str | None, Query(max_length=100,
                                              description="only jobs of this pipeline")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
    ) -> Response:
        _check_text("query.pipeline", pipeline)
        found = store.list_jobs(state=state, pipeline=pipeline,
                                owner=None if who.is_admin else who.name,
                                limit=limit, offset=offset)
        return StrictJSONResponse({
            "jobs": [j.to_json(with_events=False) for j in found],
            "limit": limit, "offset": offset,
            "next_offset": offset + limit if len(found) == limit else None})

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], response_model=JobOut,
             summary="A job, with its history", responses=_errors(401, 404, 503))
    def get_job(job_id: str, who: Caller) -> Response:
        return StrictJSONResponse(visible_job(job_id, who).to_json())

    @app.post("/v1/jobs/{job_id}/cancel", tags=["jobs"], response_model=JobOut,
              summary="Cancel a job: at once if queued, at its next step if running",
              responses=_errors(401, 404, 503))
    def cancel_job(job_id: str, who: Caller) -> Response:
        visible_job(job_id, who, with_events=False)
        try:
            job = store.cancel(job_id, owner=None if who.is_admin else who.name)
        except JobNotFound:
            raise _not_found(job_id) from None
        return StrictJSONResponse(job.to_json())

    @app.get("/v1/jobs/{job_id}/result", tags=["jobs"], response_model=ResultOut,
             summary="A job's result (null until it succeeded) or error",
             responses=_errors(401, 404, 503))
    def job_result(job_id: str, who: Caller) -> Response:
        job = visible_job(job_id, who, with_events=False)
        return StrictJSONResponse({"id": job.id, "state": job.state.value,
                                   "result": job.result, "error": job.error})

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"], response_model=EventsOut,
             summary="A job's history", responses=_errors(401, 404, 503))
    def job_events(job_id: str, who: Caller) -> Response:
        job = visible_job(job_id, who)
        return StrictJSONResponse({"events": [e.to_json() for e in job.events]})

    @app.get("/v1/jobs/{job_id}/logs", tags=["jobs"], response_model=LogsOut,
             summary="The log lines a job's pipeline wrote", responses=_errors(401, 404, 503))
    def job_logs(job_id: str, who: Caller) -> Response:
        visible_job(job_id, who, with_events=False)
        return StrictJSONResponse({"logs": [line.to_json() for line in store.logs(job_id)]})

    @app.get("/v1/callback-secret", tags=["jobs"], response_model=CallbackSecretOut,
             summary="The key your jobs' callbacks are signed with (HMAC-SHA256)",
             responses=_errors(401, 503))
    def callback_secret(who: Caller) -> Response:
        return StrictJSONResponse({
            "owner": who.name, "secret": store.callbacks.secret(who.name),
            "header": "X-Spotrun-Signature",
            "scheme": "t=<unix time>,v1=<hex HMAC-SHA256 of '<t>.' followed by the body>"})

    # ------------------------------------------------------- pipelines, workers

    @app.get("/v1/pipelines", tags=["pipelines"], response_model=list[PipelineOut],
             summary="Pipelines and the JSON Schema of their params",
             responses=_errors(401, 503))
    def list_pipelines(who: Caller) -> Response:
        from spotrun.pipelines.registry import registry

        return StrictJSONResponse([{"name": p.name, "description": p.description,
                                    "params": p.schema()} for p in registry().values()])

    @app.get("/v1/workers", tags=["workers"], response_model=list[WorkerOut],
             summary="Workers: name, pool, host, state, current job, last heartbeat "
                     "(admin only)",
             responses=_errors(401, 403, 422, 503))
    def list_workers(
        who: Caller,
        all_: Annotated[bool, Query(alias="all",
                                    description="include stopped and gone workers")] = False,
    ) -> Response:
        if not who.is_admin:
            # Hosts, pids and pools are the operators' business, not every user's.
            raise ApiProblem(403, "only an admin can list the workers")
        store.mark_gone_workers()
        found = store.list_workers(include_stopped=all_)
        return StrictJSONResponse([w.to_json() for w in found])

    @app.post("/v1/workers/{worker}/preempt", tags=["workers"], status_code=202,
              response_model=PreemptOut,
              summary="Simulate a preemption of a local worker (admin only)",
              responses=_errors(401, 403, 404, 409, 503))
    def preempt_worker(worker: str, who: Caller) -> Response:
        if not who.is_admin:
            raise ApiProblem(403, "only an admin can simulate a preemption")
        if _bad_strings(worker, "worker") or len(worker) > 200:
            raise ApiProblem(404, f"no live worker named {worker[:200]!r}")
        w, message = simulate_preemption(store, worker)
        return StrictJSONResponse({"worker": w.name, "pid": w.pid, "message": message},
                                  status_code=202)

    # ---------------------------------------------------------------- streams

    sse_doc: dict[int | str, dict[str, Any]] = {
        # The schema of one event (OpenAPI 3.1 has no per-event keyword; tools read
        # ``schema`` as that): `job` carries the job as JSON, `end` its id and state.
        200: {"description": "Server-Sent Events: `job` (the job as JSON, as GET "
                             "/v1/jobs/{job_id} answers it), then `end` ({id, state}) "
                             "when a followed job is over",
              "content": {"text/event-stream": {"schema": {
                  "type": "object", "required": ["event", "data"],
                  "properties": {
                      "event": {"type": "string", "enum": ["job", "end"]},
                      "data": {"type": "string", "contentMediaType": "application/json",
                               "contentSchema": {
                                   "type": "object", "required": ["id", "state"],
                                   "properties": {
                                       "id": {"type": "string"},
                                       "state": {"type": "string", "enum": [
                                           s.value for s in JobState]}}}}}}}}},
        **_errors(401, 404)}

    def subscribe(who: Principal, job_id: str | None = None) -> Subscription:
        if ctx.feed.streams_of(who) >= ctx.max_streams_per_principal:
            raise ApiProblem(429, f"too many live streams for {who.name}: "
                                  f"{ctx.max_streams_per_principal} are open; close one")
        return ctx.feed.subscribe(who, job_id)

    @app.get("/v1/stream/jobs", tags=["live"], response_class=StreamingResponse,
             responses=sse_doc, summary="Live changes of your jobs (Server-Sent Events)")
    async def stream_jobs(request: Request, who: Caller) -> Response:
        # Subscribe before reading the current state, so that no change falls in between.
        sub = subscribe(who)
        try:
            recent = await asyncio.to_thread(
                store.list_jobs, owner=None if who.is_admin else who.name, limit=50)
        except BaseException:
            ctx.feed.unsubscribe(sub)
            raise
        return _stream(request, sub, [j.to_json(with_events=False) for j in reversed(recent)])

    @app.get("/v1/stream/jobs/{job_id}", tags=["live"], response_class=StreamingResponse,
             responses=sse_doc,
             summary="Live changes of one job, with its history (Server-Sent Events)")
    async def stream_job(request: Request, job_id: str, who: Caller) -> Response:
        sub = subscribe(who, job_id)
        try:
            job = await asyncio.to_thread(visible_job, job_id, who)
        except BaseException:
            ctx.feed.unsubscribe(sub)
            raise
        return _stream(request, sub, [job.to_json()])

    def _stream(request: Request, sub: Subscription, first: list[dict[str, Any]]
                ) -> StreamingResponse:
        cred = credential_of(request)

        async def frames() -> AsyncIterator[bytes]:
            loop = asyncio.get_running_loop()
            recheck_at = loop.time() + ctx.stream_recheck_seconds
            try:
                yield b"retry: 2000\n\n"
                batch: list[dict[str, Any]] | None = first
                while batch is not None:
                    for job in batch:
                        yield _sse("job", job)
                        if sub.job_id is not None and JobState(job["state"]).is_final:
                            yield _sse("end", {"id": job["id"], "state": job["state"]})
                            return
                    batch = await sub.next(max(0.0, recheck_at - loop.time()))
                    if loop.time() >= recheck_at:
                        # On a wall-clock timer, busy or quiet: a revoked token's stream
                        # ends within one period, whatever its jobs do.
                        if cred is None or await asyncio.to_thread(
                                cred.principal, store) is None:
                            return
                        recheck_at = loop.time() + ctx.stream_recheck_seconds
                    if batch == []:
                        yield b": keep-alive\n\n"  # keeps proxies from closing the stream
            finally:
                ctx.feed.unsubscribe(sub)

        return StreamingResponse(frames(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})


def _env_number(name: str, default: float, *, low: float) -> float:
    """A positive number from the environment; a bad value is one clear error at start."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value) or value < low:
        raise ConfigError(f"{name}={raw!r} must be at least {low:g}")
    return value


def _header_token(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _find_plain(store: JobStore, job_id: str) -> Job | None:
    try:
        return store.get(job_id, with_events=False)
    except JobNotFound:
        return None
