"""The HTTP API in-process (FastAPI's TestClient) on SQLite and PostgreSQL: auth rules,
input validation, the job shape, callbacks, metrics; and the live streams on a real
uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import queue
import signal
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.exceptions import StarletteDeprecationWarning

from spotrun.config import Settings
from spotrun.events import Preempted, Resume, ResumeHow
from spotrun.http.app import create_app
from spotrun.http.callbacks import CallbackDeliverer
from spotrun.http.feed import ChangeFeed, Subscription
from spotrun.jobs import EventKind
from spotrun.serve import ServerThread
from spotrun.service.auth import Principal
from spotrun.store import JobRecord, JobStore, Lease, NewJob, create_engine

with warnings.catch_warnings():
    # starlette asks for httpx2 when only httpx is installed; the client works either way.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

from conftest import Env, wait_until


class Api:
    """A TestClient with three tokens: admin, alice and bob (users)."""

    def __init__(self, client: httpx.Client, store: JobStore) -> None:
        self.client = client
        self.store = store
        self.tokens = {"admin": store.tokens.create("admin", admin=True),
                       "alice": store.tokens.create("alice"),
                       "bob": store.tokens.create("bob")}

    def h(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def get(self, path: str, who: str | None = "alice", **kw: Any) -> httpx.Response:
        return self.client.get(path, headers=self.h(who) if who else {}, **kw)

    def post(self, path: str, who: str | None = "alice", **kw: Any) -> httpx.Response:
        headers = {**(self.h(who) if who else {}), **kw.pop("headers", {})}
        return self.client.post(path, headers=headers, **kw)

    def submit(self, who: str = "alice", **body: Any) -> dict[str, Any]:
        body.setdefault("pipeline", "sleep")
        r = self.post("/v1/jobs", who, json=body)
        assert r.status_code == 201, r.text
        return dict(r.json())


def settings_for(db_url: str, tmp_path: Path) -> Settings:
    return Settings.from_env(home=str(tmp_path / "home"), database_url=db_url)


@pytest.fixture
def api(store: JobStore, db_url: str, tmp_path: Path) -> Iterator[Api]:
    """The API on SQLite and on PostgreSQL."""
    app = create_app(settings_for(db_url, tmp_path), store=store, deliverer=False)
    with TestClient(app) as client:
        yield Api(client, store)


@pytest.fixture
def sapi(sqlite_url: str, tmp_path: Path) -> Iterator[Api]:
    """The API on SQLite only, for what does not depend on the database."""
    store = JobStore.open(sqlite_url)
    app = create_app(settings_for(sqlite_url, tmp_path), store=store, deliverer=False)
    try:
        with TestClient(app) as client:
            yield Api(client, store)
    finally:
        store.close()


def run_job(store: JobStore, job_id: str, *, worker: str = "w1", result: Any = None) -> Lease:
    """Claim ``job_id`` as a worker would and, with ``result``, complete it."""
    wid = store.register_worker(name=worker, host="test", pid=1, pool="spot", has_cuda=False,
                                lease_seconds=30)
    claimed = store.claim(worker_id=wid, worker_name=worker, lease_seconds=30)
    assert claimed is not None and claimed[0].job_id == job_id
    lease = claimed[0]
    if result is not None:
        store.complete(lease, result)
    else:
        store.heartbeat(wid, [lease], 30)  # the worker's row shows its job from here on
    return lease


# ------------------------------------------------------------------------- auth


def test_no_token_bad_token_and_revoked_token_get_401(api: Api) -> None:
    r = api.get("/v1/jobs", who=None)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert "token" in r.json()["detail"]
    r = api.client.get("/v1/jobs", headers={"Authorization": "Bearer spr_not-a-token"})
    assert r.status_code == 401
    assert api.get("/v1/jobs", "bob").status_code == 200
    api.store.tokens.revoke("bob")
    r = api.get("/v1/jobs", "bob")
    assert r.status_code == 401
    assert r.json()["detail"] == "invalid, expired or revoked token"
    # Health needs no token.
    assert api.get("/healthz", who=None).json() == {"status": "ok"}


def test_a_token_revoked_elsewhere_stops_working_within_the_check_cache(api: Api) -> None:
    """Token checks are remembered briefly; a revoke by another process (the CLI) is
    seen within that time, one through the server's own store at once (above)."""
    api.store.tokens.cache_seconds = 1.0
    assert api.get("/v1/jobs", "alice").status_code == 200
    other = api.store.reopen(pool_size=1)  # another process's store
    try:
        other.tokens.revoke("alice")
    finally:
        other.close()
    revoked_at = time.monotonic()
    wait_until(lambda: api.get("/v1/jobs", "alice").status_code == 401, 10,
               "the revoked token to be refused")
    # Refused once the remembered check ran out (1 s), not whenever it is next evicted.
    assert time.monotonic() - revoked_at <= 1.0 + 2.0
    assert api.get("/v1/jobs", "bob").status_code == 200  # the others are untouched


def test_users_see_and_cancel_only_their_own_jobs_admin_sees_all(api: Api) -> None:
    mine = api.submit("alice", params={"seconds": 1})
    theirs = api.submit("bob", params={"seconds": 1})
    # Another user's job id answers exactly like a job that does not exist.
    missing = api.get("/v1/jobs/ffffffffffffffffffffffffffff", "alice")
    for path in ("", "/result", "/events", "/logs"):
        r = api.get(f"/v1/jobs/{theirs['id']}{path}", "alice")
        assert r.status_code == 404, path
        assert r.json()["detail"] == f"no job with id {theirs['id']!r}"
    assert missing.status_code == 404
    r = api.post(f"/v1/jobs/{theirs['id']}/cancel", "alice")
    assert r.status_code == 404
    assert api.store.get(theirs["id"]).state.value == "queued"
    assert [j["id"] for j in api.get("/v1/jobs", "alice").json()["jobs"]] == [mine["id"]]
    assert [j["id"] for j in api.get("/v1/jobs", "bob").json()["jobs"]] == [theirs["id"]]
    assert {j["id"] for j in api.get("/v1/jobs", "admin").json()["jobs"]} == {
        mine["id"], theirs["id"]}
    assert api.get(f"/v1/jobs/{theirs['id']}", "admin").status_code == 200
    r = api.post(f"/v1/jobs/{mine['id']}/cancel", "alice")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    r = api.post(f"/v1/jobs/{theirs['id']}/cancel", "admin")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"


def test_cookie_is_accepted_for_reads_only(sapi: Api) -> None:
    api = sapi
    api.client.cookies.set("spotrun_session",
                           api.store.tokens.create_session("alice", expires_in=60))
    try:
        assert api.client.get("/v1/jobs").status_code == 200
        r = api.client.post("/v1/jobs", json={"pipeline": "sleep"})
        assert r.status_code == 401  # a cross-site form could send the cookie; not a header
        # The raw API token is no cookie: only a session signed in with it is.
        api.client.cookies.set("spotrun_session", api.tokens["alice"])
        assert api.client.get("/v1/jobs").status_code == 401
    finally:
        api.client.cookies.clear()


# ------------------------------------------------------------------------ jobs


def test_submit_answers_201_with_the_clis_json_shape(api: Api) -> None:
    # A priority above 0 is an operator's right (users' quotas stop at 0).
    job = api.submit("admin", pipeline="sleep", params={"seconds": 0.5, "steps": 5},
                     priority=3, on_preempt="restart", timeout=60, max_retries=2)
    stored = api.store.get(job["id"])
    assert job == stored.to_json()
    assert stored.owner == "admin"
    assert job["params"] == {"seconds": 0.5, "steps": 5, "state_mb": 0.0, "fail": False}
    assert (job["priority"], job["on_preempt"], job["timeout"], job["max_retries"]) == (
        3, "restart", 60.0, 2)
    assert [e["kind"] for e in job["events"]] == ["submitted"]
    assert api.get(f"/v1/jobs/{job['id']}", "admin").json() == api.store.get(
        job["id"]).to_json()


def test_submit_takes_every_option_the_cli_has(api: Api) -> None:
    before = api.store.now()
    job = api.submit("admin", pipeline="sleep", pool="gpu", deadline=3600,
                     max_preemptions=2, checkpoint_every_steps=7,
                     checkpoint_every_seconds=1.5)
    stored = api.store.get(job["id"])
    assert isinstance(stored, JobRecord)
    assert (stored.pool, stored.max_preemptions, stored.checkpoint_every_steps,
            stored.checkpoint_every_seconds) == ("gpu", 2, 7, 1.5)
    assert stored.deadline is not None and before + 3600 <= stored.deadline <= (
        api.store.now() + 3600)
    # The pool is kept: only a worker of pool gpu may take the job.
    assert api.store.claim(worker_id="s1", worker_name="s1", lease_seconds=10,
                           pool="spot") is None
    claimed = api.store.claim(worker_id="g1", worker_name="g1", lease_seconds=10, pool="gpu")
    assert claimed is not None and claimed[1].id == job["id"]
    # A request without them is the request it always was.
    plain = api.store.get(api.submit("admin", pipeline="sleep")["id"])
    assert isinstance(plain, JobRecord)
    assert (plain.pool, plain.deadline, plain.max_preemptions, plain.checkpoint_every_steps,
            plain.checkpoint_every_seconds) == (None, None, None, None, None)


# Values of the options POST /v1/jobs gained, at and past the CLI's limits.
NEW_OPTIONS: list[tuple[str, str, Any, bool]] = [
    ("pool", "--pool", "on-demand", True),
    ("pool", "--pool", "Spot Pool", False),
    ("deadline", "--deadline", 1, True),
    ("deadline", "--deadline", 0.5, False),
    ("max_preemptions", "--max-preemptions", 0, True),
    ("max_preemptions", "--max-preemptions", -1, False),
    ("max_preemptions", "--max-preemptions", 10**6, False),
    ("checkpoint_every_steps", "--checkpoint-every-steps", 1, True),
    ("checkpoint_every_steps", "--checkpoint-every-steps", 0, False),
    ("checkpoint_every_steps", "--checkpoint-every-steps", 2**31, False),
    ("checkpoint_every_seconds", "--checkpoint-every-seconds", 0.01, True),
    ("checkpoint_every_seconds", "--checkpoint-every-seconds", 0.001, False),
]


def test_the_new_options_are_checked_exactly_as_the_cli_checks_them(
        sapi: Api, env_factory: Callable[..., Env], sqlite_url: str) -> None:
    env = env_factory(sqlite_url)
    for field, option, value, ok in NEW_OPTIONS:
        r = sapi.post("/v1/jobs", "admin", json={"pipeline": "sleep", field: value})
        proc = env.cli("submit", "sleep", option, str(value), check=False)
        assert (r.status_code == 201) is ok and (proc.returncode == 0) is ok, (
            field, value, r.text, proc.stderr)
        if not ok:
            assert f"body.{field}" in [e["field"] for e in r.json()["errors"]], r.text
            assert proc.returncode == 2 and "Traceback" not in proc.stderr
    # Each accepted value queued one job from each side (the CLI writes the same database).
    assert len(sapi.store.list_jobs()) == 2 * sum(ok for *_, ok in NEW_OPTIONS)
    r = sapi.post("/v1/jobs", "admin", json={"pipeline": "sleep", "pool": "Spot Pool"})
    assert "is not a pool name" in r.json()["detail"]


def test_a_refused_param_names_its_field_as_data(sapi: Api) -> None:
    # digits-infer's own check refuses the model: the field comes from the check itself.
    # Well-formed params naming a job that does not exist: 404, not 422.
    r = sapi.post("/v1/jobs", json={"pipeline": "digits-infer", "params": {
        "model": "0" * 28}})
    assert r.status_code == 404
    assert r.json()["errors"] == [{"field": "body.params.model",
                                   "reason": f"param 'model': no job with id {'0' * 28!r}"}]


def test_idempotency_key_returns_the_first_job(api: Api) -> None:
    body = {"pipeline": "sleep", "params": {"seconds": 1}}
    key = {"Idempotency-Key": "order-42"}
    first = api.post("/v1/jobs", json=body, headers=key)
    again = api.post("/v1/jobs", json=body, headers=key)
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert len(api.store.list_jobs()) == 1
    # The key is per user: bob's "order-42" is his own job.
    bobs = api.post("/v1/jobs", "bob", json=body, headers=key)
    assert bobs.json()["id"] != first.json()["id"]
    # The same key for a different job is a mistake, not a silent replay.
    other = api.post("/v1/jobs", json={"pipeline": "sleep", "params": {"seconds": 9}},
                     headers=key)
    assert other.status_code == 409
    assert first.json()["id"] in other.json()["detail"]


BAD_INPUT: list[tuple[dict[str, Any], str, str]] = [
    ({"pipeline": "nope"}, "body.pipeline", "unknown pipeline 'nope'"),
    ({"pipeline": "sleep", "params": {"seconds": -1}}, "body.params.seconds",
     "greater than or equal to 0"),
    ({"pipeline": "sleep", "params": {"secs": 1}}, "body.params.secs", "unknown param"),
    ({"pipeline": "digits-train", "params": {"epochs": "many"}}, "body.params.epochs",
     "valid integer"),
    ({"pipeline": "digits-infer", "params": {"model": "0123"}}, "body.params.model",
     "is not a job id"),
    ({"pipeline": "sleep", "priority": 10**9}, "body.priority", "less than or equal"),
    ({"pipeline": "sleep", "on_preempt": "later"}, "body.on_preempt", "resume"),
    ({"pipeline": "sleep", "colour": "red"}, "body.colour", "unknown field"),
    ({"params": {}}, "body.pipeline", "required"),
    ({"pipeline": "sleep", "params": []}, "body.params", "dictionary"),
    ({"pipeline": "sleep", "callback_url": "ftp://example.com/x"}, "body.callback_url",
     "http://"),
]


def test_bad_input_is_422_naming_the_field_and_the_reason(sapi: Api) -> None:
    for body, field, words in BAD_INPUT:
        r = sapi.post("/v1/jobs", json=body)
        assert r.status_code == 422, (body, r.text)
        err = r.json()
        assert field in [e["field"] for e in err["errors"]], (body, err)
        assert words in err["detail"], (body, err)
    assert sapi.store.list_jobs() == []


def test_text_the_database_cannot_carry_is_422_not_500(api: Api) -> None:
    # PostgreSQL refuses NUL characters: they must be stopped at the edge.
    r = api.post("/v1/jobs", json={"pipeline": "digits-infer", "params": {"model": "a\x00"}})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body.params.model"
    r = api.get("/v1/jobs", params={"pipeline": "x\x00"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "query.pipeline"
    assert api.get("/v1/jobs/abc%00def").status_code == 404
    r = api.post("/v1/jobs", json={"pipeline": "sleep", "callback_url": "http://a\x00b/"})
    assert r.status_code == 422


def test_params_are_read_as_their_schema_types_them(sapi: Api) -> None:
    # The API document says boolean and integer: 0 is not false, text is not a number,
    # and 3.0 is an integer (as JSON Schema has it).
    for params, field in (({"fail": 0}, "body.params.fail"),
                          ({"steps": "3"}, "body.params.steps"),
                          ({"seconds": "1"}, "body.params.seconds")):
        r = sapi.post("/v1/jobs", json={"pipeline": "sleep", "params": params})
        assert r.status_code == 422, (params, r.text)
        assert r.json()["errors"][0]["field"] == field
    job = sapi.submit(pipeline="sleep", params={"steps": 3.0, "seconds": 1})
    assert job["params"]["steps"] == 3 and job["params"]["seconds"] == 1.0


def test_well_formed_params_refused_by_what_exists_are_404_or_409(sapi: Api) -> None:
    model = sapi.submit(pipeline="digits-train", params={"epochs": 1})
    r = sapi.post("/v1/jobs", json={"pipeline": "digits-infer",
                                    "params": {"model": model["id"]}})
    assert r.status_code == 409, r.text
    assert r.json()["errors"] == [{"field": "body.params.model", "reason": (
        f"param 'model': job {model['id']} has not succeeded (it is queued)")}]
    r = sapi.post("/v1/jobs", json={"pipeline": "digits-infer", "params": {"model": "a" * 28}})
    assert r.status_code == 404 and r.json()["errors"][0]["field"] == "body.params.model"


def test_405_allows_every_method_of_the_path(sapi: Api) -> None:
    # GET and POST /v1/jobs are two routes: Allow names both, as the document does.
    r = sapi.client.request("DELETE", "/v1/jobs", headers=sapi.h("alice"))
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
    assert r.json()["detail"] == "Method Not Allowed"



    api = sapi
    r = api.post("/v1/jobs", content=b'{"pipeline": ', headers={
        "Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body"
    r = api.post("/v1/jobs", content=b'{"pipeline": "sleep", "params": {"seconds": NaN}}',
                 headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "body.params.seconds" in r.text
    big = json.dumps({"pipeline": "sleep", "params": {"pad": "x" * 1_100_000}})
    r = api.post("/v1/jobs", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert "larger than" in r.json()["detail"]
    assert api.store.list_jobs() == []
    assert api.get("/v1/jobs?limit=0").status_code == 422
    assert api.get("/v1/jobs?state=sleeping").json()["errors"][0]["field"] == "query.state"
    assert api.get("/v1/jobs/..%2F..%2Fetc").status_code == 404
    r = api.get("/v1/jobs?stat=running")  # a typo must not quietly list every job
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "query.stat"
    assert api.get("/v1/jobs?limit=1&limit=2").status_code == 422
    r = api.post("/v1/jobs", content=b"\xff\xfe{}", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body"


def test_list_filters_and_pages(api: Api) -> None:
    ids = [api.submit(params={"seconds": i})["id"] for i in range(5)]
    api.submit(pipeline="digits-train", params={"epochs": 1})
    done = ids[0]
    run_job(api.store, ids[0], result={"ok": True})  # the oldest is claimed first
    page = api.get("/v1/jobs?pipeline=sleep&limit=2").json()
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:2]
    assert page["next_offset"] == 2 and "events" not in page["jobs"][0]
    page = api.get("/v1/jobs?pipeline=sleep&limit=2&offset=4").json()
    assert [j["id"] for j in page["jobs"]] == [done] and page["next_offset"] is None
    assert [j["id"] for j in api.get("/v1/jobs?state=succeeded").json()["jobs"]] == [done]
    assert len(api.get("/v1/jobs?state=queued").json()["jobs"]) == 5
    r = api.get(f"/v1/jobs/{done}/result").json()
    assert r == {"id": done, "state": "succeeded", "result": {"ok": True}, "error": None}
    kinds = [e["kind"] for e in api.get(f"/v1/jobs/{done}/events").json()["events"]]
    assert kinds == ["submitted", "started", "succeeded"]
    assert api.get(f"/v1/jobs/{done}/logs").json() == {"logs": []}


def test_pipelines_and_workers(sapi: Api) -> None:
    api = sapi
    pipes = {p["name"]: p for p in api.get("/v1/pipelines").json()}
    assert {"digits-train", "digits-infer", "sleep"} <= set(pipes)
    assert "epochs" in pipes["digits-train"]["params"]["properties"]
    job = api.submit("bob")
    run_job(api.store, job["id"], worker="w7")
    admin_view = api.get("/v1/workers", "admin").json()
    (w,) = [w for w in admin_view if w["name"] == "w7"]
    assert {"name", "pool", "host", "state", "current_job", "last_heartbeat"} <= set(w)
    assert (w["state"], w["current_job"], w["pool"]) == ("busy", job["id"], "spot")
    # Users see their jobs, not the fleet: hosts and pids are the operators' business.
    r = api.get("/v1/workers", "alice")
    assert r.status_code == 403 and "admin" in r.json()["detail"]


def test_preempt_endpoint_refuses_what_it_must(sapi: Api) -> None:
    api = sapi
    here = socket.gethostname()
    api.store.register_worker(name="far", host="another-host", pid=1, pool="spot",
                              has_cuda=False, lease_seconds=30)
    with subprocess.Popen(["sleep", "30"]) as not_spotrun:
        try:
            api.store.register_worker(name="imposter", host=here, pid=not_spotrun.pid,
                                      pool="spot", has_cuda=False, lease_seconds=30)
            assert api.post("/v1/workers/far/preempt", "alice").status_code == 403
            assert api.post("/v1/workers/nobody/preempt", "admin").status_code == 404
            r = api.post("/v1/workers/far/preempt", "admin")
            assert r.status_code == 409 and "another-host" in r.json()["detail"]
            r = api.post("/v1/workers/imposter/preempt", "admin")
            assert r.status_code == 409 and "not running" in r.json()["detail"]
            assert not_spotrun.poll() is None  # it was not signalled
        finally:
            not_spotrun.send_signal(signal.SIGKILL)


# --------------------------------------------------------------------- health


def test_health_readiness_and_metrics(api: Api) -> None:
    assert api.get("/readyz", who=None).json() == {"status": "ok"}
    job = api.submit()
    api.submit()
    lease = run_job(api.store, job["id"])
    api.store.hand_back(lease, Preempted("w1", 3, 10, resume=Resume(ResumeHow.SAVED, 3, 0.01)))
    time.sleep(0.05)
    second = run_job(api.store, job["id"], worker="w2")
    assert api.get("/metrics", who=None).status_code == 401
    assert api.get("/metrics", who="alice").status_code == 403
    r = api.get("/metrics", who="admin")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'spotrun_jobs{state="running"} 1' in text
    assert 'spotrun_jobs{state="queued"} 1' in text
    assert "spotrun_queue_depth 1" in text
    assert "spotrun_preemptions_total 1" in text
    assert "spotrun_handoff_seconds_count 1" in text
    assert 'spotrun_handoff_seconds_bucket{le="+Inf"} 1' in text
    assert 'spotrun_workers{state="busy"} 1' in text
    assert 'spotrun_workers{state="idle"} 1' in text  # w1 was released by the hand-back
    # Counters follow the history from where the last scrape stopped.
    api.store.complete(second, {"ok": True})
    text = api.get("/metrics", who="admin").text
    assert 'spotrun_jobs_finished_total{state="succeeded"} 1' in text
    assert 'spotrun_jobs{state="running"} 0' in text
    assert "spotrun_preemptions_total 1" in text


def test_an_unreachable_database_is_503_not_500(tmp_path: Path) -> None:
    dead = JobStore(create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none"))
    app = create_app(settings_for("sqlite://", tmp_path), store=dead, deliverer=False)
    with TestClient(app) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "unavailable"
        assert "127.0.0.1" not in r.text
        r = client.get("/v1/jobs", headers={"Authorization": "Bearer spr_x"})
        assert r.status_code == 503 and "database" in r.json()["detail"]
        assert client.get("/metrics", headers={"Authorization": "Bearer spr_x"}
                          ).status_code == 503
    dead.close()


def test_nan_in_a_result_does_not_break_the_json(sapi: Api) -> None:
    api = sapi
    job = api.submit()
    run_job(api.store, job["id"], result={"loss": float("nan"), "ok": 1})
    r = api.get(f"/v1/jobs/{job['id']}/result")
    assert r.status_code == 200
    assert r.json()["result"] == {"loss": None, "ok": 1}


# ------------------------------------------------------------------- callbacks


class Receiver:
    """A real HTTP server on 127.0.0.1 that records the callbacks it gets."""

    def __init__(self, fail_first: int = 0, always_fail: bool = False) -> None:
        self.got: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.requests = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.requests += 1
                body = self.rfile.read(int(self.headers["Content-Length"]))
                failing = always_fail or outer.requests <= fail_first
                self.send_response(500 if failing else 204)
                self.end_headers()
                if not failing:
                    outer.got.put((self.headers["X-Spotrun-Event"], json.loads(body)))

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?secret=s3"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=1)
    yield r
    r.close()


REFUSED_CALLBACKS = [
    "http://127.0.0.1:9/hook", "http://localhost/hook", "http://169.254.169.254/latest",
    "http://10.1.2.3/hook", "http://192.168.0.7/", "http://[::1]:8080/",
    "http://[::ffff:127.0.0.1]/", "http://0.0.0.0/", "http://100.64.0.1/",
]


def test_callbacks_to_private_addresses_are_refused(
        sapi: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPOTRUN_CALLBACK_ALLOW_PRIVATE", raising=False)
    for url in REFUSED_CALLBACKS:
        r = sapi.post("/v1/jobs", json={"pipeline": "sleep", "callback_url": url})
        # A well-formed URL (the document's pattern admits it) to a refused destination.
        assert r.status_code == 403, (url, r.text)
        assert r.json()["errors"][0]["field"] == "body.callback_url"
        assert "SPOTRUN_CALLBACK_ALLOW_PRIVATE=1" in r.json()["detail"], url
    assert sapi.store.list_jobs() == []
    # A public address is fine (nothing is sent until the job changes).
    sapi.submit(callback_url="https://93.184.216.34/hook")


def test_callbacks_are_posted_on_every_state_change_and_retried(
        store: JobStore, db_url: str, tmp_path: Path, receiver: Receiver,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOTRUN_CALLBACK_ALLOW_PRIVATE", "1")
    deliverer = CallbackDeliverer(store, allow_private=True, attempts=4,
                                  backoff_seconds=0.05, poll_seconds=0.1)
    app = create_app(settings_for(db_url, tmp_path), store=store, deliverer=deliverer)
    with TestClient(app) as client:
        api = Api(client, store)
        job = api.submit(callback_url=receiver.url)
        lease = run_job(store, job["id"])
        store.hand_back(lease, Preempted("w1", 2, 10, resume=Resume(ResumeHow.SAVED, 2, 0.01)))
        run_job(store, job["id"], worker="w2", result={"slept": 1})
        got = [receiver.got.get(timeout=15) for _ in range(5)]
    assert [kind for kind, _ in got] == ["submitted", "started", "preempted", "started",
                                         "succeeded"]
    assert all(body["id"] == job["id"] for _, body in got)
    assert set(got[-1][1]) == set(job) - {"events"}  # the job's JSON shape
    assert got[-1][1]["state"] == "succeeded"
    assert receiver.requests == 6  # the first attempt failed and was retried


def test_the_callback_deliverer_stops_when_cancelled_as_it_is_woken(
        sqlite_url: str) -> None:
    """A server stopping while a job changed: the deliverer is poked and cancelled in the
    same turn of the event loop, and must stop, not go on polling (which held a stopping
    server, and a test's client, for good)."""
    store = JobStore.open(sqlite_url)

    async def go() -> bool:
        deliverer = CallbackDeliverer(store, allow_private=False, poll_seconds=30.0)
        task = asyncio.create_task(deliverer.run())
        # Past its first read of the feed (it leads once that read began), then in its
        # wait for a poke or the next poll.
        for _ in range(200):
            if deliverer.leading():
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        deliverer.poke()
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=5.0)
        if not done:
            task.cancel()  # let the loop end either way
            await asyncio.wait([task], timeout=5.0)
        return task in done and task.cancelled()

    try:
        assert asyncio.run(go()), "the deliverer went on after it was cancelled"
    finally:
        store.close()


def test_a_live_stream_ends_when_cancelled_as_a_change_arrives() -> None:
    """The same race in a stream's wait for changes (a client gone as its job moved)."""
    sub = Subscription(Principal("p", is_admin=False), None)

    async def go() -> bool:
        task = asyncio.create_task(sub.next(30.0))
        await asyncio.sleep(0.1)
        sub.offer({"id": "j"})
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=5.0)
        return task in done and task.cancelled()

    assert asyncio.run(go()), "the stream's wait returned instead of ending"


def test_an_undeliverable_callback_is_noted_and_never_blocks_the_job(
        sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOTRUN_CALLBACK_ALLOW_PRIVATE", "1")
    db_url, store = sqlite_url, JobStore.open(sqlite_url)
    dead = Receiver(always_fail=True)
    deliverer = CallbackDeliverer(store, allow_private=True, attempts=2,
                                  backoff_seconds=0.05, poll_seconds=0.1)
    app = create_app(settings_for(db_url, tmp_path), store=store, deliverer=deliverer)
    try:
        with TestClient(app) as client:
            api = Api(client, store)
            job = api.submit(callback_url=dead.url)
            run_job(store, job["id"], result={"slept": 1})
            assert store.get(job["id"]).state.value == "succeeded"

            def notes() -> list[str]:
                return [e.message for e in store.events(job["id"])
                        if e.kind == EventKind.NOTE]

            wait_until(lambda: len(notes()) >= 3, 15, "three notes")
            found = notes()
    finally:
        dead.close()
        store.close()
    assert found[0].startswith("callback for 'submitted' could not be delivered to "
                               "http://127.0.0.1:")
    assert all("after 2 attempts (last: HTTP 500)" in n for n in notes())
    assert all("secret" not in n for n in notes())  # the query may hold a secret


def test_a_callback_host_that_turned_private_is_not_called(
        sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The name was public at submit; by delivery it resolves to loopback (DNS rebinding).
    real = socket.getaddrinfo

    def resolve(host: str, *args: Any, **kw: Any) -> Any:
        if host == "rebind.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80))]
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    store = JobStore.open(sqlite_url)
    deliverer = CallbackDeliverer(store, allow_private=False, poll_seconds=0.1)
    app = create_app(settings_for(sqlite_url, tmp_path), store=store, deliverer=deliverer)
    try:
        with TestClient(app):
            job = store.submit("sleep", {}, callback_url="http://rebind.example/hook")
            note = wait_until(lambda: [e.message for e in store.events(job.id)
                                       if e.kind == EventKind.NOTE], 10, "a note")
        # The address it resolved to is not shown (no scanner of the server's network).
        assert note == ["callback for 'submitted' not sent: rebind.example resolves to a "
                        "loopback address; callbacks to loopback, private and link-local "
                        "addresses are refused unless the operator sets "
                        "SPOTRUN_CALLBACK_ALLOW_PRIVATE=1"]
    finally:
        store.close()


# ---------------------------------------------------------------------- streams


class SSEReader:
    """Reads a Server-Sent Events stream on a thread into a queue of (event, data)."""

    def __init__(self, url: str, token: str) -> None:
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._client = httpx.Client(timeout=httpx.Timeout(5.0, read=30.0))
        self._url = url
        self._headers = {"Authorization": f"Bearer {token}"}
        self.status: int | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        event = "message"
        with contextlib.suppress(httpx.HTTPError), \
                self._client.stream("GET", self._url, headers=self._headers) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    self.events.put((event, json.loads(line[6:])))
        self.events.put(("closed", None))

    def until(self, pred: Any, timeout: float = 15) -> tuple[str, Any]:
        give_up = time.monotonic() + timeout
        while True:
            ev = self.events.get(timeout=max(0.01, give_up - time.monotonic()))
            if pred(*ev):
                return ev

    def close(self) -> None:
        self._client.close()


@pytest.fixture
def served(store: JobStore, db_url: str, tmp_path: Path
           ) -> Iterator[tuple[str, Api, ChangeFeed]]:
    """The app on a real uvicorn server, on a free port of 127.0.0.1."""
    app = create_app(settings_for(db_url, tmp_path), store=store, deliverer=False)
    srv = ServerThread(app, "127.0.0.1", 0, access_log=False)
    srv.start()
    url = f"http://127.0.0.1:{srv.port}"
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            yield url, Api(client, store), app.state.ctx.feed
    finally:
        srv.stop()


def test_live_streams_follow_the_store(served: tuple[str, Api, ChangeFeed]) -> None:
    url, api, _feed = served
    job = api.submit("alice", params={"seconds": 1, "steps": 10})
    lists = [SSEReader(f"{url}/v1/stream/jobs", api.tokens[w]) for w in ("alice", "alice",
                                                                          "bob")]
    one = SSEReader(f"{url}/v1/stream/jobs/{job['id']}", api.tokens["alice"])
    try:
        for reader in (*lists[:2], one):  # each starts with the current state
            reader.until(lambda ev, data: ev == "job" and data["id"] == job["id"])
        lease = run_job(api.store, job["id"])
        api.store.save_progress(lease, 4, 10, {"loss": 0.5})
        for reader in lists[:2]:
            reader.until(lambda ev, data: ev == "job" and data["progress"]["step"] == 4)
        one.until(lambda ev, data: data["progress"]["step"] == 4
                  and [e["kind"] for e in data["events"]] == ["submitted", "started"])
        api.store.complete(lease, {"slept": 1})
        _ev, data = one.until(lambda ev, data: ev == "end")
        assert data == {"id": job["id"], "state": "succeeded"}
        assert one.until(lambda ev, data: True)[0] == "closed"
        # Bob never hears of alice's job; he does hear of his own.
        bobs = api.submit("bob")
        lists[2].until(lambda ev, data: data["id"] == bobs["id"])
        seen = []
        while not lists[2].events.empty():
            seen.append(lists[2].events.get()[1]["id"])
        assert job["id"] not in seen
        # A stream of someone else's job is a 404, like the job itself.
        other = SSEReader(f"{url}/v1/stream/jobs/{job['id']}", api.tokens["bob"])
        assert other.until(lambda ev, data: ev == "closed") and other.status == 404
    finally:
        for reader in (*lists, one):
            reader.close()


def test_a_burst_of_more_changes_than_one_read_does_not_stall_the_streams(
        served: tuple[str, Api, ChangeFeed]) -> None:
    url, api, feed = served
    feed.page = 5  # reads of five jobs: the burst below spans three
    job = api.submit("alice", params={"seconds": 1, "steps": 10})
    one = SSEReader(f"{url}/v1/stream/jobs/{job['id']}", api.tokens["alice"])
    try:
        one.until(lambda ev, data: ev == "job" and data["id"] == job["id"])
        wait_until(lambda: feed.subscribers, 10, "the stream's subscription")
        # Twelve jobs changed within the feed's slack (one batch: one time for all).
        api.store.submit_many([NewJob("sleep", {}) for _ in range(12)], owner="bob")
        lease = run_job(api.store, job["id"])
        api.store.save_progress(lease, 4, 10, {"loss": 0.5})
        one.until(lambda ev, data: ev == "job" and data["progress"]["step"] == 4)
    finally:
        one.close()


def test_one_feed_serves_every_client(served: tuple[str, Api, ChangeFeed]) -> None:
    url, api, feed = served
    readers = [SSEReader(f"{url}/v1/stream/jobs", api.tokens["admin"]) for _ in range(8)]
    try:
        wait_until(lambda: len(feed.subscribers) >= 8, 10, "eight subscribers")
        calls = 0
        real = api.store.jobs_updated_since

        def counting(since: float, **kw: Any) -> Any:
            nonlocal calls
            calls += 1
            return real(since, **kw)

        api.store.jobs_updated_since = counting  # type: ignore[method-assign]
        job = api.submit("alice")
        for r in readers:
            r.until(lambda ev, data: data["id"] == job["id"])
        # One read per change, however many clients: far fewer reads than clients.
        assert 1 <= calls <= 3
    finally:
        for r in readers:
            r.close()
