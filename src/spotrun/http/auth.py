"""How an HTTP request proves who it is: a bearer token, or the dashboard's session cookie.

The checks themselves are the service's (:mod:`spotrun.service.auth`); this module reads
the credential off the request. The session cookie holds a session id, never an API
token; over HTTPS it carries the ``__Host-`` prefix (Secure, Path=/, no Domain: no
subdomain can set or shadow it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from spotrun.http.errors import unauthorized
from spotrun.service.auth import Principal, principal_for_session, principal_for_token
from spotrun.store import JobStore

SESSION_COOKIE = "spotrun_session"
SECURE_SESSION_COOKIE = "__Host-spotrun_session"

_bearer = HTTPBearer(auto_error=False, description="an API token from `spotrun token create`")


def session_id_of(request: Request) -> str | None:
    """The dashboard session id the request's cookie carries, if any."""
    return request.cookies.get(SECURE_SESSION_COOKIE) or request.cookies.get(SESSION_COOKIE)


def header_token(request: Request) -> str | None:
    """The bearer token of the ``Authorization`` header, if any."""
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


@dataclass(frozen=True)
class Credential:
    """How a request proved who it is: a bearer token, or a dashboard session."""

    value: str
    is_session: bool

    def principal(self, store: JobStore) -> Principal | None:
        if self.is_session:
            return principal_for_session(store, self.value)
        return principal_for_token(store, self.value)


def credential_of(request: Request) -> Credential | None:
    token = header_token(request)
    if token:
        return Credential(token, False)
    # The dashboard's session cookie is accepted for reads only (EventSource cannot send
    # headers); writes need the header, so a cross-site form can never act with it.
    session = session_id_of(request) if request.method in ("GET", "HEAD") else None
    return Credential(session, True) if session else None


def _caller(request: Request,
            creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
            ) -> Principal:
    cred = (Credential(creds.credentials, False) if creds is not None
            else credential_of(request))
    if cred is None:
        raise unauthorized("missing token: send `Authorization: Bearer TOKEN`")
    who = cred.principal(request.app.state.ctx.store)
    if who is None:
        raise unauthorized("invalid, expired or revoked token" if not cred.is_session
                           else "the session ended: sign in again")
    return who


# Module level, so that FastAPI can resolve it from the routes' (string) annotations.
Caller = Annotated[Principal, Depends(_caller)]
