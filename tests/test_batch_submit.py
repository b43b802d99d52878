"""Many jobs queued at once: ``JobStore.submit_many`` and ``POST /v1/jobs/batch``, on SQLite
and PostgreSQL (directly and through PgBouncer). What a user sees: all queued or none,
quotas for the whole batch, idempotency keys per item, ownership, and the API naming the
item and field at fault."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.exceptions import StarletteDeprecationWarning

from spotrun.config import Settings
from spotrun.http.app import create_app
from spotrun.jobs import JobState
from spotrun.quotas import Quota, QuotaExceeded
from spotrun.store import JobStore, KeyReused, NewJob
from test_api import Api as ApiTokens

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

PGBOUNCER = True


def _sleep(seconds: float = 0, **kw: Any) -> NewJob:
    return NewJob("sleep", {"seconds": seconds}, **kw)


# ----------------------------------------------------------------------- store


def test_a_batch_is_queued_in_order_each_job_as_a_single_submit_stores_it(
        store: JobStore) -> None:
    jobs = store.submit_many([_sleep(i, priority=-i, timeout=5 if i % 2 else 2.5)
                              for i in range(5)], owner="alice")
    assert [j.params for j in jobs] == [{"seconds": i} for i in range(5)]
    assert [j.priority for j in jobs] == [0, -1, -2, -3, -4]
    assert [j.timeout for j in jobs] == [2.5, 5.0, 2.5, 5.0, 2.5]
    # What the call answers is what a read answers: the row and its one 'submitted' event.
    assert [store.get(j.id) for j in jobs] == jobs
    assert all([e.kind for e in j.events] == ["submitted"] for j in jobs)
    assert {j.owner for j in jobs} == {"alice"}
    assert len({j.id for j in jobs}) == 5
    assert store.list_jobs(owner="bob") == []
    single = store.submit("sleep", {"seconds": 1}, owner="alice", idempotency_key="one",
                          deadline=2e9, pool="spot")
    assert store.get(single.id) == single
    assert store.submit_many([]) == []


def test_a_batch_with_a_key_used_for_another_job_queues_nothing(store: JobStore) -> None:
    first = store.submit("sleep", {"seconds": 1}, owner="alice", idempotency_key="k")
    with pytest.raises(KeyReused) as raised:
        store.submit_many([_sleep(2), _sleep(9, idempotency_key="k"), _sleep(3)],
                          owner="alice")
    assert (raised.value.index, raised.value.job_id) == (1, first.id)
    assert [j.id for j in store.list_jobs()] == [first.id]
    # A job on its own is refused alike.
    with pytest.raises(KeyReused):
        store.submit("sleep", {"seconds": 9}, owner="alice", idempotency_key="k")
    assert len(store.list_jobs()) == 1


def test_idempotency_keys_are_honoured_per_item_and_per_owner(store: JobStore) -> None:
    first = store.submit("sleep", {"seconds": 1}, owner="alice", idempotency_key="k1")
    batch = [_sleep(1, idempotency_key="k1"), _sleep(2, idempotency_key="k2"), _sleep(3),
             _sleep(2, idempotency_key="k2")]
    jobs = store.submit_many(batch, owner="alice")
    assert jobs[0] == store.get(first.id)
    assert jobs[1].id == jobs[3].id != jobs[2].id
    assert len(store.list_jobs(owner="alice")) == 3
    # The batch retried: its keyed jobs are the same ones; the unkeyed one is new.
    again = store.submit_many(batch, owner="alice")
    assert [again[0].id, again[1].id, again[3].id] == [first.id, jobs[1].id, jobs[1].id]
    assert again[2].id != jobs[2].id
    assert len(store.list_jobs(owner="alice")) == 4
    # Keys are per owner; the operator's (no owner) are their own too.
    bobs = store.submit_many([_sleep(1, idempotency_key="k1")], owner="bob")
    ops = store.submit_many([_sleep(1, idempotency_key="k1")])
    assert len({bobs[0].id, ops[0].id, first.id}) == 3
    assert store.submit_many([_sleep(1, idempotency_key="k1")])[0].id == ops[0].id


def test_the_queued_quota_holds_for_the_whole_batch(store: JobStore) -> None:
    quota = Quota(max_queued=3, max_priority=0)
    store.submit("sleep", {"seconds": 1}, owner="alice", quota=quota)
    with pytest.raises(QuotaExceeded) as raised:
        store.submit_many([_sleep(), _sleep(), _sleep()], owner="alice", quota=quota)
    assert (raised.value.limit, raised.value.use) == ("max_queued", 4)
    assert len(store.list_jobs(owner="alice")) == 1
    # An item over a request limit refuses the batch too.
    with pytest.raises(QuotaExceeded, match="max_priority"):
        store.submit_many([_sleep(), _sleep(priority=5)], owner="alice", quota=quota)
    assert len(store.list_jobs(owner="alice")) == 1
    assert len(store.submit_many([_sleep(), _sleep()], owner="alice", quota=quota)) == 2
    # A keyed job already queued takes no new place.
    keyed = store.submit_many([_sleep(7, idempotency_key="x")], owner="bob", quota=quota)
    store.submit_many([_sleep(), _sleep()], owner="bob", quota=quota)
    assert store.submit_many([_sleep(7, idempotency_key="x")], owner="bob",
                             quota=quota) == [store.get(keyed[0].id)]
    # Without a quota (the operator) there is no limit.
    assert len(store.submit_many([_sleep()] * 5, owner="alice")) == 5


def test_concurrent_batches_never_overrun_the_queued_quota(store: JobStore) -> None:
    quota = Quota(max_queued=5)
    outcomes: list[str] = []
    lock = threading.Lock()
    gate = threading.Barrier(6)

    def submit() -> None:
        s = JobStore(store.engine)
        gate.wait(10)
        try:
            s.submit_many([_sleep(), _sleep()], owner="carol", quota=quota)
            got = "queued"
        except QuotaExceeded:
            got = "refused"
        with lock:
            outcomes.append(got)

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["queued"] * 2 + ["refused"] * 4
    assert len(store.list_jobs(owner="carol", state=JobState.QUEUED)) == 4


def test_concurrent_retries_with_one_key_get_one_job(store: JobStore) -> None:
    # The same batch sent four times at once (a client's retries): one set of jobs.
    from spotrun.service import queue
    from spotrun.service.auth import Principal
    from spotrun.service.submission import Submission

    who = Principal(name="dora", is_admin=False)
    subs = [Submission("sleep", {"seconds": 1}), Submission("sleep", {"seconds": 2})]
    answers: list[list[str]] = []
    lock = threading.Lock()
    gate = threading.Barrier(4)

    def submit() -> None:
        s = JobStore(store.engine)
        gate.wait(10)
        got = queue.submit_many(s, subs, caller=who, idempotency_keys=["a", "b"])
        with lock:
            answers.append([j.id for j in got])

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == 4 and all(a == answers[0] for a in answers), answers
    assert len(store.list_jobs(owner="dora")) == 2


# ------------------------------------------------------------------------- API


class Api(ApiTokens):
    """test_api's client with its three tokens, and the batch call."""

    def batch(self, who: str, jobs: Any) -> httpx.Response:
        return self.client.post("/v1/jobs/batch", json={"jobs": jobs}, headers=self.h(who))


@pytest.fixture
def api(store: JobStore, db_url: str, tmp_path: Path) -> Iterator[Api]:
    settings = Settings.from_env(home=str(tmp_path / "home"), database_url=db_url)
    app = create_app(settings, store=store, deliverer=False)
    with TestClient(app) as client:
        yield Api(client, store)


def test_a_batch_answers_201_with_its_jobs_in_order_and_they_are_the_callers(
        api: Api) -> None:
    r = api.batch("alice", [{"pipeline": "sleep", "params": {"seconds": s}}
                            for s in (3, 1, 2)] + [{"pipeline": "sleep", "timeout": 60}])
    assert r.status_code == 201, r.text
    jobs = r.json()["jobs"]
    # Params as stored: the pipeline's defaults filled in, as for a job on its own.
    assert [j["params"]["seconds"] for j in jobs] == [3, 1, 2, 1]
    assert jobs[3]["timeout"] == 60
    assert all(j["state"] == "queued" and j["events"][0]["kind"] == "submitted"
               for j in jobs)
    # The same shape as GET /v1/jobs/{id}; other users cannot see them.
    assert api.get(f"/v1/jobs/{jobs[0]['id']}", "alice").json() == jobs[0]
    assert api.get(f"/v1/jobs/{jobs[0]['id']}", "bob").status_code == 404
    assert {j.owner for j in api.store.list_jobs()} == {"alice"}


@pytest.mark.parametrize(("item", "field", "status"), [
    ({"pipeline": "nope"}, "body.jobs.2.pipeline", 422),
    ({"pipeline": "sleep", "params": {"seconds": -1}}, "body.jobs.2.params.seconds", 422),
    ({"pipeline": "sleep", "params": {"secs": 1}}, "body.jobs.2.params.secs", 422),
    ({"pipeline": "sleep", "pool": "No Such"}, "body.jobs.2.pool", 422),
    ({"pipeline": "sleep", "bogus": 1}, "body.jobs.2.bogus", 422),
    ({"pipeline": "digits-infer", "params": {"model": "0" * 28}},
     "body.jobs.2.params.model", 404),
    ({"pipeline": "sleep", "callback_url": "http://127.0.0.1/hook"},
     "body.jobs.2.callback_url", 403),
])
def test_an_invalid_item_is_named_by_index_and_field_and_nothing_is_queued(
        api: Api, item: dict[str, Any], field: str, status: int) -> None:
    good = {"pipeline": "sleep", "params": {"seconds": 1}}
    r = api.batch("alice", [good, good, item, good])
    assert r.status_code == status, r.text
    assert field in [e["field"] for e in r.json()["errors"]], r.json()
    assert "body.jobs.2" in r.json()["detail"]
    assert api.store.list_jobs() == []


def test_a_batch_is_bounded_and_not_empty(api: Api) -> None:
    for jobs in ([], [{"pipeline": "sleep"}] * 1001):
        r = api.batch("alice", jobs)
        assert r.status_code == 422, r.text
        assert [e["field"] for e in r.json()["errors"]] == ["body.jobs"]
    r = api.client.post("/v1/jobs/batch", json=[{"pipeline": "sleep"}],
                        headers={"Authorization": f"Bearer {api.tokens['alice']}"})
    assert r.status_code == 422
    assert api.batch("alice", [{"pipeline": "sleep"}] * 1000).status_code == 201
    assert len(api.store.list_jobs()) == 1000


def test_idempotency_keys_per_item_through_the_api(api: Api) -> None:
    jobs = [{"pipeline": "sleep", "params": {"seconds": 1}, "idempotency_key": "a"},
            {"pipeline": "sleep", "params": {"seconds": 2}, "idempotency_key": "b"}]
    first = api.batch("alice", jobs)
    again = api.batch("alice", jobs)
    assert first.status_code == again.status_code == 201
    assert [j["id"] for j in again.json()["jobs"]] == [j["id"] for j in first.json()["jobs"]]
    assert len(api.store.list_jobs()) == 2
    # Bob's keys are his own.
    assert api.batch("bob", jobs).status_code == 201
    assert len(api.store.list_jobs()) == 4
    # A key of another job: 409 naming the item; the batch's other job is not queued.
    other = [{"pipeline": "sleep", "params": {"seconds": 5}, "idempotency_key": "c"},
             {"pipeline": "sleep", "params": {"seconds": 9}, "idempotency_key": "b"}]
    r = api.batch("alice", other)
    assert r.status_code == 409, r.text
    assert r.json()["errors"][0]["field"] == "body.jobs.1.idempotency_key"
    assert first.json()["jobs"][1]["id"] in r.json()["detail"]
    # A key twice in one batch is a mistake of the request.
    r = api.batch("alice", [jobs[0], {**jobs[1], "idempotency_key": "a"}])
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "body.jobs.1.idempotency_key"
    assert len(api.store.list_jobs()) == 4


def test_quotas_apply_to_the_whole_batch_through_the_api(api: Api) -> None:
    api.store.set_quota("alice", {"max_queued": 3})
    job = {"pipeline": "sleep", "params": {"seconds": 1}}
    assert api.batch("alice", [job]).status_code == 201
    r = api.batch("alice", [job, job, job])
    assert r.status_code == 429
    assert r.json()["detail"] == ("over quota max_queued for alice: jobs waiting in the "
                                  "queue at once is limited to 3, and this would make 4")
    r = api.batch("alice", [job, {**job, "priority": 5}])
    assert r.status_code == 429
    assert r.json()["detail"].startswith("body.jobs.1: over quota max_priority for alice")
    assert len(api.store.list_jobs()) == 1
    assert api.batch("alice", [job, job]).status_code == 201
    # An admin has no quota.
    assert api.batch("admin", [{**job, "priority": 50}] * 5).status_code == 201


def test_the_batch_path_is_post_only(api: Api) -> None:
    for method in ("GET", "PUT", "DELETE"):
        r = api.client.request(method, "/v1/jobs/batch",
                               headers={"Authorization": f"Bearer {api.tokens['alice']}"})
        assert r.status_code == 405, (method, r.text)
        assert r.headers["allow"] == "POST"
