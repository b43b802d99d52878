"""From a database URL to connections: the one place that opens them.

Every connection the store opens comes from the engine :func:`create_engine` builds, the
PostgreSQL hot path's and the LISTEN wake-up's too (:func:`pg_connection`), so each one
has what the URL asks (its query string: ``sslmode``, a socket ``host=``,
``application_name``) and the timeouts and keepalives below.

Behind a transaction pooler (PgBouncer's ``pool_mode = transaction``, which Cloud SQL and
RDS users run; say so with ``?spotrun_pooler=transaction`` on the URL or
``SPOTRUN_DATABASE_POOLER=transaction``) a session's settings would stay on whichever
server connection ran them: the bounds are then set in each transaction instead
(:func:`pg_bounds`), no statement is prepared on the server (directly connected the hot
path's are), and LISTEN needs a direct URL (``SPOTRUN_LISTEN_URL``) or the idle worker
polls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection, Engine, make_url

from spotrun.store.errors import BadDatabaseURL, StoreError

if TYPE_CHECKING:
    import psycopg

# PostgreSQL ends a session left idle inside a transaction this long (see create_engine).
IDLE_IN_TRANSACTION_MS = 10_000
# TCP keepalives and a user timeout: a connection whose peer vanished without a reset (a
# partitioned network, a failed-over address) is found dead in about half a minute, idle or
# not, instead of after the kernel's two hours.
PG_KEEPALIVES: dict[str, Any] = {
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
    "tcp_user_timeout": 20_000}
PG_CONNECT_TIMEOUT = 5
# The URL's query option (and the variable) that says a transaction pooler is in between.
POOLER_OPTION = "spotrun_pooler"
POOLER_ENV = "SPOTRUN_DATABASE_POOLER"
# A direct URL (past the pooler) for the idle worker's LISTEN.
LISTEN_URL_ENV = "SPOTRUN_LISTEN_URL"

_BAD_URL = ("the database URL is not one spotrun can use: give sqlite:///PATH "
            "or postgresql://USER@HOST/DB")


def normalize_url(url: str) -> str:
    """Accept plain ``postgresql://`` URLs and use psycopg 3 for them."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def redact(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


def password_of(url: str) -> str | None:
    """The URL's password (to scrub it from text a tool printed), None if it has none."""
    try:
        return make_url(url).password
    except Exception:
        return None


def sqlite_file(url: str) -> str | None:
    """The file a SQLite URL names; None for an in-memory one, another database, or a URL
    that does not parse (opening it says why)."""
    try:
        u = make_url(normalize_url(url))
    except Exception:
        return None
    if u.get_backend_name() != "sqlite" or u.database in (None, "", ":memory:"):
        return None
    return u.database


def _create_private(path: Path) -> None:
    """Create ``path`` empty, readable by its owner only, unless it exists."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def create_engine(url: str, *, pool_size: int = 5, pre_ping: bool = True,
                  statement_timeout: float | None = None) -> Engine:
    """An engine tuned for the queue: WAL and a busy timeout on SQLite; on PostgreSQL a
    ping of connections that sat idle (``pre_ping``, see :func:`_ping_when_idle`).

    On PostgreSQL every connection has a connect timeout and TCP keepalives, and with
    ``statement_timeout`` (seconds) a bound on each statement and each lock wait.
    """
    try:
        u = make_url(url)
    except sa.exc.ArgumentError:
        raise BadDatabaseURL(_BAD_URL) from None
    if u.get_backend_name() == "sqlite":
        return _sqlite_engine(u, pool_size=pool_size)
    if u.get_backend_name() == "postgresql":
        return _pg_engine(u, pool_size=pool_size, pre_ping=pre_ping,
                          statement_timeout=statement_timeout)
    raise BadDatabaseURL(
        f"unsupported database URL {redact(url)}: use sqlite:///PATH or postgresql://..."
    )


def _sqlite_engine(u: sa.URL, *, pool_size: int) -> Engine:
    if u.database and u.database != ":memory:":
        try:
            # Jobs, params, results and token hashes are the user's alone: a directory
            # spotrun makes is private, and so is a database file it creates (SQLite
            # gives its -wal and -shm files the database's permissions).
            Path(u.database).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _create_private(Path(u.database))
        except OSError as exc:
            raise StoreError(f"cannot create the database {u.database}: "
                             f"{exc.strerror or exc}") from None
    try:
        engine = sa.create_engine(
            u, connect_args={"timeout": 30.0, "check_same_thread": False},
            pool_size=pool_size, max_overflow=10,
        )
    except sa.exc.ArgumentError:
        raise BadDatabaseURL(_BAD_URL) from None

    @sa_event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's begin event, not the driver, decide how transactions begin.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @sa_event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get("sqlite_begin", "BEGIN"))

    return engine


@dataclasses.dataclass
class PgBounds:
    """The server-side bounds of an engine's connections, and where they are set.

    Directly connected, they are session settings, set once at connect; behind a
    transaction pooler (``pooled``) each transaction sets them (:meth:`set_local_sql`),
    the hot path's and the engine's alike. ``lock_ms`` may tighten later (a stop path).
    """

    pooled: bool
    statement_ms: int | None
    lock_ms: int | None

    def set_local_sql(self) -> str:
        """One statement that sets the bounds for the rest of its transaction only."""
        # A worker frozen inside a transaction (SIGSTOP, a paused VM) would hold its
        # job's row lock, and no sweep could requeue the job until it thawed: the
        # server ends such a transaction instead. spotrun's transactions hold SQL only.
        sets = [("idle_in_transaction_session_timeout", IDLE_IN_TRANSACTION_MS),
                ("statement_timeout", self.statement_ms), ("lock_timeout", self.lock_ms)]
        return "SELECT " + ", ".join(f"set_config('{name}', '{ms}', true)"
                                     for name, ms in sets if ms is not None)


_bounds: weakref.WeakKeyDictionary[Engine, PgBounds] = weakref.WeakKeyDictionary()


def pg_bounds(engine: Engine) -> PgBounds:
    """The bounds of a PostgreSQL engine :func:`create_engine` made (none, and direct,
    for an engine made elsewhere)."""
    bounds = _bounds.get(engine)
    if bounds is None:
        bounds = _bounds[engine] = PgBounds(False, None, None)
    return bounds


def _pooler(u: sa.URL) -> bool:
    value = u.query.get(POOLER_OPTION, os.environ.get(POOLER_ENV, ""))
    value = (value[-1] if isinstance(value, tuple) else value).strip().lower()
    if value not in ("", "none", "transaction"):
        raise BadDatabaseURL(f"{POOLER_OPTION}={value} is not a pooler spotrun knows: "
                             "give transaction (PgBouncer's transaction mode) or none")
    return value == "transaction"


def listen_url() -> str | None:
    """The direct URL an idle worker LISTENs on, if one is set (``SPOTRUN_LISTEN_URL``)."""
    return os.environ.get(LISTEN_URL_ENV) or None


# psycopg's threshold for preparing a statement by itself, set out of reach: directly
# connected, only the hot path's statements are prepared, at their first use
# (PostgresStore._pg_one asks for it), because planning them was most of the server's
# work (the submit's statement: 1.6 ms a call unprepared, 0.65 ms prepared). Behind a
# transaction pooler nothing is prepared (None): the pooler may send the next execute
# to another server connection (PgBouncer 1.18 does not track them).
PREPARE_ONLY_WHEN_ASKED = 2**31 - 1


def _pg_engine(u: sa.URL, *, pool_size: int, pre_ping: bool,
               statement_timeout: float | None) -> Engine:
    pooled = _pooler(u)
    try:
        engine = sa.create_engine(
            u, pool_size=pool_size, max_overflow=10,
            connect_args={"connect_timeout": PG_CONNECT_TIMEOUT,
                          "prepare_threshold": None if pooled else PREPARE_ONLY_WHEN_ASKED,
                          **PG_KEEPALIVES},
        )
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError):
        raise BadDatabaseURL(_BAD_URL) from None
    bound_ms = None if statement_timeout is None else max(1, int(statement_timeout * 1000))
    bounds = _bounds[engine] = PgBounds(pooled, bound_ms, bound_ms)

    @sa_event.listens_for(engine, "do_connect")
    def _strip_option(_dialect: Any, _record: Any, _cargs: Any,
                      cparams: dict[str, Any]) -> None:
        cparams.pop(POOLER_OPTION, None)  # spotrun's, not libpq's

    if pre_ping:
        _ping_when_idle(engine)

    if pooled:
        @sa_event.listens_for(engine, "begin")
        def _on_pg_begin(conn: Connection) -> None:
            conn.exec_driver_sql(bounds.set_local_sql())

        return engine

    @sa_event.listens_for(engine, "connect")
    def _on_pg_connect(dbapi_conn: Any, _record: Any) -> None:
        # Set once for the session: the same bounds set_local_sql gives a transaction
        # (a statement or lock wait longer than a lease is an outage to its caller).
        autocommit = dbapi_conn.autocommit
        dbapi_conn.autocommit = True
        dbapi_conn.execute(
            f"SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_MS}")
        if bound_ms is not None:
            dbapi_conn.execute(f"SET statement_timeout = {bound_ms}")
            dbapi_conn.execute(f"SET lock_timeout = {bound_ms}")
        dbapi_conn.autocommit = autocommit

    return engine


# A connection back in the pool for less than this is handed out again unpinged.
PING_AFTER_IDLE_SECONDS = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """Ping a connection on checkout when it has sat in the pool a while.

    SQLAlchemy's ``pool_pre_ping`` pings on every checkout: a round trip per call, which
    was 45 % of a producer's loop of submits. A connection that died (a restart, a
    failover) has almost always sat idle first; one that dies within the second after its
    last use fails its next statement, and the store's retriers and callers see that as
    any other outage.
    """
    import psycopg

    @sa_event.listens_for(engine, "connect")
    @sa_event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info["spotrun_back_at"] = time.monotonic()

    @sa_event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        back_at = record.info.get("spotrun_back_at")
        if back_at is not None and time.monotonic() - back_at < PING_AFTER_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except psycopg.Error:
            # The pool drops this connection and checks out another (SQLAlchemy's
            # protocol for a checkout listener).
            raise sa.exc.DisconnectionError() from None


def _checkout(engine: Engine) -> Any:
    """A connection of the engine's pool (SQLAlchemy's proxy of the driver's)."""
    import psycopg

    try:
        return engine.raw_connection()
    except psycopg.Error as exc:
        # A refused or timed-out connect (a restart, a failover) must reach the caller
        # as the store's other errors do, or its retrier cannot know it.
        raise sa.exc.DBAPIError.instance(
            "connect", None, exc, psycopg.Error, hide_parameters=True,
            connection_invalidated=True) from exc


@contextlib.contextmanager
def pg_checkout(engine: Engine) -> Iterator[psycopg.Connection[Any]]:
    """A psycopg connection of the engine's pool, in autocommit until it goes back.

    For statements that are their own transaction (the store's hot path), sent without
    SQLAlchemy's per-call work but on the pool's connections, so that a worker holds no
    connection beyond its pool. A connection found broken is dropped with every other
    connection of the pool (after a restart or a failover they are all dead, and a pool
    without a ping on checkout would fail once for each); a refused connect raises
    SQLAlchemy's error, as a pooled connect would.
    """
    import psycopg

    fairy = _checkout(engine)
    pg = fairy.driver_connection
    assert pg is not None
    try:
        pg.autocommit = True
        yield pg
    finally:
        usable = not (pg.closed or pg.broken)
        if usable:
            try:
                pg.autocommit = False  # the pool's other users expect transactions
            except psycopg.Error:
                usable = False  # left inside a transaction: not fit to hand on
        if not usable:
            fairy.invalidate()
        fairy.close()  # back to the pool (or, invalidated, closed)
        if not usable:
            engine.dispose()  # the others' turn comes as they go back


def pg_connection(engine: Engine) -> psycopg.Connection[Any]:
    """A psycopg connection of the engine's own, in autocommit, out of its pool.

    Opened as the engine opens its pooled ones (the URL with its query string, the
    timeouts, the session settings), then detached: the caller owns and closes it.
    A refused connect raises SQLAlchemy's error, as a pooled connect would.
    """
    fairy = _checkout(engine)
    pg = fairy.driver_connection
    assert pg is not None
    fairy.detach()  # ours until closed: out of the pool's size and its resets
    pg.autocommit = True
    return pg  # type: ignore[no-any-return]
