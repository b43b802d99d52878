"""A job's events as bus messages: what a backend listening to the events topic receives.

Pure functions: the publisher carries out what they return.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from spotrun.jobs import EventKind, iso
from spotrun.store import IntakeEvent
from spotrun.strictjson import json_bytes

# The store's kind "submitted" is "queued" on the bus: the word a backend waits for.
BUS_KIND = {EventKind.SUBMITTED.value: "queued"}
FINAL_KINDS = frozenset({EventKind.SUCCEEDED.value, EventKind.FAILED.value,
                         EventKind.CANCELLED.value})
REJECTED = "rejected"
MAX_ATTRIBUTE_BYTES = 1024  # Pub/Sub's limit on an attribute's value


def bus_kind(kind: str) -> str:
    return BUS_KIND.get(kind, kind)


def job_event(ev: IntakeEvent) -> tuple[bytes, dict[str, str]]:
    """(body, attributes) of one event of a job; the job id is the ordering key."""
    body: dict[str, Any] = {
        "kind": bus_kind(ev.kind), "job_id": ev.job_id, "event_id": ev.event_id,
        "at": iso(dt.datetime.fromtimestamp(ev.at, tz=dt.UTC)), "attempt": ev.attempt,
        "worker": ev.worker, "message": ev.message, "message_id": ev.message_id,
        "idempotency_key": ev.idempotency_key,
    }
    if ev.data is not None:
        body["data"] = ev.data
    if ev.kind == EventKind.SUCCEEDED.value:
        body["result"] = ev.result
    elif ev.kind in (EventKind.FAILED.value, EventKind.CANCELLED.value):
        body["error"] = ev.error
    attrs = {"kind": body["kind"], "job_id": ev.job_id, "event_id": str(ev.event_id),
             "message_id": ev.message_id}
    if ev.idempotency_key is not None:
        attrs["idempotency_key"] = ev.idempotency_key
    return json_bytes(body), attrs


def rejected_event(message_id: str, reason: str, idempotency_key: str | None,
                   at: dt.datetime) -> tuple[bytes, dict[str, str]]:
    """(body, attributes) telling that a message can never be a job, and why."""
    body = {"kind": REJECTED, "message_id": message_id, "reason": reason,
            "idempotency_key": idempotency_key, "at": iso(at)}
    attrs = {"kind": REJECTED, "message_id": message_id}
    if idempotency_key is not None:
        attrs["idempotency_key"] = truncate(idempotency_key)
    return json_bytes(body), attrs


def is_final(ev: IntakeEvent) -> bool:
    """Whether nothing after this event is published: the job's end."""
    return ev.kind in FINAL_KINDS and ev.job_state.is_final


def truncate(text: str, limit: int = MAX_ATTRIBUTE_BYTES) -> str:
    """``text`` cut to fit an attribute's value (UTF-8 bytes)."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode(errors="ignore") + "..."
