"""The dashboard's pages: server-rendered (Jinja2, autoescaped) with a little JavaScript.

Pages: the job list with live progress bars, a job's page with its timeline and result,
a form to submit a pipeline, and the workers with a "simulate preemption" button for
admins. Live updates come from the API's Server-Sent Events; there is no build step.

Sign-in: the API token is checked once at login; the browser then holds only a random,
short-lived session id (stored hashed, revoked at sign-out, ended with its token) in an
HttpOnly, SameSite=Strict cookie, ``__Host-`` prefixed and Secure over HTTPS. ``spotrun
up`` prints a URL whose fragment (``/login#token=...``) carries the token: browsers never
send a fragment to the server, so the token stays out of access logs; the login page
fills it in and waits for a click (a link alone never signs anyone in). Every form POST
must show, by ``Sec-Fetch-Site`` or ``Origin``, that it comes from this origin.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import ValidationError

from spotrun import cost
from spotrun.http.auth import session_id_of
from spotrun.http.context import AppContext
from spotrun.http.dashboard import jobview, sessions
from spotrun.http.dashboard.forms import form_fields, params_from_form
from spotrun.http.schemas import SubmitRequest
from spotrun.jobs import Job, JobState, OnPreempt, Worker
from spotrun.pipelines.base import Pipeline
from spotrun.pipelines.registry import UnknownPipeline, registry
from spotrun.quotas import QuotaExceeded
from spotrun.service import preempt as preemption
from spotrun.service import queue
from spotrun.service.auth import Principal, sign_in, sign_out, visible_job
from spotrun.service.preempt import LIVE_WORKER_STATES
from spotrun.service.submission import Forbidden, Invalid, Refused, ServiceError

P = ParamSpec("P")
T = TypeVar("T")
HERE = Path(__file__).parent
STATE_WORDS = {
    "queued": "Waiting for a worker",
    "running": "Running",
    "succeeded": "Succeeded",
    "failed": "Failed",
    "cancelled": "Cancelled",
}
WORKER_WORDS = {
    "idle": "Idle, waiting for work",
    "busy": "Running a job",
    "stopping": "Stopping",
    "stopped": "Stopped",
    "gone": "Lost (stopped sending heartbeats)",
}
ON_PREEMPT_WORDS = {
    OnPreempt.RESUME.value: "Continue from its last checkpoint (recommended)",
    OnPreempt.RESTART.value: "Start over from the beginning",
    OnPreempt.FAIL.value: "Stop the job and mark it failed",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: with no-referrer browsers send "Origin: null" on forms.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


async def run(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Call blocking ``fn`` (the store) off the event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


def _ago(t: dt.datetime) -> str:
    s = max(0.0, (dt.datetime.now(dt.UTC) - t).total_seconds())
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 5400:
        return f"{s / 60:.0f} min ago"
    return f"{s / 3600:.1f} h ago"


def _iso(t: dt.datetime) -> str:
    return t.isoformat(timespec="seconds").replace("+00:00", "Z")


def _progress_words(job: Job) -> str:
    p = job.progress
    if p.total:
        return f"{p.step} of {p.total} steps ({100.0 * p.step / p.total:.0f}%)"
    return f"step {p.step}" if p.step else ""


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True))
    env.globals.update(state_words=STATE_WORDS, worker_words=WORKER_WORDS,
                       on_preempt_words=ON_PREEMPT_WORDS)
    env.filters.update(ago=_ago, iso=_iso, progress_words=_progress_words, pretty=_pretty)
    return env


# -------------------------------------------------------------------- routes


def install(app: FastAPI, ctx: AppContext) -> None:
    """Add the dashboard's pages and static files to ``app``."""
    store = ctx.store
    env = _environment()
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def page(template: str, request: Request, who: Principal | None, status: int = 200,
             **values: Any) -> HTMLResponse:
        html = env.get_template(template).render(request=request, who=who, **values)
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)

    def viewer(request: Request) -> Principal | None:
        return sessions.viewer(store, request)

    def to_login() -> Response:
        return RedirectResponse("/login", status_code=303, headers=SECURITY_HEADERS)

    same_origin = sessions.same_origin
    form_of = sessions.form_of

    def forbidden(request: Request) -> HTMLResponse:
        return page("message.html", request, None, status=403, title="Not allowed",
                    message="This form was sent from another site, so it was ignored.")

    # ------------------------------------------------------------------ login

    @app.get("/login", include_in_schema=False)
    def login_page(request: Request) -> Response:
        return page("login.html", request, None)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        if not same_origin(request):
            return forbidden(request)
        token = (await form_of(request)).get("token", "").strip()
        signed_in = await run(sign_in, store, token, seconds=ctx.session_seconds)
        if signed_in is None:
            return page("login.html", request, None, status=401,
                        error="That token is not valid (or it expired or was revoked).")
        response = RedirectResponse("/", status_code=303, headers=SECURITY_HEADERS)
        sessions.set_session_cookie(response, request, signed_in[1], ctx.session_seconds)
        return response

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        if not same_origin(request):
            return forbidden(request)
        session = session_id_of(request)
        if session:
            await run(sign_out, store, session)  # a copied cookie dies too
        response = RedirectResponse("/login", status_code=303, headers=SECURITY_HEADERS)
        sessions.clear_session_cookies(response)
        return response

    # ------------------------------------------------------------------- jobs

    @app.get("/", include_in_schema=False)
    def jobs_page(request: Request) -> Response:
        who = viewer(request)
        if who is None:
            return to_login()
        found = store.list_jobs(owner=None if who.is_admin else who.name, limit=100)
        return page("jobs.html", request, who, jobs=found)

    def visible(job_id: str, who: Principal) -> Job | None:
        return visible_job(store, job_id, who)

    def no_such_job(request: Request, who: Principal, job_id: str) -> Response:
        # The same answer for a job that does not exist and one of somebody else's.
        return page("message.html", request, who, status=404, title="No such job",
                    message=f"There is no job {job_id} that you can see.")

    @app.get("/jobs/{job_id}", include_in_schema=False)
    def job_page(request: Request, job_id: str) -> Response:
        who = viewer(request)
        if who is None:
            return to_login()
        job = visible(job_id, who)
        if job is None:
            return no_such_job(request, who, job_id)
        series, marks = jobview.curve_data(job, store)
        return page("job.html", request, who, job=job, cost=jobview.cost_view(job, store),
                    curve_series=series, curve_marks=marks,
                    worker_words=jobview.worker_words(job),
                    unrunnable=jobview.unrunnable(job, store))

    @app.post("/jobs/{job_id}/cancel", include_in_schema=False)
    async def cancel(request: Request, job_id: str) -> Response:
        who = await run(viewer, request)
        if who is None:
            return to_login()
        if not same_origin(request):
            return forbidden(request)
        job = await run(visible, job_id, who)
        if job is None:
            return no_such_job(request, who, job_id)
        await run(queue.cancel, store, job.id, caller=who)
        return RedirectResponse(f"/jobs/{job.id}", status_code=303, headers=SECURITY_HEADERS)

    # ----------------------------------------------------------------- submit

    def pipelines() -> dict[str, Pipeline]:
        return registry()

    def submit_page(request: Request, who: Principal, name: str, *, status: int = 200,
                    error: str | None = None, values: dict[str, str] | None = None
                    ) -> Response:
        pipes = pipelines()
        pipe = pipes.get(name) or next(iter(pipes.values()))
        return page("submit.html", request, who, status=status, pipelines=pipes, pipe=pipe,
                    fields=form_fields(pipe.schema()), error=error, values=values or {})

    @app.get("/submit", include_in_schema=False)
    def submit_form(request: Request, pipeline: str = "digits-train") -> Response:
        who = viewer(request)
        if who is None:
            return to_login()
        return submit_page(request, who, pipeline)

    @app.post("/submit", include_in_schema=False)
    async def submit(request: Request) -> Response:
        who = await run(viewer, request)
        if who is None:
            return to_login()
        if not same_origin(request):
            return forbidden(request)
        form = await form_of(request)
        name = form.get("pipeline", "")
        pipe = pipelines().get(name)
        if pipe is None:
            return submit_page(request, who, name, status=422, values=form,
                               error=f"Unknown pipeline {name!r}.")
        params, problems = params_from_form(form_fields(pipe.schema()), form)
        options: dict[str, Any] = {"on_preempt": form.get("on_preempt") or "resume"}
        for key in ("priority", "timeout"):
            if form.get(key, "").strip():
                options[key] = form[key].strip()
        if problems:
            return submit_page(request, who, name, status=422, values=form,
                               error="; ".join(problems))
        try:
            req = SubmitRequest(pipeline=name, params=params, **options)
        except ValidationError as exc:
            words = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}"
                              for e in exc.errors())
            return submit_page(request, who, name, status=422, values=form, error=words)
        try:
            job = await run(queue.submit, store, req.submission(), caller=who,
                            allow_private_callbacks=ctx.allow_private_callbacks)
        except (Invalid, Refused, UnknownPipeline) as exc:
            words = exc.describe("body.") if isinstance(exc, Invalid) else str(exc) \
                if isinstance(exc, Refused) else f"body.pipeline: {exc.args[0]}"
            return submit_page(request, who, name, status=422, values=form, error=words)
        except Forbidden as exc:
            return submit_page(request, who, name, status=403, values=form, error=str(exc))
        except QuotaExceeded as exc:
            return submit_page(request, who, name, status=429, values=form, error=str(exc))
        return RedirectResponse(f"/jobs/{job.id}", status_code=303, headers=SECURITY_HEADERS)

    # ---------------------------------------------------------------- workers

    def workers_page(request: Request, who: Principal, *, show_all: bool = False,
                     status: int = 200, notice: str | None = None,
                     error: str | None = None) -> Response:
        store.mark_gone_workers()
        found: list[Worker] = store.list_workers(include_stopped=show_all)
        found.reverse()  # newest first
        mine = None
        if not who.is_admin:
            mine = {j.id for j in store.list_jobs(state=JobState.RUNNING, owner=who.name)}
        report = None
        if who.is_admin:
            report = cost.summarize(store, "24h")
        return page("workers.html", request, who, status=status, workers=found, mine=mine,
                    show_all=show_all, notice=notice, error=error,
                    live_states=LIVE_WORKER_STATES, cost=report)

    @app.get("/workers", include_in_schema=False)
    def workers(request: Request, all: str = "") -> Response:
        who = viewer(request)
        if who is None:
            return to_login()
        if not who.is_admin:
            # Hosts, pids and pools are the operators' business.
            return page("message.html", request, who, status=403, title="Not allowed",
                        message="Only an administrator can see the workers.")
        return workers_page(request, who, show_all=all == "1")

    @app.post("/workers/{worker_id}/preempt", include_in_schema=False)
    async def preempt(request: Request, worker_id: str) -> Response:
        who = await run(viewer, request)
        if who is None:
            return to_login()
        if not same_origin(request):
            return forbidden(request)
        if not who.is_admin:
            return await run(workers_page, request, who, status=403,
                             error="Only an administrator can simulate a preemption.")
        try:
            _w, message = await run(preemption.preempt, store, worker_id[:200])
        except ServiceError as exc:
            status = 404 if isinstance(exc, preemption.NoSuchWorker) else 409
            return await run(workers_page, request, who, status=status, error=str(exc))
        return await run(workers_page, request, who, notice=message)
