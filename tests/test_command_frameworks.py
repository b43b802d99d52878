"""Stock Hugging Face ``Trainer`` and Lightning scripts (examples/command/) run unchanged as
command jobs on real workers: preempted by a real SIGTERM, they resume where they stopped
and finish. Tiny models built from configs, random weights: nothing is downloaded."""

from __future__ import annotations

import json
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Env
from spotrun.jobs import JobState
from spotrun.store import JobStore
from test_command_jobs import ROOT, at_step, describe, final, handed_back, messages, submit

pytestmark = pytest.mark.slow

STEPS = 40


@pytest.fixture
def senv(env_factory: Any, sqlite_url: str) -> Env:
    e: Env = env_factory(sqlite_url)
    return e


@pytest.fixture
def st(senv: Env) -> Iterator[JobStore]:
    s = senv.store()
    yield s
    s.close()


def _preempt_once_and_finish(senv: Env, st: JobStore, script: Path) -> tuple[int, str]:
    """Run ``script`` as a command job, preempt it once mid-run, let it finish: (the step
    it was handed back at, its logs)."""
    job_id = submit(senv, sys.executable, str(script), "--steps", str(STEPS),
                    "--step-delay", "0.1")
    w1 = senv.worker("w1")
    at_step(st, job_id, 5, timeout=300)
    w1.signal(signal.SIGTERM)
    assert w1.wait(60) == 0, w1.log()
    job = handed_back(st, job_id, 1)
    assert any(m.startswith("preempted on w1") and "checkpoint saved" in m
               for m in messages(job)), messages(job)
    stopped_at = job.progress.step
    assert 5 <= stopped_at < STEPS
    senv.worker("w2")
    job = final(st, job_id, 300)
    assert job.state is JobState.SUCCEEDED, describe(st, job_id)
    assert job.preemptions == 1 and job.progress.step == STEPS
    logs = senv.cli("logs", job_id).stdout
    assert json.dumps({"global_step": STEPS}) in logs
    return stopped_at, logs


def test_a_stock_hugging_face_trainer_script_resumes_from_its_jit_checkpoint(
        senv: Env, st: JobStore) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    stopped_at, logs = _preempt_once_and_finish(
        senv, st, ROOT / "examples" / "command" / "hf_trainer.py")
    found = re.search(r"resuming from checkpoint-(\d+)", logs)
    assert found, logs
    # The JIT checkpoint is taken at the step boundary after the notice.
    assert stopped_at - 1 <= int(found.group(1)) <= stopped_at


def test_a_stock_lightning_script_resumes_from_its_on_exception_checkpoint(
        senv: Env, st: JobStore) -> None:
    pytest.importorskip("lightning")
    _stopped_at, logs = _preempt_once_and_finish(
        senv, st, ROOT / "examples" / "command" / "lightning_fit.py")
    assert "resuming from on_exception.ckpt" in logs
