"""The job store: the only code that speaks SQL.

One interface, :class:`JobStore` (:mod:`.base`), with a store per dialect:
:mod:`.postgres` (hand-written one-statement claim and result, LISTEN/NOTIFY) and
:mod:`.sqlite` (``BEGIN IMMEDIATE`` transactions, the fair-share pick, ``data_version``).
``JobStore.open(url)`` gives the URL's one. Where things are:

- :mod:`.connect`: the URL to an engine or a psycopg connection, the only place that
  opens connections;
- :mod:`.leases`: a lease holder's fenced writes (the heartbeat that renews the lease,
  progress, checkpoints, hand-back, result) and the sweep of lapsed leases;
- :mod:`.claim_event`: the claim's event, worded once for both dialects;
- :mod:`.tokens`, :mod:`.callbacks`, :mod:`.intake`, :mod:`.analytics`: the store's
  other nouns, reached as ``store.tokens`` and so on;
- :mod:`.errors`: what the store raises; no SQLAlchemy or psycopg error leaves it.
"""

from __future__ import annotations

from spotrun.store.analytics import Analytics
from spotrun.store.base import JobStore, Waker
from spotrun.store.callbacks import CallbackRecords
from spotrun.store.connect import (
    IDLE_IN_TRANSACTION_MS,
    PG_CONNECT_TIMEOUT,
    PG_KEEPALIVES,
    create_engine,
    normalize_url,
    password_of,
    redact,
    sqlite_file,
)
from spotrun.store.errors import (
    BadDatabaseURL,
    Conflict,
    DatabaseError,
    DatabaseSlow,
    DatabaseUnavailable,
    JobNotFound,
    KeyReused,
    LeaseLost,
    StoreError,
)
from spotrun.store.intake import IntakeRecords
from spotrun.store.postgres import CLAIM_SQL, PostgresStore, worker_channel
from spotrun.store.records import (
    MAX_METRIC_POINTS,
    Beat,
    BeatResult,
    ClaimRequest,
    IntakeEvent,
    JobRecord,
    Lease,
    NewJob,
    Token,
    dumps,
    hash_token,
    loads,
    new_id,
)
from spotrun.store.sqlite import SqliteStore
from spotrun.store.tokens import Tokens

__all__ = [
    "CLAIM_SQL", "IDLE_IN_TRANSACTION_MS", "MAX_METRIC_POINTS",
    "PG_CONNECT_TIMEOUT", "PG_KEEPALIVES", "Analytics", "BadDatabaseURL", "Beat", "BeatResult",
    "CallbackRecords",
    "ClaimRequest", "Conflict", "DatabaseError", "DatabaseSlow", "DatabaseUnavailable",
    "IntakeEvent", "IntakeRecords", "JobNotFound", "JobRecord", "JobStore", "KeyReused",
    "Lease", "LeaseLost", "NewJob", "PostgresStore", "SqliteStore", "StoreError", "Token",
    "Tokens", "Waker", "create_engine", "dumps", "hash_token", "loads", "new_id",
    "normalize_url", "password_of", "redact", "sqlite_file", "worker_channel",
]
