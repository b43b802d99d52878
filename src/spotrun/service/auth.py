"""Who is calling and what they may see: API tokens, dashboard sessions, admin checks.

A user sees and acts on only the jobs they submitted; an admin on all. A job of someone
else is answered exactly like a job that does not exist (None here, 404 over HTTP).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from spotrun.jobs import Job
from spotrun.service.submission import Forbidden
from spotrun.store import JobNotFound, JobStore

JOB_ID_RE = re.compile(r"^[0-9A-Za-z_-]{1,32}$")
MAX_CREDENTIAL_LENGTH = 512


@dataclass(frozen=True)
class Principal:
    """Who is calling: the name of their token, and whether it is an admin's."""

    name: str
    is_admin: bool

    def can_see(self, job: Job) -> bool:
        return self.is_admin or job.owner == self.name

    @property
    def owner_filter(self) -> str | None:
        """The owner to filter the store's reads by: None (every job) for an admin."""
        return None if self.is_admin else self.name


def principal_for_token(store: JobStore, token: str | None) -> Principal | None:
    """The principal of an API token; None for a missing, unknown, expired or revoked one."""
    if not token or len(token) > MAX_CREDENTIAL_LENGTH:
        return None
    found = store.tokens.verify(token, cached=True)
    return None if found is None else Principal(found.name, found.is_admin)


def principal_for_session(store: JobStore, session_id: str | None) -> Principal | None:
    """The principal of a live dashboard session; None once it or its token ended."""
    if not session_id or len(session_id) > MAX_CREDENTIAL_LENGTH:
        return None
    found = store.tokens.verify_session(session_id)
    return None if found is None else Principal(found.name, found.is_admin)


def require_admin(who: Principal, refusal: str) -> None:
    """Raise :class:`Forbidden` with ``refusal`` unless ``who`` is an admin."""
    if not who.is_admin:
        raise Forbidden(refusal)


def visible_job(store: JobStore, job_id: str, who: Principal, *,
                with_events: bool = True) -> Job | None:
    """The job if ``who`` may see it; None for one that does not exist or is not theirs."""
    if not JOB_ID_RE.match(job_id):
        return None
    try:
        job = store.get(job_id, with_events=with_events)
    except JobNotFound:
        return None
    return job if who.can_see(job) else None


def sign_in(store: JobStore, token: str, *, seconds: float) -> tuple[Principal, str] | None:
    """A dashboard session for a valid API token: (who, session id); None for a bad token.

    The session lasts ``seconds`` and ends with its token (revoked or expired).
    """
    who = principal_for_token(store, token)
    if who is None:
        return None
    return who, store.tokens.create_session(who.name, expires_in=seconds)


def sign_out(store: JobStore, session_id: str) -> None:
    """End a dashboard session (a copied cookie dies too)."""
    store.tokens.revoke_session(session_id)
