"""Database calls that ride out an outage: which errors are the database's, and a retrier."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy as sa

log = logging.getLogger("spotrun.worker")

T = TypeVar("T")


def is_db_error(exc: BaseException) -> bool:
    """Whether ``exc`` means the database is out of reach (worth a retry), not a bug."""
    return isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError) or (
        isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated)


class Retrier:
    """Retries database calls with backoff, logging an outage once and its end once."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.down_since: float | None = None

    def call(self, fn: Callable[[], T], *, give_up_at: float | None = None) -> T:
        """``fn()``, retried while the database is out of reach, at most until
        ``give_up_at`` (monotonic); any other error is raised at once."""
        delay = 0.1
        while True:
            try:
                value = fn()
            except Exception as exc:
                if not is_db_error(exc):
                    raise
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    log.warning("%s: database unreachable (%s); retrying with backoff",
                                self.what, str(exc).splitlines()[0][:200])
                if give_up_at is not None and time.monotonic() + delay > give_up_at:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self.down_since is not None:
                log.warning("%s: database reachable again after %.1f s", self.what,
                            time.monotonic() - self.down_since)
                self.down_since = None
            return value
