"""schemathesis against the API's own OpenAPI schema.

``test_schemathesis_finds_nothing`` runs the command line an operator would, over a served
app, with every check and every phase (examples, coverage, fuzzing, stateful): the document
says what the server does. The in-process tests below add derandomized checks of real jobs
of every state (the streaming endpoints are tested on their own in test_api.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.exceptions import StarletteDeprecationWarning

from spotrun.config import Settings
from spotrun.http.app import create_app
from spotrun.serve import ServerThread
from spotrun.store import JobStore, Lease

# schemathesis collects its cases at import, so the app (on a throwaway SQLite database)
# exists at import too; the module fixture below removes it afterwards.
_HOME = Path(tempfile.mkdtemp(prefix="spotrun-schema-"))
_URL = f"sqlite:///{_HOME / 'spotrun.db'}"
_STORE = JobStore.open(_URL)
_ADMIN = _STORE.tokens.create("schema-admin", admin=True)


def _seed(store: JobStore) -> list[str]:
    """Jobs in every state, so that lists and lookups answer with real jobs."""
    wid = store.register_worker(name="w1", host="elsewhere", pid=1, pool="spot",
                                has_cuda=False, lease_seconds=60)

    def claim() -> Lease:
        got = store.claim(worker_id=wid, worker_name="w1", lease_seconds=60)
        assert got is not None
        return got[0]

    ids = [store.submit("sleep", {"seconds": 1}, owner="schema-admin").id for _ in range(4)]
    lease = claim()
    store.save_progress(lease, 3, 10, {"loss": 0.25}, [(time.time(), "INFO", "hello")])
    store.commit_checkpoint(lease, "mem://ckpt/3", 3)
    store.hand_back(lease, "preempted on w1 at step 3/10; checkpoint saved in 0.01 s")
    store.complete(claim(), {"slept": 1, "loss": float("nan")})
    store.fail(claim(), "boom", "Traceback ...")
    store.save_progress(claim(), 1, None, {})
    return ids


_JOBS = _seed(_STORE)
_APP = create_app(Settings.from_env(home=str(_HOME), database_url=_URL), store=_STORE,
                  deliverer=False)

with warnings.catch_warnings():
    # starlette asks for httpx2 when only httpx is installed; the client works either way.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    _loaded = schemathesis.openapi.from_asgi("/openapi.json", _APP)
_loaded.config.generation.update(max_examples=25, deterministic=True)
schema = _loaded.exclude(path_regex="^/v1/stream/")

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance,
          ignored_auth]


@pytest.fixture(scope="module", autouse=True)
def _cleanup() -> Iterator[None]:
    yield
    _STORE.close()
    shutil.rmtree(_HOME, ignore_errors=True)


def test_schema_documents_every_route() -> None:
    paths = set(schema.raw_schema["paths"])
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel",
            "/v1/jobs/{job_id}/result", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/logs",
            "/v1/pipelines", "/v1/workers", "/healthz", "/readyz", "/metrics"} <= paths


def test_real_jobs_conform_to_the_schema() -> None:
    for job_id in _JOBS:
        for path in ("/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result",
                     "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/logs"):
            case = schema[path]["GET"].Case(path_parameters={"job_id": job_id})
            response = case.call_and_validate(
                headers={"Authorization": f"Bearer {_ADMIN}"}, checks=CHECKS[:5])
            assert response.status_code == 200, (path, response.text)


@schema.parametrize()
@pytest.mark.filterwarnings("ignore::starlette.exceptions.StarletteDeprecationWarning")
def test_api_conforms_to_its_schema(case: schemathesis.Case[Any]) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {_ADMIN}"}, checks=CHECKS)


# The project's configuration (413 counts as a rejection), as a run from the checkout has it.
_CONFIG = Path(__file__).resolve().parents[1] / "schemathesis.toml"


def test_schemathesis_finds_nothing_with_every_check_and_phase(tmp_path: Path) -> None:
    srv = ServerThread(_APP, "127.0.0.1", 0, access_log=False)
    srv.start()
    try:
        run = subprocess.run(
            [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()",
             "--config-file", str(_CONFIG), "run", f"http://127.0.0.1:{srv.port}/openapi.json",
             "-H", f"Authorization: Bearer {_ADMIN}", "--checks", "all",
             "--phases", "examples,coverage,fuzzing,stateful", "--continue-on-failure",
             "--max-examples", "20", "--seed", "1", "--request-timeout", "5",
             "--no-color"],
            # In tmp_path: the run's cache (.schemathesis/) stays out of the checkout.
            cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    finally:
        srv.stop()
    # Exit 0 only when no check failed in any phase (warnings do not count).
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
