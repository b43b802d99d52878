"""Alembic migrations, run programmatically on an open connection."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from sqlalchemy.engine import Connection

_HERE = Path(__file__).parent


def _config(conn: Connection | None = None) -> object:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE))
    if conn is not None:
        cfg.attributes["connection"] = conn
    return cfg


@cache
def head_revision() -> str:
    """The newest revision, read from the version files without importing Alembic."""
    revisions: set[str] = set()
    downs: set[str] = set()
    for path in (_HERE / "versions").glob("*.py"):
        for line in path.read_text().splitlines():
            if line.startswith("revision = "):
                revisions.add(line.split("=", 1)[1].strip().strip("'\""))
            elif line.startswith("down_revision = "):
                downs.add(line.split("=", 1)[1].strip().strip("'\""))
    heads = revisions - downs
    if len(heads) != 1:
        raise RuntimeError(f"migrations must have exactly one head, found {sorted(heads)}")
    return heads.pop()


def upgrade(conn: Connection, revision: str = "head") -> None:
    """Upgrade the schema on ``conn`` (the caller holds the migration lock)."""
    from alembic import command

    command.upgrade(_config(conn), revision)  # type: ignore[arg-type]
