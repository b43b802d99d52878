"""The migrations build exactly the schema the code declares, safely when many start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from spotrun import migrations
from spotrun.schema import metadata
from spotrun.store import JobStore, normalize_url


def test_migrations_and_metadata_agree(db_url: str) -> None:
    engine = sa.create_engine(normalize_url(db_url))
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, metadata)
        version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    engine.dispose()
    assert diff == []
    assert version == migrations.head_revision()


def _open_from_six_processes_at_once(url: str) -> None:
    code = ("import sys; from spotrun.store import JobStore; "
            "JobStore.open(sys.argv[1]).submit('sleep', {'seconds': 0})")
    procs = [subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE)
             for _ in range(6)]
    errors = [p.communicate(timeout=60)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, errors
    store = JobStore.open(url)
    assert len(store.list_jobs()) == 6
    store.close()


def test_many_processes_opening_a_new_database_at_once(tmp_path: Path) -> None:
    _open_from_six_processes_at_once(f"sqlite:///{tmp_path / 'fresh.db'}")


def test_many_processes_migrating_postgres_at_once(pg_url: str) -> None:
    # Start from an empty database: drop what the template gave us.
    engine = sa.create_engine(normalize_url(pg_url))
    with engine.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    _open_from_six_processes_at_once(pg_url)


def test_a_running_store_keeps_working_when_a_newer_release_adds_a_column(
        pg_url: str) -> None:
    # The hot path's statements are prepared on their connections, and some answer
    # jobs.*: a column that a newer release's migration adds under a running worker (a
    # rolling upgrade) changes their answer's shape, which PostgreSQL refuses for a
    # prepared statement until it is prepared again.
    store = JobStore.open(pg_url, pool_size=1)
    try:
        first = store.submit("sleep", {"seconds": 0})
        assert store.get(first.id).id == first.id
        engine = sa.create_engine(normalize_url(pg_url))
        with engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN added_later integer"))
        engine.dispose()
        second = store.submit("sleep", {"seconds": 1})
        assert store.get(second.id).params == {"seconds": 1}
        assert [j.id for j in store.list_jobs()] == [second.id, first.id]
    finally:
        store.close()
