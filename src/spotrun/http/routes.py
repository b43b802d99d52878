"""The API's routes under ``/v1``, and health and metrics: each a thin call of the service.

Every route reads its caller from :data:`spotrun.http.auth.Caller`, asks the service
(:mod:`spotrun.service`), and answers strict JSON; the service's errors become answers
through :func:`spotrun.http.errors.from_service`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from fastapi.routing import APIRoute

from spotrun.http.auth import Caller, credential_of
from spotrun.http.context import AppContext
from spotrun.http.errors import ApiProblem, from_service, invalid, not_found
from spotrun.http.feed import Subscription, sse
from spotrun.http.metrics import Metrics
from spotrun.http.responses import StrictJSONResponse
from spotrun.http.schemas import (
    NO_NUL,
    BatchOut,
    BatchRequest,
    CallbackSecretOut,
    EventsOut,
    FieldError,
    JobOut,
    JobPage,
    LogsOut,
    PipelineOut,
    PreemptOut,
    ResultOut,
    Status,
    SubmitRequest,
    WorkerOut,
    errors_doc,
)
from spotrun.jobs import Job, JobState
from spotrun.pipelines.registry import UnknownPipeline, registry
from spotrun.quotas import QuotaExceeded
from spotrun.service import preempt, queue
from spotrun.service.auth import Principal, require_admin, visible_job
from spotrun.service.submission import (
    Forbidden,
    IdempotencyConflict,
    Invalid,
    ItemError,
    ServiceError,
    bad_value,
    check_text,
)
from spotrun.store import JobNotFound

log = logging.getLogger("spotrun.api")


def known_query_only(request: Request) -> None:
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
            raise invalid(f"query.{name[:40]}", "unknown query parameter")
        if len(request.query_params.getlist(name)) > 1:
            raise invalid(f"query.{name}", "given more than once")


_route_query_names: dict[int, set[str]] = {}


def text_field(field: str, value: str | None) -> None:
    """422 naming ``field`` for text the store cannot keep (a NUL, a lone surrogate)."""
    try:
        check_text(field, value)
    except Invalid as exc:
        raise from_service(exc) from None


def item_problem(exc: ItemError) -> ApiProblem:
    """The answer to a batch's refused item: as for that job on its own, its fields and
    its line named ``body.jobs.<index>``."""
    where = f"body.jobs.{exc.index}"
    inner = exc.error
    if isinstance(inner, IdempotencyConflict):
        reason = f"was used for a different job ({inner.job_id}); use a new key for a new job"
        return ApiProblem(409, f"{where}.idempotency_key: {reason}",
                          [FieldError(field=f"{where}.idempotency_key", reason=reason)])
    if isinstance(inner, QuotaExceeded):
        return ApiProblem(429, f"{where}: {inner}")
    if not isinstance(inner, ServiceError | UnknownPipeline):
        raise inner
    problem = from_service(inner, f"{where}.")
    if not problem.detail.startswith(where):
        problem.detail = f"{where}: {problem.detail}"
    return problem


def admin_only(who: Principal, refusal: str) -> None:
    try:
        require_admin(who, refusal)
    except Forbidden as exc:
        raise from_service(exc) from None


def install(app: FastAPI, ctx: AppContext) -> None:
    """Add the API's routes to ``app``."""
    store = ctx.store
    collector = Metrics(store)

    def visible(job_id: str, who: Principal, *, with_events: bool = True) -> Job:
        job = visible_job(store, job_id, who, with_events=with_events)
        if job is None:
            raise not_found(job_id)
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
                        **errors_doc(401, 403, 503)})
    def metrics(who: Caller) -> Response:
        # Operators only: the fleet's size and state are not every user's business.
        admin_only(who, "only an admin token can read the metrics")
        return PlainTextResponse(collector.text(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    # ------------------------------------------------------------------ jobs

    @app.post("/v1/jobs", tags=["jobs"], status_code=201, response_model=JobOut,
              summary="Queue a job (within the caller's quotas: 429 names the one exceeded)",
              responses=errors_doc(401, 403, 404, 409, 413, 422, 429, 503))
    def submit_job(
        body: SubmitRequest, who: Caller,
        idempotency_key: Annotated[str | None, Header(
            alias="Idempotency-Key", max_length=200,
            description="a retried create with the same key returns the first job")] = None,
    ) -> Response:
        text_field("header.Idempotency-Key", idempotency_key)
        try:
            job = queue.submit(store, body.submission(strict_params=True), caller=who,
                               idempotency_key=idempotency_key,
                               allow_private_callbacks=ctx.allow_private_callbacks)
        except IdempotencyConflict as exc:
            raise ApiProblem(409, "this Idempotency-Key was used for a different job "
                                  f"({exc.job_id}); use a new key for a new job") from None
        except (ServiceError, UnknownPipeline) as exc:
            raise from_service(exc, "body.") from None
        return StrictJSONResponse(job.to_json(), status_code=201)

    @app.post("/v1/jobs/batch", tags=["jobs"], status_code=201, response_model=BatchOut,
              summary="Queue many jobs at once: all of them, or none when any is refused "
                      "(the error names it as body.jobs.<index>)",
              responses=errors_doc(401, 403, 404, 409, 413, 422, 429, 503))
    def submit_batch(body: BatchRequest, who: Caller) -> Response:
        try:
            jobs = queue.submit_many(
                store, [j.submission(strict_params=True) for j in body.jobs], caller=who,
                idempotency_keys=[j.idempotency_key for j in body.jobs],
                allow_private_callbacks=ctx.allow_private_callbacks)
        except ItemError as exc:
            raise item_problem(exc) from None
        except ServiceError as exc:
            raise from_service(exc, "body.") from None
        return StrictJSONResponse({"jobs": [j.to_json() for j in jobs]}, status_code=201)

    @app.get("/v1/jobs", tags=["jobs"], response_model=JobPage, summary="List jobs",
             responses=errors_doc(401, 422, 503))
    def list_jobs(
        who: Caller,
        state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
        pipeline: Annotated[str | None, Query(
            max_length=100, description="only jobs of this pipeline",
            json_schema_extra={"pattern": NO_NUL})] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
    ) -> Response:
        text_field("query.pipeline", pipeline)
        found = store.list_jobs(state=state, pipeline=pipeline,
                                owner=None if who.is_admin else who.name,
                                limit=limit, offset=offset)
        return StrictJSONResponse({
            "jobs": [j.to_json(with_events=False) for j in found],
            "limit": limit, "offset": offset,
            "next_offset": offset + limit if len(found) == limit else None})

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], response_model=JobOut,
             summary="A job, with its history", responses=errors_doc(401, 404, 503))
    def get_job(job_id: str, who: Caller) -> Response:
        if job_id == "batch":  # no job id (they are hex): POST /v1/jobs/batch's path
            raise ApiProblem(405, "Method Not Allowed", headers={"Allow": "POST"})
        return StrictJSONResponse(visible(job_id, who).to_json())

    @app.post("/v1/jobs/{job_id}/cancel", tags=["jobs"], response_model=JobOut,
              summary="Cancel a job: at once if queued, at its next step if running",
              responses=errors_doc(401, 404, 503))
    def cancel_job(job_id: str, who: Caller) -> Response:
        visible(job_id, who, with_events=False)
        try:
            job = queue.cancel(store, job_id, caller=who)
        except JobNotFound:
            raise not_found(job_id) from None
        return StrictJSONResponse(job.to_json())

    @app.get("/v1/jobs/{job_id}/result", tags=["jobs"], response_model=ResultOut,
             summary="A job's result (null until it succeeded) or error",
             responses=errors_doc(401, 404, 503))
    def job_result(job_id: str, who: Caller) -> Response:
        job = visible(job_id, who, with_events=False)
        return StrictJSONResponse({"id": job.id, "state": job.state.value,
                                   "result": job.result, "error": job.error})

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"], response_model=EventsOut,
             summary="A job's history", responses=errors_doc(401, 404, 503))
    def job_events(job_id: str, who: Caller) -> Response:
        job = visible(job_id, who)
        return StrictJSONResponse({"events": [e.to_json() for e in job.events]})

    @app.get("/v1/jobs/{job_id}/logs", tags=["jobs"], response_model=LogsOut,
             summary="The log lines a job's pipeline wrote", responses=errors_doc(401, 404, 503))
    def job_logs(job_id: str, who: Caller) -> Response:
        visible(job_id, who, with_events=False)
        return StrictJSONResponse({"logs": [line.to_json() for line in store.logs(job_id)]})

    @app.get("/v1/callback-secret", tags=["jobs"], response_model=CallbackSecretOut,
             summary="The key your jobs' callbacks are signed with (HMAC-SHA256)",
             responses=errors_doc(401, 503))
    def callback_secret(who: Caller) -> Response:
        return StrictJSONResponse({
            "owner": who.name, "secret": store.callbacks.secret(who.name),
            "header": "X-Spotrun-Signature",
            "scheme": "t=<unix time>,v1=<hex HMAC-SHA256 of '<t>.' followed by the body>"})

    # ------------------------------------------------------- pipelines, workers

    @app.get("/v1/pipelines", tags=["pipelines"], response_model=list[PipelineOut],
             summary="Pipelines and the JSON Schema of their params",
             responses=errors_doc(401, 503))
    def list_pipelines(who: Caller) -> Response:
        return StrictJSONResponse([{"name": p.name, "description": p.description,
                                    "params": p.schema()} for p in registry().values()])

    @app.get("/v1/workers", tags=["workers"], response_model=list[WorkerOut],
             summary="Workers: name, pool, host, state, current job, last heartbeat "
                     "(admin only)",
             responses=errors_doc(401, 403, 422, 503))
    def list_workers(
        who: Caller,
        all_: Annotated[bool, Query(alias="all",
                                    description="include stopped and gone workers")] = False,
    ) -> Response:
        # Hosts, pids and pools are the operators' business, not every user's.
        admin_only(who, "only an admin can list the workers")
        store.mark_gone_workers()
        found = store.list_workers(include_stopped=all_)
        return StrictJSONResponse([w.to_json() for w in found])

    @app.post("/v1/workers/{worker}/preempt", tags=["workers"], status_code=202,
              response_model=PreemptOut,
              summary="Simulate a preemption of a local worker (admin only)",
              responses=errors_doc(401, 403, 404, 409, 503))
    def preempt_worker(worker: str, who: Caller) -> Response:
        admin_only(who, "only an admin can simulate a preemption")
        if bad_value(worker, "worker") or len(worker) > 200:
            raise ApiProblem(404, f"no live worker named {worker[:200]!r}")
        try:
            w, message = preempt.preempt(store, worker)
        except ServiceError as exc:
            raise from_service(exc) from None
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
        **errors_doc(401, 404)}

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
            job = await asyncio.to_thread(visible, job_id, who)
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
                        yield sse("job", job)
                        if sub.job_id is not None and JobState(job["state"]).is_final:
                            yield sse("end", {"id": job["id"], "state": job["state"]})
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
