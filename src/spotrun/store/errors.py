"""The store's errors: what its callers catch, instead of the database driver's.

Every public method of the store raises these and no SQLAlchemy or psycopg error:
:func:`maps_driver_errors` turns a driver error into one of them where it leaves the store.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa

F = TypeVar("F", bound=Callable[..., Any])


class StoreError(Exception):
    """The store cannot do what was asked; the message is for the user."""


class BadDatabaseURL(StoreError):
    """The database URL is not one spotrun can use."""


class DatabaseError(StoreError):
    """The database refused or failed a call (the driver's first line is the message)."""


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached, or dropped the connection, or ran out of time:
    a call that a retrier may repeat."""


class DatabaseSlow(StoreError):
    """A call took so long that the database, not its callers, was the one late."""


class Conflict(DatabaseError):
    """A write collided with another one's (a unique key taken at the same moment)."""


class JobNotFound(StoreError):
    pass


class KeyReused(StoreError):
    """An idempotency key already names a different job of its owner (another pipeline or
    other params): nothing was queued. ``index`` is the item of the batch that carries it
    (0 for a single submit), ``job_id`` the job the key names."""

    def __init__(self, index: int, job_id: str) -> None:
        super().__init__(f"the idempotency key of item {index} names a different job "
                         f"({job_id})")
        self.index = index
        self.job_id = job_id


class LeaseLost(StoreError):
    """A fenced write was refused: this attempt no longer holds the job's lease.

    What was refused is data: ``write`` (the kind of write: ``progress``, ``event``,
    ``checkpoint pointer``, ``hand-back``, ``heartbeat``, ``<state> result``), the job and
    the attempt that asked; the message says it in words.
    """

    def __init__(self, message: str, *, write: str, job_id: str, attempt: int) -> None:
        super().__init__(message)
        self.write = write
        self.job_id = job_id
        self.attempt = attempt


def first_line(exc: BaseException) -> str:
    """The first line of the driver's message (no SQL, no parameters)."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__


def is_transient(exc: BaseException) -> bool:
    """Whether a driver error is one a retry may get past: a connection refused, dropped
    or timed out, not a statement the database rejects."""
    return isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError) or (
        isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated)


# A prepared statement missing or already there: the connection's statements went to
# another server session, which only a transaction pooler does.
_POOLER_SQLSTATES = ("26000", "42P05")
_UNDECLARED_POOLER = (
    "the database lost this connection's prepared statements between two statements, as "
    "a transaction pooler (PgBouncer's pool_mode = transaction) does: add "
    "?spotrun_pooler=transaction to the database URL or set "
    "SPOTRUN_DATABASE_POOLER=transaction")


def translate(exc: sa.exc.SQLAlchemyError) -> DatabaseError:
    """The store's error for a driver error."""
    if getattr(getattr(exc, "orig", None), "sqlstate", None) in _POOLER_SQLSTATES:
        return DatabaseError(_UNDECLARED_POOLER)
    if isinstance(exc, sa.exc.IntegrityError):
        return Conflict(first_line(exc))
    if is_transient(exc):
        return DatabaseUnavailable(first_line(exc))
    return DatabaseError(first_line(exc))


def _mapped(fn: F) -> F:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except sa.exc.SQLAlchemyError as exc:
            raise translate(exc) from exc

    call.__wrapped_driver_errors__ = True  # type: ignore[attr-defined]
    return call  # type: ignore[return-value]


class MapsDriverErrors:
    """Base of the store's classes: each public method (one not named with ``_``) of a
    subclass raises the store's errors instead of the driver's.

    Inside the store the driver's errors stay as they are, so that its own handling
    (a claim unsure whether it committed, a sweep that could not take its locks) sees them.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, value in list(vars(cls).items()):
            if name.startswith("_") or not inspect.isfunction(value):
                continue
            if getattr(value, "__wrapped_driver_errors__", False):
                continue
            setattr(cls, name, _mapped(value))
