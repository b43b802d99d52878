"""What the API's routes and the dashboard's pages share: the store, the feed, the settings."""

from __future__ import annotations

from dataclasses import dataclass

from spotrun.config import Settings
from spotrun.http.callbacks import CallbackDeliverer
from spotrun.http.feed import ChangeFeed
from spotrun.store import JobStore


@dataclass
class AppContext:
    """What the routes share: the store, the live feed, the settings."""

    settings: Settings
    store: JobStore
    feed: ChangeFeed
    allow_private_callbacks: bool
    deliverer: CallbackDeliverer | None = None
    # A live stream re-checks its token this often, and one principal may hold this many
    # streams on one server process (SPOTRUN_STREAM_RECHECK_SECONDS, SPOTRUN_MAX_STREAMS).
    stream_recheck_seconds: float = 15.0
    max_streams_per_principal: int = 20
    # How long a dashboard sign-in lasts (SPOTRUN_SESSION_SECONDS).
    session_seconds: float = 12 * 3600.0
