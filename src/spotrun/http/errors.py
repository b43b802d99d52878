"""Error answers: a status, a one-line ``detail`` and, for 422, the fields at fault.

Client mistakes answer 4xx; they never answer 5xx. The service's errors become answers
here (:func:`from_service`), so every route words them alike.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from spotrun.http.responses import StrictJSONResponse
from spotrun.http.schemas import ApiError, FieldError
from spotrun.pipelines.registry import UnknownPipeline
from spotrun.quotas import QuotaExceeded
from spotrun.service.preempt import CannotSignal, NoSuchWorker
from spotrun.service.submission import Forbidden, Invalid, Refused, ServiceError
from spotrun.store import DatabaseUnavailable

log = logging.getLogger("spotrun.api")


class ApiProblem(Exception):
    """An error answer with a status, a one-line detail and optionally the fields at fault."""

    def __init__(self, status: int, detail: str, errors: Iterable[FieldError] = (),
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = list(errors)
        self.headers = headers


def unauthorized(detail: str) -> ApiProblem:
    return ApiProblem(401, detail, headers={"WWW-Authenticate": "Bearer"})


def not_found(job_id: str) -> ApiProblem:
    return ApiProblem(404, f"no job with id {job_id[:64]!r}")


def invalid(field: str, reason: str, detail: str | None = None) -> ApiProblem:
    return ApiProblem(422, detail or f"{field}: {reason}", [FieldError(field=field,
                                                                       reason=reason)])


def from_service(exc: ServiceError | UnknownPipeline, prefix: str = "") -> ApiProblem:
    """The answer to a service error; the fields of an :class:`Invalid` get ``prefix``
    (``body.`` for a request body)."""
    if isinstance(exc, UnknownPipeline):
        return invalid(f"{prefix}pipeline", str(exc.args[0]))
    if isinstance(exc, Invalid):
        return ApiProblem(422, exc.describe(prefix), [
            FieldError(field=f"{prefix}{p.field}", reason=p.reason) for p in exc.problems])
    if isinstance(exc, Refused):
        # Well-formed params (the document's schema admits them) that what exists now
        # refuses: a job they name that does not exist is 404 (another user's job too).
        return ApiProblem(404 if exc.missing else 409, str(exc), [
            FieldError(field=f"{prefix}{exc.field}", reason=str(exc))])
    if isinstance(exc, Forbidden):
        return ApiProblem(403, str(exc), [] if exc.field is None else [
            FieldError(field=f"{prefix}{exc.field}", reason=str(exc).removeprefix(
                f"{exc.field}: "))])
    if isinstance(exc, NoSuchWorker):
        return ApiProblem(404, str(exc))
    if isinstance(exc, CannotSignal):
        return ApiProblem(409, str(exc))
    return ApiProblem(409, str(exc))


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the request's path answers. A path that a route names
    exactly (``/v1/jobs/batch``) is that route's, not a template's (``/v1/jobs/{job_id}``,
    whose GET refuses it), as the API document says."""
    scope = dict(request.scope, method="")
    found: set[str] = set()
    exact: set[str] = set()
    for route in request.app.router.routes:
        methods = getattr(route, "methods", None)
        if methods and route.matches(scope)[0] != Match.NONE:
            found.update(methods)
            if not getattr(route, "param_convertors", None):
                exact.update(methods)
    return sorted(exact or found)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error as :class:`ApiError` JSON."""

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

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 405:
            # Starlette's Allow names the methods of the first route of the path only;
            # GET and POST /v1/jobs are two routes.
            allowed = allowed_methods(request)
            return answer(405, str(exc.detail), headers={"Allow": ", ".join(allowed)})
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
