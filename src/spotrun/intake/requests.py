"""One bus message to one job: validated as ``POST /v1/jobs`` validates, queued at most once.

A message that can never be a job raises :class:`Rejected` with one line naming the
problem; any other exception is a passing failure (the database is away) and the message
must be redelivered.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from spotrun.http.limits import MAX_BODY_BYTES
from spotrun.http.schemas import SubmitRequest
from spotrun.jobs import Job
from spotrun.pipelines.registry import UnknownPipeline
from spotrun.service import queue
from spotrun.service.submission import (
    Forbidden,
    IdempotencyConflict,
    Invalid,
    Refused,
    check_text,
)
from spotrun.store import DatabaseUnavailable, JobStore, StoreError

IDEMPOTENCY_ATTRIBUTE = "idempotency_key"
MAX_KEY_LENGTH = 200  # the store's column, and the API's Idempotency-Key header
MAX_OWNER_LENGTH = 100


class Rejected(ValueError):
    """This message can never be a job; ``reason`` says why in one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Message:
    """What a bus delivered: its id, its body and its attributes."""

    message_id: str
    data: bytes
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class IntakeRules:
    """How messages of one source become jobs.

    ``owner`` owns the jobs unless ``owner_attribute`` names an attribute the operator
    lets messages set; ``allowed_owners``, when not empty, are the only owners it may name.
    """

    source: str
    owner: str
    owner_attribute: str | None = None
    allowed_owners: frozenset[str] = frozenset()
    allow_private_callbacks: bool = False


def describe(exc: ValidationError) -> str:
    """One line naming each field at fault, as the API's 422 answers do."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ())) or "message"
        reason = "unknown field" if err.get("type") == "extra_forbidden" else err["msg"]
        parts.append(f"{loc}: {reason}")
    return "; ".join(parts) or "invalid request"


def parse(store: JobStore, msg: Message, rules: IntakeRules
          ) -> tuple[SubmitRequest, dict[str, Any], bool, str, str | None]:
    """Check a message: (request, params as stored, requires CUDA, owner, idempotency key).

    Raises :class:`Rejected`; the checks are the API's own (:func:`spotrun.service.queue.check`).
    """
    key = msg.attributes.get(IDEMPOTENCY_ATTRIBUTE)
    if key is not None:
        if not key or len(key) > MAX_KEY_LENGTH:
            raise Rejected(f"attribute {IDEMPOTENCY_ATTRIBUTE}: must be 1 to "
                           f"{MAX_KEY_LENGTH} characters")
        _checked_text(f"attributes.{IDEMPOTENCY_ATTRIBUTE}", key)
    owner = _owner(msg, rules)
    if len(msg.data) > MAX_BODY_BYTES:
        raise Rejected(f"the message is larger than the API's limit of {MAX_BODY_BYTES} "
                       "bytes")
    try:
        body = json.loads(msg.data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Rejected(f"the message is not JSON ({_first_line(exc)})") from None
    if not isinstance(body, dict):
        raise Rejected("the message must be a JSON object like "
                       '{"pipeline": "sleep", "params": {...}}')
    try:
        req = SubmitRequest.model_validate(body)
    except ValidationError as exc:
        raise Rejected(describe(exc)) from None
    try:
        # A message is JSON, as an API request is: its params are read on the same terms.
        params, cuda = queue.check(store, req.submission(strict_params=True), caller=None,
                                   allow_private_callbacks=rules.allow_private_callbacks)
    except (Invalid, UnknownPipeline) as exc:
        raise Rejected(_words(exc)) from None
    except (Forbidden, Refused) as exc:
        # The API answers these 403, 404 or 409 with the same line.
        raise Rejected(str(exc)) from None
    return req, params, cuda, owner, key


def submit(store: JobStore, msg: Message, rules: IntakeRules) -> Job:
    """Queue the job a message asks for, once, and return it (the one queued first).

    The idempotency key is the message's ``idempotency_key`` attribute, else its message
    id, so a redelivery and a republished request both find the job queued first. Returns
    only once the job and the record of its message are committed.
    """
    req, params, cuda, owner, key = parse(store, msg, rules)
    stored_key = key if key is not None else f"message:{msg.message_id}"
    try:
        job = queue.enqueue(store, req.submission(strict_params=True), params, cuda,
                            caller=None, owner=owner, idempotency_key=stored_key)
    except IdempotencyConflict as exc:
        raise Rejected(f"{IDEMPOTENCY_ATTRIBUTE} {stored_key!r} was used for a different "
                       f"job ({exc.job_id}); use a new key for a new job") from None
    except DatabaseUnavailable:
        raise
    except StoreError as exc:
        # The store refusing the request itself (e.g. over a quota) is for good.
        raise Rejected(str(exc.args[0]) if exc.args else str(exc)) from None
    store.intake.record(job.id, source=rules.source, message_id=msg.message_id,
                        idempotency_key=key)
    return job


def _owner(msg: Message, rules: IntakeRules) -> str:
    if rules.owner_attribute is None or rules.owner_attribute not in msg.attributes:
        return rules.owner
    name = msg.attributes[rules.owner_attribute]
    where = f"attribute {rules.owner_attribute}"
    if not name or len(name) > MAX_OWNER_LENGTH:
        raise Rejected(f"{where}: must be 1 to {MAX_OWNER_LENGTH} characters")
    _checked_text(f"attributes.{rules.owner_attribute}", name)
    if rules.allowed_owners and name not in rules.allowed_owners:
        raise Rejected(f"{where}: {name!r} is not an owner this intake accepts")
    return name


def _checked_text(field_: str, value: str) -> None:
    try:
        check_text(field_, value)
    except Invalid as exc:
        raise Rejected(exc.describe()) from None


def _words(exc: Invalid | UnknownPipeline) -> str:
    """The line the API's 422 answer would have as its detail."""
    if isinstance(exc, UnknownPipeline):
        return f"body.pipeline: {exc.args[0]}"
    return exc.describe("body.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
