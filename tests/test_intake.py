"""The bus-neutral intake: a message checked exactly as ``POST /v1/jobs`` checks a request,
queued once, and the store's record of it and of its events' publication (on SQLite and
PostgreSQL). The Pub/Sub parts, with the real emulator, are in test_pubsub.py."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from starlette.exceptions import StarletteDeprecationWarning

from conftest import wait_until
from spotrun.config import Settings
from spotrun.events import Note
from spotrun.http.app import create_app
from spotrun.intake import events as bus_events
from spotrun.intake.requests import IntakeRules, Message, Rejected, submit
from spotrun.jobs import EventKind
from spotrun.schema import events as events_table
from spotrun.store import JobStore

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

RULES = IntakeRules(source="pubsub:projects/p/subscriptions/s", owner="pubsub")


def msg(body: Any, message_id: str = "m1", **attributes: str) -> Message:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Message(message_id, data, attributes)


# --------------------------------------------------------- the API's own checks


@pytest.fixture
def api_detail(sqlite_url: str, tmp_path: Path) -> Iterator[Any]:
    """The ``detail`` the HTTP API answers for a body (None when it queues the job)."""
    store = JobStore.open(sqlite_url)
    token = store.tokens.create("checker")
    app = create_app(Settings.from_env(home=str(tmp_path / "h"), database_url=sqlite_url),
                     store=store, deliverer=False)
    with TestClient(app) as client:
        def detail(body: dict[str, Any]) -> str | None:
            r = client.post("/v1/jobs", json=body,
                            headers={"Authorization": f"Bearer {token}"})
            return None if r.status_code == 201 else str(r.json()["detail"])

        yield detail
    store.close()


@pytest.mark.parametrize("body", [
    {"pipeline": "no-such-pipeline"},
    {"pipeline": "sleep", "params": {"steps": 0}},
    {"pipeline": "sleep", "params": {"naps": 3}},
    {"pipeline": "sleep", "params": {"seconds": "a while"}},
    {"pipeline": "sleep", "params": {"seconds": 1, "note": "\x00"}},
    {"pipeline": "sleep", "callback_url": "http://127.0.0.1/hook"},
])
def test_a_message_is_refused_for_what_the_api_refuses_in_the_same_words(
        store: JobStore, api_detail: Any, body: dict[str, Any]) -> None:
    expected = api_detail(body)
    assert expected is not None
    with pytest.raises(Rejected) as refused:
        submit(store, msg(body), RULES)
    assert refused.value.reason == expected
    assert store.list_jobs() == []


@pytest.mark.parametrize("data, why", [
    (b"\xff\xfe", "not JSON"),
    (b"{pipeline", "not JSON"),
    (b"42", "must be a JSON object"),
    (json.dumps({"pipeline": "sleep", "colour": "red"}).encode(), "colour: unknown field"),
    (json.dumps({"pipeline": "sleep", "priority": 5000}).encode(), "priority: "),
    (json.dumps({"params": {}}).encode(), "pipeline: Field required"),
    (json.dumps({"pipeline": "sleep", "params": {"x": "y" * 1_000_000}}).encode(),
     "larger than the API's limit"),
])
def test_a_message_that_is_not_a_request_is_refused_naming_the_problem(
        store: JobStore, data: bytes, why: str) -> None:
    with pytest.raises(Rejected) as refused:
        submit(store, Message("m1", data, {}), RULES)
    assert why in refused.value.reason
    assert "\n" not in refused.value.reason
    assert store.list_jobs() == []


def test_a_request_is_queued_once_whatever_redelivers_it(store: JobStore) -> None:
    body = {"pipeline": "sleep", "params": {"seconds": 0}, "priority": 3}
    job = submit(store, msg(body, "m1"), RULES)
    assert submit(store, msg(body, "m1"), RULES).id == job.id  # a redelivery
    keyed = submit(store, msg(body, "m2", idempotency_key="k"), RULES)
    assert keyed.id != job.id
    assert submit(store, msg(body, "m3", idempotency_key="k"), RULES).id == keyed.id
    assert len(store.list_jobs()) == 2
    assert job.owner == "pubsub" and job.priority == 3
    # The first message recorded stays the job's: its id goes out with every event.
    assert store.intake.request(keyed.id) == (RULES.source, "m2", "k")
    assert store.intake.request(job.id) == (RULES.source, "m1", None)


def test_a_key_used_for_another_request_is_refused(store: JobStore) -> None:
    submit(store, msg({"pipeline": "sleep"}, "m1", idempotency_key="k"), RULES)
    with pytest.raises(Rejected, match="idempotency_key 'k' was used for a different job"):
        submit(store, msg({"pipeline": "sleep", "params": {"seconds": 2}}, "m2",
                          idempotency_key="k"), RULES)
    with pytest.raises(Rejected, match="idempotency_key: must be 1 to 200"):
        submit(store, msg({"pipeline": "sleep"}, "m3", idempotency_key="x" * 201), RULES)


def test_the_owner_comes_from_an_attribute_only_where_the_operator_allows(
        store: JobStore) -> None:
    body = {"pipeline": "sleep"}
    assert submit(store, msg(body, "m1", owner="mallory"), RULES).owner == "pubsub"
    rules = IntakeRules(source=RULES.source, owner="pubsub", owner_attribute="owner",
                        allowed_owners=frozenset({"alice"}))
    assert submit(store, msg(body, "m2", owner="alice"), rules).owner == "alice"
    assert submit(store, msg(body, "m3"), rules).owner == "pubsub"
    with pytest.raises(Rejected, match="'mallory' is not an owner this intake accepts"):
        submit(store, msg(body, "m4", owner="mallory"), rules)


# ----------------------------------------------------- the events' publication


def test_each_jobs_events_are_followed_from_its_own_cursor(store: JobStore) -> None:
    a = submit(store, msg({"pipeline": "sleep"}, "m1"), RULES)
    b = submit(store, msg({"pipeline": "sleep"}, "m2", idempotency_key="kb"), RULES)
    store.submit("sleep", {}, owner="alice")  # not from the bus: never published
    pending = store.intake.events(RULES.source)
    assert [(e.job_id, e.kind, e.message_id) for e in pending] == [
        (a.id, "submitted", "m1"), (b.id, "submitted", "m2")]
    assert pending[1].idempotency_key == "kb"
    store.intake.mark_published(a.id, pending[0].event_id, done=False)
    assert [e.job_id for e in store.intake.events(RULES.source)] == [b.id]
    store.cancel(a.id)
    [cancelled] = [e for e in store.intake.events(RULES.source) if e.job_id == a.id]
    assert cancelled.kind == EventKind.CANCELLED and bus_events.is_final(cancelled)
    body, attrs = bus_events.job_event(cancelled)
    assert attrs == {"kind": "cancelled", "job_id": a.id, "event_id": str(cancelled.event_id),
                     "message_id": "m1"}
    assert json.loads(body)["error"] == "cancelled"
    store.intake.mark_published(a.id, cancelled.event_id, done=True)
    store.intake.mark_published(a.id, pending[0].event_id, done=False)  # never back
    store.add_note(a.id, Note("after the end"))
    assert [e.job_id for e in store.intake.events(RULES.source)] == [b.id]
    assert store.intake.events("pubsub:projects/p/subscriptions/other") == []


def test_an_event_that_commits_after_a_later_one_is_still_published(pg_url: str) -> None:
    store = JobStore.open(pg_url)
    try:
        a = submit(store, msg({"pipeline": "sleep"}, "m1"), RULES)
        b = submit(store, msg({"pipeline": "sleep"}, "m2"), RULES)
        for e in store.intake.events(RULES.source):
            store.intake.mark_published(e.job_id, e.event_id, done=False)
        slow = store.engine.connect()
        tx = slow.begin()
        slow.execute(events_table.insert().values(job_id=a.id, at=0.0, kind="note",
                                                  attempt=0, message="slow"))
        store.add_note(b.id, Note("fast"))  # a later id, committed first
        [fast] = store.intake.events(RULES.source)
        assert fast.job_id == b.id
        store.intake.mark_published(b.id, fast.event_id, done=False)
        tx.commit()
        slow.close()
        [late] = store.intake.events(RULES.source)
        assert (late.job_id, late.message) == (a.id, "slow") and late.event_id < fast.event_id
    finally:
        store.close()


def test_one_holder_at_a_time_has_the_publishing_lease(store: JobStore) -> None:
    assert store.intake.take_lease("events:x", "one", 0.5)
    assert store.intake.take_lease("events:x", "one", 0.5)  # a renewal
    assert not store.intake.take_lease("events:x", "two", 0.5)
    assert store.intake.take_lease("events:y", "two", 30)  # another source's lease
    wait_until(lambda: store.intake.take_lease("events:x", "two", 30), 30, "the lease to expire")
    assert not store.intake.take_lease("events:x", "one", 30)
    store.intake.release_lease("events:x", "two")
    assert store.intake.take_lease("events:x", "one", 30)


def test_a_job_deleted_takes_its_intake_record_with_it(store: JobStore) -> None:
    job = submit(store, msg({"pipeline": "sleep"}, "m1"), RULES)
    with store.engine.begin() as conn:
        if not store.is_postgres:
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")
        conn.execute(sa.text("DELETE FROM jobs WHERE id = :id"), {"id": job.id})
    assert store.intake.request(job.id) is None
