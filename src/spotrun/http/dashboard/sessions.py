"""The dashboard's sign-in, as the browser sees it: the session cookie and the form guard.

The API token is checked once at sign-in (:func:`spotrun.service.auth.sign_in`); the
browser then holds only the session id, in an HttpOnly, SameSite=Strict cookie,
``__Host-`` prefixed and Secure over HTTPS. Every form POST must show, by
``Sec-Fetch-Site`` or ``Origin``, that it comes from this origin.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from fastapi import Request
from fastapi.responses import Response

from spotrun.http.auth import SECURE_SESSION_COOKIE, SESSION_COOKIE, session_id_of
from spotrun.service.auth import Principal, principal_for_session
from spotrun.store import JobStore


def viewer(store: JobStore, request: Request) -> Principal | None:
    """Who the request's session cookie signs in; None without a live session."""
    return principal_for_session(store, session_id_of(request))


def same_origin(request: Request) -> bool:
    """Whether a form POST comes from this origin."""
    # SameSite=Strict already keeps the cookie off cross-site requests; this guards
    # the forms (login included) in browsers that ignore it. A request that shows
    # neither header is refused: every browser of the last years sends one of them.
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    origin = request.headers.get("origin")
    return origin is not None and origin == f"{request.url.scheme}://{request.url.netloc}"


async def form_of(request: Request) -> dict[str, str]:
    """The fields of a form POST (the last value of a repeated one)."""
    body = (await request.body()).decode("utf-8", errors="replace")
    return {k: v[-1] for k, v in parse_qs(body, keep_blank_values=True).items()}


def set_session_cookie(response: Response, request: Request, session_id: str,
                       seconds: float) -> None:
    # request.url.scheme is https behind a TLS-terminating proxy only when the proxy
    # is one the operator trusts (SPOTRUN_TRUSTED_PROXIES, given to uvicorn).
    secure = request.url.scheme == "https"
    response.set_cookie(SECURE_SESSION_COOKIE if secure else SESSION_COOKIE,
                        session_id, httponly=True, samesite="strict", secure=secure,
                        path="/", max_age=int(seconds))


def clear_session_cookies(response: Response) -> None:
    for name in (SESSION_COOKIE, SECURE_SESSION_COOKIE):
        response.delete_cookie(name, path="/", httponly=True, samesite="strict",
                               secure=name.startswith("__Host-"))
