"""The HTTP API and the dashboard in one FastAPI app, documented at ``/openapi.json``.

Everything under ``/v1`` needs a bearer token (see ``spotrun token create``); a user sees
and cancels only the jobs they submitted, an admin sees all. A job of someone else
answers 404, exactly like a job that does not exist. Client mistakes answer 4xx with a
one-line ``detail`` (and, for 422, the fields at fault); they never answer 5xx.

The app's lifespan runs the live feed (:mod:`spotrun.http.feed`) and the callback
deliverer (:mod:`spotrun.http.callbacks`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio.to_thread
from fastapi import Depends, FastAPI

from spotrun.config import Settings, env_float
from spotrun.http import callbacks, routes, schemas
from spotrun.http.context import AppContext
from spotrun.http.dashboard import apidocs, pages
from spotrun.http.errors import install_error_handlers
from spotrun.http.feed import ChangeFeed
from spotrun.http.limits import BodyLimit
from spotrun.http.responses import StrictJSONResponse
from spotrun.pipelines.registry import registry
from spotrun.service import callback_urls
from spotrun.store import JobStore

API_THREADS = 16
"""The requests served at once (each on a thread); the store's pool should hold as many
connections, or connections beyond its size are opened and closed for every request."""


def create_app(settings: Settings, *, store: JobStore | None = None,
               deliverer: callbacks.CallbackDeliverer | Literal[False] | None = None
               ) -> FastAPI:
    """The API and the dashboard over ``store`` (opened from ``settings`` if not given).

    Its lifespan runs the live feed and the callback deliverer (a default one if
    ``deliverer`` is None, none if it is False).
    """
    owns_store = store is None
    the_store = (store if store is not None
                 else JobStore.open(settings.database_url, pool_size=API_THREADS))
    ctx = AppContext(settings=settings, store=the_store, feed=ChangeFeed(the_store),
                     allow_private_callbacks=callback_urls.allow_private_from_env(),
                     stream_recheck_seconds=env_float("SPOTRUN_STREAM_RECHECK_SECONDS",
                                                        15.0, minimum=0.1),
                     max_streams_per_principal=int(env_float("SPOTRUN_MAX_STREAMS", 20,
                                                               minimum=1)),
                     session_seconds=env_float("SPOTRUN_SESSION_SECONDS", 12 * 3600.0,
                                                 minimum=60))
    the_store.tokens.cache_seconds = env_float("SPOTRUN_TOKEN_CACHE_SECONDS", 2.0,
                                               minimum=0.0)
    if deliverer is None:
        deliverer = callbacks.CallbackDeliverer(
            the_store, allow_private=ctx.allow_private_callbacks)
    if deliverer is not False:
        ctx.deliverer = deliverer
        ctx.feed.listeners.append(deliverer.poke)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = API_THREADS
        feed = asyncio.create_task(ctx.feed.run(), name="spotrun-live-feed")
        delivering = None
        if ctx.deliverer is not None:
            delivering = asyncio.create_task(ctx.deliverer.run(), name="spotrun-callbacks")
        try:
            yield
        finally:
            ctx.feed.stop()
            if delivering is not None:
                delivering.cancel()
                await asyncio.gather(delivering, return_exceptions=True)
            # The feed notices the stop within its wait (under a second); cancelling it
            # instead would close its LISTEN connection under a thread still using it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(feed), 3.0)
            feed.cancel()
            await asyncio.gather(feed, return_exceptions=True)
            if owns_store:
                the_store.close()

    app = FastAPI(
        title="spotrun", version="1",
        description="Run machine-learning jobs on preemptible / spot workers without "
                    "losing work. Authenticate with `Authorization: Bearer TOKEN`.",
        lifespan=lifespan, default_response_class=StrictJSONResponse,
        dependencies=[Depends(routes.known_query_only)],
        docs_url=None)  # /docs is served offline by dashboard.apidocs
    app.state.ctx = ctx
    app.add_middleware(BodyLimit)
    install_error_handlers(app)
    routes.install(app, ctx)
    pages.install(app, ctx)
    apidocs.install(app)
    document_pipelines_of(app)
    return app


def document_pipelines_of(app: FastAPI) -> None:
    """Make ``/openapi.json`` name the pipelines and their params' schemas, as the
    server checks them (they are known only once the plugins are loaded)."""
    made = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = made()
            schemas.document_pipelines(doc, {name: p.schema()
                                             for name, p in registry().items()})
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
