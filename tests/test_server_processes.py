"""``spotrun server --processes N``: N processes serve one port, and stop together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from conftest import wait_until
from spotrun.chaos.processes import children_of


def test_the_processes_share_the_port_and_stop_together(pg_url: str,
                                                         tmp_path: Path) -> None:
    from spotrun.store import JobStore

    store = JobStore.open(pg_url)
    token = store.tokens.create("alice")
    store.close()
    env = {**os.environ, "SPOTRUN_HOME": str(tmp_path / "home"),
           "SPOTRUN_DATABASE_URL": pg_url, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "spotrun", "server", "--port", "0", "--processes", "3"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(lambda: sum("Application startup complete" in x for x in lines) == 3,
                   60, "three server processes to start")
        url = next(x.split()[5] for x in lines if x.startswith("spotrun: API and dashboard"))
        assert any("serving in 3 processes" in x for x in lines), lines
        helpers = children_of(proc.pid)
        assert len(helpers) == 2, lines

        # With the first process stopped, the other two still answer on its port.
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            for i in range(10):
                r = httpx.post(f"{url}/v1/jobs", json={"pipeline": "sleep",
                                                       "params": {"seconds": 0}},
                               headers={"Authorization": f"Bearer {token}"}, timeout=10)
                assert r.status_code == 201, (i, r.text)
                got = httpx.get(f"{url}/v1/jobs/{r.json()['id']}",
                                headers={"Authorization": f"Bearer {token}"}, timeout=10)
                assert got.json()["events"][0]["kind"] == "submitted"
        finally:
            os.kill(proc.pid, signal.SIGCONT)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, "".join(lines)
        # Every process is gone with it, and the port is free again.
        for pid in helpers:
            assert not Path(f"/proc/{pid}").exists(), f"server process {pid} outlived it"
        time.sleep(0.1)
        try:
            httpx.get(f"{url}/healthz", timeout=2)
            raise AssertionError("the port still answers")
        except httpx.TransportError:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
