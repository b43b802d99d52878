"""Pipelines published by other packages under the entry-point group ``spotrun.pipelines``,
and the bound on what a job may log."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Env, wait_until
from spotrun.worker import LOG_LINES_PER_ATTEMPT, _JobLogHandler

PLUGIN = '''
from pydantic import Field
from spotrun.pipelines import JobContext, Params, pipeline


class EchoParams(Params):
    word: str = Field(..., min_length=1, max_length=20)
    times: int = Field(2, ge=1, le=10)


@pipeline("echo", params=EchoParams, description="Repeat a word")
def run(ctx: JobContext) -> dict:
    p = ctx.params
    for i in range(p.times):
        ctx.progress(i + 1, p.times)
        ctx.log.info("said %s", p.word)
    return {"said": [p.word] * p.times}


PIPELINE = run
'''


def _install_plugin(root: Path) -> Path:
    """A package 'echo_plugin' with its entry point, importable from ``root``."""
    root.mkdir()
    (root / "echo_plugin.py").write_text(PLUGIN)
    dist = root / "echo_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[spotrun.pipelines]\necho = echo_plugin:PIPELINE\n")
    return root


@pytest.mark.slow
def test_a_pipeline_from_another_package_is_listed_validated_and_run(
        env_factory: Callable[..., Env], sqlite_url: str, tmp_path: Path) -> None:
    plugin_dir = _install_plugin(tmp_path / "site")
    env = env_factory(sqlite_url, PYTHONPATH=str(plugin_dir))
    listed = json.loads(env.cli("pipelines", "--json").stdout)
    assert "echo" in [p["name"] for p in listed]
    bad = env.cli("submit", "echo", "-p", "times=3", check=False)
    assert bad.returncode == 2 and "param 'word' is required" in bad.stderr
    job_id = env.cli("submit", "echo", "-p", "word=spot", "-p", "times=3").stdout.strip()
    w = env.worker("w1")
    store = env.store()
    wait_until(lambda: store.get(job_id, with_events=False).state.is_final, 60, "echo")
    job = store.get(job_id)
    assert job.result == {"said": ["spot", "spot", "spot"]}
    assert env.cli("logs", job_id).stdout.count("said spot") == 3
    w.signal(signal.SIGTERM)
    assert w.wait(30) == 0
    store.close()


def test_a_job_log_is_bounded() -> None:
    handler = _JobLogHandler()
    logger = logging.getLogger("spotrun.job.bounded-test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        for i in range(LOG_LINES_PER_ATTEMPT + 500):
            logger.info("line %d", i)
    finally:
        logger.removeHandler(handler)
    lines = handler.take()
    assert len(lines) == LOG_LINES_PER_ATTEMPT + 1
    assert lines[-1][2].startswith("log truncated")
    assert handler.take() == []
