"""API tokens and dashboard sessions: stored hashed, checked by the database clock.

Reached as ``store.tokens``. A token or session id is returned once, when made; only its
SHA-256 is stored.

The API checks a token on every request; :meth:`Tokens.verify` with ``cached=True``
answers from a short memory of recent good checks (``cache_seconds``: 2 s, or the
server's ``SPOTRUN_TOKEN_CACHE_SECONDS``; 0 for none). A revoke through this store
forgets them at once; one made by another process (``spotrun token revoke``) takes
effect here within that time. An expiry is never stretched: a token is remembered only
while its own expiry is still ahead.
"""

from __future__ import annotations

import secrets
import threading
import time

import sqlalchemy as sa

from spotrun.jobs import from_epoch
from spotrun.schema import api_tokens, web_sessions
from spotrun.store.core import StoreCore
from spotrun.store.errors import MapsDriverErrors, StoreError
from spotrun.store.records import Token, hash_token


class Tokens(MapsDriverErrors):
    """API tokens and the dashboard's sessions."""

    # Remembered good checks at most: a flood of distinct tokens cannot grow it further.
    _CACHE_MAX = 4096

    def __init__(self, store: StoreCore) -> None:
        self._s = store
        self.cache_seconds = 2.0  # the API sets it from SPOTRUN_TOKEN_CACHE_SECONDS
        # token hash -> (its record, monotonic time until which it may be answered from here)
        self._known: dict[str, tuple[Token, float]] = {}
        self._known_lock = threading.Lock()

    def forget_checks(self) -> None:
        """Forget every remembered check: the next ``verify`` asks the database."""
        with self._known_lock:
            self._known.clear()

    def create(self, name: str, *, admin: bool = False,
               expires_in: float | None = None) -> str:
        """Create an API token; only its hash is stored, the token is returned once.

        With ``expires_in`` (seconds) it stops working then, by the database clock.
        """
        token = "spr_" + secrets.token_urlsafe(32)
        with self._s._tx() as conn:
            if conn.execute(sa.select(api_tokens.c.name).where(api_tokens.c.name == name)
                            ).first() is not None:
                raise StoreError(f"a token named {name!r} exists already")
            conn.execute(api_tokens.insert().values(
                name=name, token_hash=hash_token(token), is_admin=admin, created_at=self._s._now,
                expires_at=None if expires_in is None else self._s._now + expires_in))
        return token

    def extend(self, name: str, expires_in: float) -> None:
        """Move an active token's expiry to ``expires_in`` seconds from now."""
        with self._s._tx() as conn:
            n = conn.execute(api_tokens.update().where(
                api_tokens.c.name == name, api_tokens.c.revoked_at.is_(None)
            ).values(expires_at=self._s._now + expires_in)).rowcount
            if n != 1:
                raise StoreError(f"no active token named {name!r}")
        self.forget_checks()  # the expiry may have moved closer

    def list(self) -> list[Token]:
        with self._s._tx(write=False) as conn:
            rows = conn.execute(sa.select(api_tokens).order_by(api_tokens.c.name)).mappings()
            return [Token(r["name"], bool(r["is_admin"]), from_epoch(r["created_at"]),
                          r["revoked_at"] is not None,
                          None if r["expires_at"] is None else from_epoch(r["expires_at"]))
                    for r in rows]

    def revoke(self, name: str) -> None:
        with self._s._tx() as conn:
            n = conn.execute(api_tokens.update().where(
                api_tokens.c.name == name, api_tokens.c.revoked_at.is_(None)
            ).values(revoked_at=self._s._now)).rowcount
            if n != 1:
                raise StoreError(f"no active token named {name!r}")
        self.forget_checks()

    def verify(self, token: str, *, cached: bool = False) -> Token | None:
        """The token's record if it is known, not revoked and not expired; else None.

        With ``cached``, a good answer of the last ``cache_seconds`` may be given again
        without asking the database (never past the token's expiry); bad tokens are
        always looked up.
        """
        key = hash_token(token)
        if cached and self.cache_seconds > 0:
            hit = self._known.get(key)
            if hit is not None and time.monotonic() < hit[1]:
                return hit[0]
        with self._s._tx(write=False) as conn:
            r = conn.execute(sa.select(api_tokens.c.name, api_tokens.c.is_admin,
                                       api_tokens.c.created_at, api_tokens.c.expires_at,
                                       (api_tokens.c.expires_at - self._s._now).label("left"))
                             .where(api_tokens.c.token_hash == key,
                                    api_tokens.c.revoked_at.is_(None),
                                    sa.or_(api_tokens.c.expires_at.is_(None),
                                           api_tokens.c.expires_at > self._s._now),
                                    )).mappings().first()
        if r is None:
            return None
        found = Token(r["name"], bool(r["is_admin"]), from_epoch(r["created_at"]), False,
                      None if r["expires_at"] is None else from_epoch(r["expires_at"]))
        if cached and self.cache_seconds > 0:
            # Judged by the database clock, as the check itself is.
            keep = self.cache_seconds if r["left"] is None else min(self.cache_seconds,
                                                                    float(r["left"]))
            with self._known_lock:
                if len(self._known) >= self._CACHE_MAX:
                    self._known.clear()
                self._known[key] = (found, time.monotonic() + keep)
        return found

    def create_session(self, token_name: str, *, expires_in: float) -> str:
        """Start a dashboard session for an active token; return its id (once)."""
        sid = "sps_" + secrets.token_urlsafe(32)
        with self._s._tx() as conn:
            # Ended sessions are of no use to anyone: clear them out as new ones come.
            conn.execute(web_sessions.delete().where(web_sessions.c.expires_at < self._s._now))
            conn.execute(web_sessions.insert().values(
                id_hash=hash_token(sid), token_name=token_name, created_at=self._s._now,
                expires_at=self._s._now + expires_in))
        return sid

    def verify_session(self, session_id: str) -> Token | None:
        """The token a live session signed in with; None once the session or the token
        is expired or revoked."""
        query = (sa.select(api_tokens).join(web_sessions,
                                            web_sessions.c.token_name == api_tokens.c.name)
                 .where(web_sessions.c.id_hash == hash_token(session_id),
                        web_sessions.c.revoked_at.is_(None),
                        web_sessions.c.expires_at > self._s._now,
                        api_tokens.c.revoked_at.is_(None),
                        sa.or_(api_tokens.c.expires_at.is_(None),
                               api_tokens.c.expires_at > self._s._now)))
        with self._s._tx(write=False) as conn:
            r = conn.execute(query).mappings().first()
        if r is None:
            return None
        return Token(r["name"], bool(r["is_admin"]), from_epoch(r["created_at"]), False,
                     None if r["expires_at"] is None else from_epoch(r["expires_at"]))

    def revoke_session(self, session_id: str) -> None:
        """End a session (sign-out); unknown or ended sessions are left as they are."""
        with self._s._tx() as conn:
            conn.execute(web_sessions.update().where(
                web_sessions.c.id_hash == hash_token(session_id),
                web_sessions.c.revoked_at.is_(None)).values(revoked_at=self._s._now))

