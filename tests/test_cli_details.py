"""Command-line details: read-only commands, `wait`'s progress and JSON, long results."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Env
from spotrun.store import JobStore


def _finished(st: JobStore, result: object) -> str:
    job = st.submit("sleep", {"seconds": 0, "steps": 1})
    wid = st.register_worker(name="w1", host="h", pid=1, pool="spot", has_cuda=False,
                             lease_seconds=30)
    got = st.claim(worker_id=wid, worker_name="w1", lease_seconds=30)
    assert got is not None
    st.complete(got[0], result)
    return job.id


@pytest.mark.parametrize("command", [
    ["show", "0193abc"], ["jobs"], ["workers"], ["wait", "0193abc"], ["logs", "0193abc"]])
def test_a_read_only_command_never_creates_a_database(
        env_factory: Callable[..., Env], tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "typo" / "spotrun.db"
    env = env_factory(f"sqlite:///{missing}")
    proc = env.cli(*command, check=False)
    assert proc.returncode == 1, proc
    assert proc.stderr.strip().splitlines() == [
        f"spotrun: no database at {missing} (check --home, SPOTRUN_HOME or "
        "SPOTRUN_DATABASE_URL; a worker or `spotrun submit` creates it)"]
    assert proc.stdout == ""
    assert not missing.exists() and not missing.parent.exists()


def test_show_keeps_a_long_result_readable(env_factory: Callable[..., Env],
                                           sqlite_url: str) -> None:
    env = env_factory(sqlite_url)
    st = env.store()
    result = {"labels": list(range(2000)), "accuracy": 0.97}
    job_id = _finished(st, result)
    text = env.cli("show", job_id).stdout
    lines = text.splitlines()
    assert "result:" in lines and "  accuracy: 0.97" in lines, text
    labels = next(line for line in lines if line.startswith("  labels: "))
    assert len(labels) < 200 and "characters; `show --json` has it all" in labels, labels
    assert max(len(line) for line in lines) < 200
    assert json.loads(env.cli("show", job_id, "--json").stdout)["result"] == result
    short = _finished(st, {"ok": 1})
    assert 'result: {"ok": 1}' in env.cli("show", short).stdout.splitlines()
    st.close()


def test_wait_json_prints_the_ended_job(env_factory: Callable[..., Env],
                                        sqlite_url: str) -> None:
    env = env_factory(sqlite_url)
    st = env.store()
    job_id = _finished(st, {"ok": 1})
    proc = env.cli("wait", job_id, "--json")
    assert json.loads(proc.stdout)["state"] == "succeeded" and proc.stderr == ""
    # Piped: the one line, no progress drawn.
    plain = env.cli("wait", job_id)
    assert plain.stdout == f"job {job_id} succeeded\n" and plain.stderr == ""
    st.close()


def test_wait_draws_a_progress_bar_on_a_terminal(env_factory: Callable[..., Env],
                                                 sqlite_url: str) -> None:
    env = env_factory(sqlite_url)
    job_id = env.cli("submit", "sleep", "-p", "seconds=4", "-p", "steps=40").stdout.strip()
    # A real terminal: wait's stdout and stderr are the slave side of a pty.
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "spotrun", "wait", job_id], env=env.vars,
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    worker = env.worker("w1")
    seen = b""
    deadline = time.monotonic() + 120
    while proc.poll() is None or select.select([master], [], [], 0)[0]:
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"wait did not end: {seen!r}\n{worker.log()}")
        if select.select([master], [], [], 0.2)[0]:
            try:
                seen += os.read(master, 4096)
            except OSError:
                break
    os.close(master)
    assert proc.wait(30) == 0, seen
    text = seen.decode()
    frames = [f.replace("\x1b[K", "").strip() for f in text.split("\r") if f.strip()]
    bars = [f for f in frames if f.startswith("running [")]
    assert bars, text
    assert any("/40 (" in b and not b.endswith("40/40 (100%)") for b in bars), bars
    assert text.rstrip().endswith(f"job {job_id} succeeded"), text
    worker.kill()


ROOT = Path(__file__).resolve().parent.parent


def test_wait_exits_as_the_readme_says(env_factory: Callable[..., Env],
                                       sqlite_url: str) -> None:
    readme = (ROOT / "README.md").read_text()
    line = next(x for x in readme.splitlines() if x.startswith("spotrun wait JOB"))
    assert "exit 0 succeeded, 1 failed or cancelled, 3 gave up" in line
    env = env_factory(sqlite_url)
    st = env.store()
    assert env.cli("wait", _finished(st, {"ok": 1}), check=False).returncode == 0
    queued = env.cli("submit", "sleep").stdout.strip()
    gave_up = env.cli("wait", queued, "--timeout", "0.2", check=False)
    assert gave_up.returncode == 3 and "still queued after 0.2 s" in gave_up.stderr
    env.cli("cancel", queued)
    cancelled = env.cli("wait", queued, check=False)
    assert cancelled.returncode == 1 and cancelled.stdout.startswith(f"job {queued} cancel")
    st.close()


def test_the_readme_says_where_a_cpu_torch_comes_from() -> None:
    readme = (ROOT / "README.md").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    index = next(line.split("=", 1)[1] for line in dockerfile.splitlines()
                 if line.startswith("ARG TORCH_INDEX_URL="))
    assert f"pip install torch==2.13.0 --index-url {index}" in readme


def test_a_job_no_live_worker_can_run_says_so(env_factory: Callable[..., Env],
                                              sqlite_url: str, tmp_path: Path) -> None:
    import httpx

    from spotrun.config import Settings
    from spotrun.http.app import create_app
    from spotrun.http.auth import SESSION_COOKIE
    from spotrun.serve import ServerThread

    env = env_factory(sqlite_url)
    st = env.store()
    # A live CPU worker of pool "spot" (registered as a worker process registers).
    st.register_worker(name="cpu1", host="h", pid=1, pool="spot", has_cuda=False,
                       lease_seconds=30)
    ok = env.cli("submit", "sleep")
    assert ok.stderr == ""  # no need a worker could lack: no warning
    gpu = env.cli("submit", "sleep", "--pool", "gpu")
    assert gpu.stderr.strip() == (
        "spotrun: warning: no live worker can run this job: it runs only on pool 'gpu', "
        "which has no live worker (start a worker in pool 'gpu': "
        "`spotrun worker --pool gpu`)")
    job_id = gpu.stdout.strip()
    shown = env.cli("show", job_id).stdout.splitlines()
    assert shown[1].startswith("warning: no live worker can run this job: it runs only on "
                               "pool 'gpu'"), shown
    assert "warning" not in env.cli("show", ok.stdout.strip()).stdout

    st.create_token("admin", admin=True)
    token = st.create_session("admin", expires_in=600)  # the dashboard's sign-in
    settings = Settings.from_env(home=str(tmp_path), database_url=sqlite_url)
    srv = ServerThread(create_app(settings, store=st, deliverer=False), "127.0.0.1", 0,
                       access_log=False)
    srv.start()
    try:
        base = f"http://127.0.0.1:{srv.port}"
        page = httpx.get(f"{base}/jobs/{job_id}", cookies={SESSION_COOKIE: token}).text
        assert 'id="job-unrunnable"' in page and "No live worker can run this job" in page
        other = httpx.get(f"{base}/jobs/{ok.stdout.strip()}", cookies={SESSION_COOKIE: token})
        assert 'id="job-unrunnable"' not in other.text
        # A worker of that pool starts: the page no longer says it.
        st.register_worker(name="gpu1", host="h", pid=2, pool="gpu", has_cuda=True,
                           lease_seconds=30)
        again = httpx.get(f"{base}/jobs/{job_id}", cookies={SESSION_COOKIE: token}).text
        assert 'id="job-unrunnable"' not in again
    finally:
        srv.stop()
    st.close()


def test_what_makes_a_job_unrunnable() -> None:
    import datetime as dt

    from spotrun.capacity import unrunnable_reason
    from spotrun.jobs import Worker

    now = dt.datetime.now(dt.UTC)

    def w(pool: str, cuda: bool, state: str = "idle") -> Worker:
        return Worker("id", "w", "h", 1, pool, state, cuda, None, now, now)

    assert unrunnable_reason(False, None, []) is None  # waits for the first worker
    assert "needs CUDA" in (unrunnable_reason(True, None, [w("spot", False)]) or "")
    assert unrunnable_reason(True, None, [w("spot", True)]) is None
    assert unrunnable_reason(True, None, [w("spot", True, "gone")]) is not None
    assert unrunnable_reason(False, "gpu", [w("gpu", False)]) is None
    assert "pool 'gpu'" in (unrunnable_reason(True, "gpu", [w("spot", True)]) or "")
    assert "needs CUDA and no live worker in pool 'gpu'" in (
        unrunnable_reason(True, "gpu", [w("gpu", False)]) or "")
