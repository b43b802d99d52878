"""Attacks and abuse by one user of a shared fleet, performed for real against a spotrun
server on a loopback port: each is refused or bounded."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Env, wait_until
from spotrun.config import Settings
from spotrun.http.app import create_app
from spotrun.serve import ServerThread
from spotrun.store import JobStore, Lease


class Served:
    """A real uvicorn server over ``store`` with tokens for admin, alice and bob."""

    def __init__(self, url: str, store: JobStore, app: Any) -> None:
        self.url = url
        self.store = store
        self.app = app
        self.client = httpx.Client(base_url=url, timeout=10)
        self.tokens = {"admin": store.tokens.create("admin", admin=True),
                       "alice": store.tokens.create("alice"),
                       "bob": store.tokens.create("bob")}

    def h(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def submit(self, who: str, body: dict[str, Any]) -> httpx.Response:
        return self.client.post("/v1/jobs", headers=self.h(who), json=body)


@pytest.fixture
def served(store: JobStore, db_url: str, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    monkeypatch.setenv("SPOTRUN_STREAM_RECHECK_SECONDS", "0.5")
    monkeypatch.setenv("SPOTRUN_MAX_STREAMS", "3")
    settings = Settings.from_env(home=str(tmp_path / "home"), database_url=db_url)
    app = create_app(settings, store=store, deliverer=False)
    srv = ServerThread(app, "127.0.0.1", 0, access_log=False)
    srv.start()
    s = Served(f"http://127.0.0.1:{srv.port}", store, app)
    try:
        yield s
    finally:
        s.client.close()
        srv.stop()


def _finish_as(store: JobStore, job_id: str, result: Any) -> None:
    wid = store.register_worker(name="w", host="test", pid=1, pool="spot", has_cuda=False,
                                lease_seconds=30)
    got = store.claim(worker_id=wid, worker_name="w", lease_seconds=30)
    assert got is not None and got[0].job_id == job_id
    store.complete(got[0], result)


# ------------------------------------------------------ another user's model


def test_another_users_model_is_no_such_job_whatever_its_state(served: Served) -> None:
    s = served
    store = s.store
    bobs_done = store.submit("digits-train", {"epochs": 1}, owner="bob")
    _finish_as(store, bobs_done.id, {"accuracy": 0.9})
    bobs_queued = store.submit("digits-train", {"epochs": 1}, owner="bob")
    bobs_sleep = store.submit("sleep", {}, owner="bob")
    nobody = "0" * 28

    answers = []
    for target in (bobs_done.id, bobs_queued.id, bobs_sleep.id, nobody):
        r = s.submit("alice", {"pipeline": "digits-infer", "params": {"model": target}})
        assert r.status_code == 404, r.text  # another user's job, as everywhere
        answers.append(r.json()["detail"].replace(target, "ID"))
    # Succeeded, queued, of another pipeline or never used: alice cannot tell them apart.
    assert answers == ["param 'model': no job with id 'ID'"] * 4
    assert store.list_jobs(owner="alice") == []

    # Bob, and an operator, may use bob's model; bob still hears what is wrong with his own.
    assert s.submit("bob", {"pipeline": "digits-infer",
                            "params": {"model": bobs_done.id}}).status_code == 201
    assert s.submit("admin", {"pipeline": "digits-infer",
                              "params": {"model": bobs_done.id}}).status_code == 201
    r = s.submit("bob", {"pipeline": "digits-infer", "params": {"model": bobs_queued.id}})
    assert r.status_code == 409 and "has not succeeded" in r.json()["detail"]


def test_job_id_params_must_look_like_job_ids(served: Served) -> None:
    for bad in ("../../models/x", "*", "0" * 27, "Z" * 28):
        r = served.submit("alice", {"pipeline": "digits-infer", "params": {"model": bad}})
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["field"] == "body.params.model"


@pytest.mark.slow
def test_a_worker_refuses_another_users_model_even_past_the_submit_check(env: Env) -> None:
    """A row that names bob's model under alice (an old row, a plugin without the check)
    fails at run time as "no job", and bob's model is never loaded for alice."""
    store = env.store()
    bobs = store.submit("digits-train", {"epochs": 1, "batch_size": 256}, owner="bob")
    w = env.worker("w1")
    w.wait_ready()
    wait_until(lambda: store.get(bobs.id).state.value == "succeeded", 120, "bob's training",
               on_fail=w.log)
    # Straight into the queue, as if the submit check had not run.
    alices = store.submit("digits-infer", {"model": bobs.id}, owner="alice")
    operators = store.submit("digits-infer", {"model": bobs.id})
    for job_id in (alices.id, operators.id):
        wait_until(lambda j=job_id: store.get(j).state.is_final, 60, "the inference",
                   on_fail=w.log)
    alice_job = store.get(alices.id)
    assert alice_job.state.value == "failed"
    assert alice_job.error is not None and f"no job with id {bobs.id!r}" in alice_job.error
    assert store.get(operators.id).state.value == "succeeded"
    store.close()


# --------------------------------------------------------------- operators only


def test_metrics_and_workers_are_for_operators(served: Served) -> None:
    s = served
    assert s.client.get("/metrics").status_code == 401
    assert s.client.get("/metrics", headers=s.h("alice")).status_code == 403
    r = s.client.get("/metrics", headers=s.h("admin"))
    assert r.status_code == 200 and "spotrun_queue_depth" in r.text
    assert s.client.get("/v1/workers", headers=s.h("alice")).status_code == 403
    assert s.client.get("/v1/workers", headers=s.h("admin")).status_code == 200


def test_metrics_read_only_new_events_after_the_first_scrape(served: Served) -> None:
    """A scrape costs the same with a long history: it follows the events by key."""
    s = served
    for _ in range(30):
        job = s.store.submit("sleep", {}, owner="bob")
        _finish_as(s.store, job.id, {"ok": True})
    first = s.client.get("/metrics", headers=s.h("admin")).text
    assert 'spotrun_jobs_finished_total{state="succeeded"} 30' in first
    collector_reads: list[int] = []
    real = s.store.analytics.event_kinds_after

    def counted(event_id: int, *, limit: int = 5000) -> list[tuple[int, str, str, float]]:
        got = real(event_id, limit=limit)
        collector_reads.append(len(got))
        return got

    s.store.analytics.event_kinds_after = counted  # type: ignore[method-assign]
    job = s.store.submit("sleep", {}, owner="bob")
    _finish_as(s.store, job.id, {"ok": True})
    text = s.client.get("/metrics", headers=s.h("admin")).text
    assert 'spotrun_jobs_finished_total{state="succeeded"} 31' in text
    assert collector_reads == [3]  # submitted, started, succeeded of the new job only


# ---------------------------------------------------------------- live streams


class Stream:
    """A Server-Sent Events stream read on a thread; ``ended`` once the server closed it."""

    def __init__(self, url: str, token: str) -> None:
        self.frames = 0
        self.status: int | None = None
        self.ended = threading.Event()
        self._client = httpx.Client(timeout=httpx.Timeout(5.0, read=60.0))
        self._thread = threading.Thread(target=self._read, args=(url, token), daemon=True)
        self._thread.start()

    def _read(self, url: str, token: str) -> None:
        try:
            with contextlib.suppress(httpx.HTTPError), self._client.stream(
                    "GET", url, headers={"Authorization": f"Bearer {token}"}) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        self.frames += 1
        finally:
            self.ended.set()

    def close(self) -> None:
        self._client.close()


def test_a_revoked_tokens_stream_ends_while_its_jobs_keep_changing(served: Served) -> None:
    s = served
    token = s.store.tokens.create("carol")
    job = s.store.submit("sleep", {"seconds": 60, "steps": 1000}, owner="carol")
    wid = s.store.register_worker(name="w", host="test", pid=1, pool="spot",
                                  has_cuda=False, lease_seconds=60)
    got = s.store.claim(worker_id=wid, worker_name="w", lease_seconds=60)
    assert got is not None
    lease: Lease = got[0]
    streams = [Stream(f"{s.url}/v1/stream/jobs", token),
               Stream(f"{s.url}/v1/stream/jobs/{job.id}", token)]
    stop = threading.Event()

    def busy() -> None:  # the job changes several times a second, so no stream is quiet
        step = 0
        while not stop.is_set():
            step += 1
            s.store.save_progress(lease, step, 1000, {"loss": 1 / step})
            time.sleep(0.1)

    mover = threading.Thread(target=busy, daemon=True)
    mover.start()
    try:
        wait_until(lambda: all(st.frames >= 3 for st in streams), 20, "live frames")
        s.store.tokens.revoke("carol")
        for st in streams:
            assert st.ended.wait(20), "the stream outlived its revoked token"
    finally:
        stop.set()
        mover.join(5)
        for st in streams:
            st.close()


def test_streams_per_user_are_capped(served: Served) -> None:
    s = served
    open_ = [Stream(f"{s.url}/v1/stream/jobs", s.tokens["alice"]) for _ in range(3)]
    try:
        wait_until(lambda: all(st.status == 200 for st in open_), 20, "three streams")
        r = s.client.get("/v1/stream/jobs", headers=s.h("alice"))
        assert r.status_code == 429 and "too many live streams" in r.json()["detail"]
        # Another user is not affected by alice's streams.
        bob = Stream(f"{s.url}/v1/stream/jobs", s.tokens["bob"])
        wait_until(lambda: bob.status == 200, 20, "bob's stream")
        bob.close()
    finally:
        for st in open_:
            st.close()


# ------------------------------------------------------------ secrets, leftovers


def test_an_expired_token_is_refused_everywhere(served: Served) -> None:
    s = served
    token = s.store.tokens.create("dave", expires_in=0.5)
    headers = {"Authorization": f"Bearer {token}"}
    assert s.client.get("/v1/jobs", headers=headers).status_code == 200
    time.sleep(1.0)
    r = s.client.get("/v1/jobs", headers=headers)
    assert r.status_code == 401 and "invalid, expired or revoked" in r.json()["detail"]
    session = s.store.tokens.create_session("dave", expires_in=60)
    with httpx.Client(base_url=s.url, cookies={"spotrun_session": session}) as browser:
        assert browser.get("/", follow_redirects=False).status_code == 303  # to the login


def test_the_token_spotrun_up_prints_expires_even_if_up_crashes(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items()
           if k not in ("SPOTRUN_DATABASE_URL", "SPOTRUN_CHECKPOINT_URL")}
    env.update(SPOTRUN_HOME=str(home), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "spotrun", "server", "--port", "0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        token = ""
        assert proc.stdout is not None
        for line in proc.stdout:
            if "admin token" in line:
                token = line.split()[-1]
                break
        assert token.startswith("spr_")
        proc.send_signal(signal.SIGKILL)  # no chance to revoke it on the way out
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    store = JobStore.open(f"sqlite:///{home / 'spotrun.db'}")
    try:
        found = store.tokens.verify(token)
        assert found is not None and found.is_admin and found.expires_at is not None
        left = found.expires_at.timestamp() - store.now()
        assert 0 < left <= 3600
    finally:
        store.close()


def test_the_local_database_and_checkpoints_are_private(env_factory: Any,
                                                         tmp_path: Path) -> None:
    import os
    import stat

    old = os.umask(0o022)  # a usual default: everything readable by everyone
    try:
        home = tmp_path / "fresh"
        e = env_factory(f"sqlite:///{home / 'spotrun.db'}")
        e.vars["SPOTRUN_HOME"] = str(home)
        e.vars["SPOTRUN_CHECKPOINT_URL"] = str(home / "checkpoints")
        job_id = e.cli("submit", "sleep", "-p", "seconds=0.3", "-p", "steps=3").stdout.strip()
        w = e.worker("w1", "--max-jobs", "1")
        assert w.wait(60) == 0, w.log()
        store = JobStore.open(e.db_url)
        assert store.get(job_id).state.value == "succeeded"
        store.close()
    finally:
        os.umask(old)

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(home) == 0o700
    assert mode(home / "spotrun.db") == 0o600
    for extra in ("spotrun.db-wal", "spotrun.db-shm"):
        if (home / extra).exists():
            assert mode(home / extra) & 0o077 == 0, extra
    assert mode(home / "checkpoints") == 0o700


# ------------------------------------------------------------------- sign-in


def _login(s: Served, token: str, **headers: str) -> httpx.Response:
    return s.client.post("/login", data={"token": token}, follow_redirects=False,
                         headers={"Origin": s.url, **headers})


def test_state_changes_must_prove_their_origin(served: Served) -> None:
    s = served
    token = s.tokens["alice"]
    # Neither Sec-Fetch-Site nor Origin: refused (a login CSRF from a stripped request).
    r = s.client.post("/login", data={"token": token}, follow_redirects=False)
    assert r.status_code == 403 and "set-cookie" not in r.headers
    r = _login(s, token, **{"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403 and "set-cookie" not in r.headers
    r = s.client.post("/login", data={"token": token}, follow_redirects=False,
                      headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    r = s.client.post("/login", data={"token": token}, follow_redirects=False,
                      headers={"Sec-Fetch-Site": "same-origin"})
    assert r.status_code == 303 and "spotrun_session=" in r.headers["set-cookie"]


def test_the_cookie_is_a_session_that_sign_out_and_revocation_end(served: Served) -> None:
    s = served
    r = _login(s, s.tokens["alice"])
    assert r.status_code == 303
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert s.tokens["alice"] not in cookie  # never the API token itself
    session = r.cookies["spotrun_session"]
    # The session id is no API token.
    assert s.client.get("/v1/jobs", headers={"Authorization": f"Bearer {session}"}
                        ).status_code == 401
    with httpx.Client(base_url=s.url, cookies={"spotrun_session": session}) as stolen:
        assert stolen.get("/", follow_redirects=False).status_code == 200
        # Sign-out ends the session on the server: a copy of the cookie dies with it.
        with httpx.Client(base_url=s.url, cookies={"spotrun_session": session}) as me:
            assert me.post("/logout", headers={"Origin": s.url},
                           follow_redirects=False).status_code == 303
        assert stolen.get("/", follow_redirects=False).status_code == 303
    # Revoking the token ends every session it signed in.
    bob = _login(s, s.tokens["bob"]).cookies["spotrun_session"]
    with httpx.Client(base_url=s.url, cookies={"spotrun_session": bob}) as browser:
        assert browser.get("/", follow_redirects=False).status_code == 200
        s.store.tokens.revoke("bob")
        assert browser.get("/", follow_redirects=False).status_code == 303


def test_secure_cookies_behind_a_trusted_tls_proxy_only(store: JobStore, db_url: str,
                                                        tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    token = store.tokens.create("erin")
    settings = Settings.from_env(home=str(tmp_path / "home"), database_url=db_url)

    def login_via_proxy() -> httpx.Response:
        srv = ServerThread(create_app(settings, store=store, deliverer=False), "127.0.0.1",
                           0, access_log=False)
        srv.start()
        try:
            url = f"http://127.0.0.1:{srv.port}"
            # What a TLS-terminating ingress adds; the browser saw https://spotrun.example.
            return httpx.post(f"{url}/login", data={"token": token}, headers={
                "Origin": "https://spotrun.example", "Host": "spotrun.example",
                "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7"})
        finally:
            srv.stop()

    monkeypatch.delenv("SPOTRUN_TRUSTED_PROXIES", raising=False)
    untrusted = login_via_proxy()
    # Forwarded headers from an address nobody named are ignored: plain http, and the
    # https Origin does not match it.
    assert untrusted.status_code == 403
    monkeypatch.setenv("SPOTRUN_TRUSTED_PROXIES", "127.0.0.0/8")
    trusted = login_via_proxy()
    assert trusted.status_code == 303, trusted.text
    cookie = trusted.headers["set-cookie"]
    assert cookie.startswith("__Host-spotrun_session=")
    assert "Secure" in cookie and "Path=/" in cookie and "Domain" not in cookie


# --------------------------------------------------------------- cross-user sweep


def test_every_route_answers_404_for_another_users_job(served: Served) -> None:
    """Every route that takes a job id, with every method it has, in the API and the
    dashboard: bob's job is, to alice, exactly a job that does not exist."""
    from fastapi.routing import APIRoute
    from starlette.routing import Route

    s = served
    bobs = s.store.submit("sleep", {"seconds": 60}, owner="bob")
    nobody = "f" * 28
    session = _login(s, s.tokens["alice"]).cookies["spotrun_session"]
    app_routes = [r for r in s.app.routes
                  if isinstance(r, APIRoute | Route) and "{job_id}" in r.path]
    assert len(app_routes) >= 8  # the sweep really covers the API and the dashboard
    # Every route that takes an id in its path is swept; the only others are an admin's
    # (a worker, which no user owns).
    with_params = {r.path for r in s.app.routes
                   if isinstance(r, APIRoute | Route) and "{" in r.path}
    assert with_params - {r.path for r in app_routes} == {
        "/v1/workers/{worker}/preempt", "/workers/{worker_id}/preempt"}
    assert s.client.post("/v1/workers/w1/preempt", headers=s.h("alice")).status_code == 403
    seen = 0
    for route in app_routes:
        for method in sorted(route.methods or ()):
            if method == "HEAD":
                continue
            answers = []
            for job_id in (bobs.id, nobody):
                path = route.path.replace("{job_id}", job_id)
                if path.startswith("/v1/"):
                    r = s.client.request(method, path, headers=s.h("alice"), timeout=5)
                else:
                    with httpx.Client(base_url=s.url, timeout=5,
                                      cookies={"spotrun_session": session}) as browser:
                        r = browser.request(method, path, headers={"Origin": s.url},
                                            follow_redirects=False)
                answers.append((r.status_code, r.text.replace(job_id, "ID")))
            assert answers[0][0] == 404, (method, route.path, answers[0])
            assert answers[0] == answers[1], (method, route.path)
            seen += 1
    assert seen >= 8
    # The routes without an id in the path: bob's job is in no list of alice's, and a
    # body that names it (a model to load) is answered as one naming no job.
    listed = s.client.get("/v1/jobs", headers=s.h("alice")).json()["jobs"]
    assert bobs.id not in [j["id"] for j in listed]
    named = []
    for job_id in (bobs.id, nobody):
        r = s.submit("alice", {"pipeline": "digits-infer", "params": {"model": job_id}})
        named.append((r.status_code, r.text.replace(job_id, "ID")))
    assert named[0][0] == 404 and named[0] == named[1], named
    # Nothing happened to bob's job.
    job = s.store.get(bobs.id)
    assert job.state.value == "queued" and not job.cancel_requested



# ----------------------------------------------------------------------- quotas


def test_quotas_refuse_with_429_naming_the_quota_and_queue_nothing(
        served: Served, env_factory: Any, db_url: str) -> None:
    s = served
    cli = env_factory(db_url)
    out = cli.cli("quota", "set", "alice", "--queued", "3", "--max-retries", "5").stdout
    assert "max_queued" in out and "3" in out
    body = {"pipeline": "sleep", "params": {"seconds": 60}}
    for _ in range(3):
        assert s.submit("alice", body).status_code == 201
    r = s.submit("alice", body)
    assert r.status_code == 429
    assert r.json()["detail"] == ("over quota max_queued for alice: jobs waiting in the "
                                  "queue at once is limited to 3, and this would make 4")
    assert len(s.store.list_jobs(owner="alice")) == 3
    # Ceilings: priority above 0 is an operator's right; max_retries per user.
    r = s.submit("alice", {**body, "priority": 5})
    assert r.status_code == 429 and "max_priority" in r.json()["detail"]
    r = s.submit("alice", {**body, "max_retries": 6})
    assert r.status_code == 429 and "limited to 5" in r.json()["detail"]
    r = s.submit("bob", {**body, "max_retries": 11})  # bob has the default quota
    assert r.status_code == 429 and "max_retries" in r.json()["detail"]
    assert "limited to 10" in r.json()["detail"]
    r = s.submit("bob", {"pipeline": "digits-infer",
                         "params": {"model": "0" * 28, "inputs": [[1.0] * 64] * 2000}})
    # Never queued, whichever check says so (404: the model is no job).
    assert r.status_code in (404, 413, 422, 429)
    # Bob is not affected by alice's quota; an admin has none.
    assert s.submit("bob", body).status_code == 201
    assert s.submit("admin", {**body, "priority": 50}).status_code == 201
    assert len(s.store.list_jobs(owner="alice")) == 3
    # A retried submit with its key is the first job, whatever the quota says now.
    first = s.client.post("/v1/jobs", headers={**s.h("bob"), "Idempotency-Key": "k1"},
                          json=body)
    assert first.status_code == 201
    cli.cli("quota", "set", "bob", "--queued", "1")
    again = s.client.post("/v1/jobs", headers={**s.h("bob"), "Idempotency-Key": "k1"},
                          json=body)
    assert again.status_code == 201 and again.json()["id"] == first.json()["id"]


def test_params_size_quota(served: Served, env_factory: Any, db_url: str) -> None:
    s = served
    env_factory(db_url).cli("quota", "set", "alice", "--params-bytes", "2000")
    model = s.store.submit("digits-train", {"epochs": 1}, owner="alice")
    _finish_as(s.store, model.id, {"accuracy": 0.9})
    few = {"pipeline": "digits-infer", "params": {"model": model.id,
                                                 "inputs": [[1.0] * 64]}}
    assert s.submit("alice", few).status_code == 201
    many = {"pipeline": "digits-infer", "params": {"model": model.id,
                                                  "inputs": [[1.0] * 64] * 50}}
    r = s.submit("alice", many)
    assert r.status_code == 429, r.text
    assert r.json()["detail"].startswith("over quota max_params_bytes for alice: bytes of "
                                         "a job's params is limited to 2000")
    assert len(s.store.list_jobs(owner="alice", pipeline="digits-infer")) == 1


def test_concurrent_submits_never_overrun_the_queued_quota(
        served: Served, env_factory: Any, db_url: str) -> None:
    s = served
    env_factory(db_url).cli("quota", "set", "carol", "--queued", "5")
    token = s.store.tokens.create("carol")
    codes: list[int] = []
    lock = threading.Lock()

    def submit() -> None:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            r = c.post("/v1/jobs", headers={"Authorization": f"Bearer {token}"},
                       json={"pipeline": "sleep", "params": {"seconds": 1}})
        with lock:
            codes.append(r.status_code)

    threads = [threading.Thread(target=submit) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(codes) == [201] * 5 + [429] * 7
    assert len(s.store.list_jobs(owner="carol")) == 5
