"""The API under a class's load: one ``spotrun server`` process on PostgreSQL, driven by
wrk over loopback (16 connections, 2 threads), as issue 17 measured it.

Per round, each case for ``--seconds``: ``POST /v1/jobs`` (a no-op ``sleep`` job),
``GET /v1/jobs/{id}`` (one job, always the same) and ``GET /v1/jobs?limit=50``; the
order rotates from round to round. Reported per case: requests/s, latency p50/p90/p99
(wrk's ``--latency``), non-2xx answers, and the server's CPU (its process's ``/proc``
times) in cores. No worker runs: the queued jobs stay queued.

    python bench/bench_api.py --rounds 3 --seconds 10

Needs wrk (Debian's package) and PostgreSQL (BENCH_PG_ADMIN).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

from spotrun.chaos.processes import children_of, free_port

_POST_LUA = """
wrk.method = "POST"
wrk.body = '{"pipeline": "sleep", "params": {"seconds": 0}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""
_GET_LUA = """
wrk.headers["Authorization"] = "Bearer %s"
"""

_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if m is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def parse_wrk(out: str) -> dict[str, float]:
    """Requests/s, the latency percentiles and the non-2xx count of wrk's report."""
    got: dict[str, float] = {"non_2xx": 0.0}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Requests/sec:"):
            got["rps"] = float(line.split()[1])
        elif m := re.match(r"(50|75|90|99)%\s+(\S+)", line):
            got[f"p{m.group(1)}_ms"] = _ms(m.group(2))
        elif line.startswith("Non-2xx or 3xx responses:"):
            got["non_2xx"] = float(line.split(":")[1])
        elif m := re.match(r"(\d+) requests in", line):
            got["requests"] = float(m.group(1))
    if "rps" not in got:
        raise RuntimeError(f"wrk printed no rate:\n{out}")
    return got


def _cpu_s(pid: int) -> float:
    """CPU seconds of a process and its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10.0, help="wrk's run per case")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="wrk's threads")
    p.add_argument("--processes", type=int, default=1, help="spotrun server --processes")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install -y wrk")
    if not C.pg_available():
        sys.exit(f"PostgreSQL unavailable at {C.PG_ADMIN}")
    C.install_cleanup()
    run = C.Run("api", args)
    name = f"spotrun_bench_api_{uuid.uuid4().hex[:8]}"
    url = C.fresh_pg_database(name)
    tmp = Path(tempfile.mkdtemp(prefix="spotrun-bench-api-"))
    rows: list[dict[str, Any]] = []
    try:
        from spotrun.store import JobStore

        store = JobStore.open(url)
        token = store.tokens.create("bench", admin=True)
        job_id = store.submit("sleep", {"seconds": 0}).id
        store.close()
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with C.Children() as kids:
            server = kids.start([*C.spotrun_argv(url), "--home", str(tmp / "home"), "server",
                                 "--port", str(port), "--processes", str(args.processes)],
                                log=tmp / "server.log")
            C.wait_until(lambda: _up(base), 60, "the server to answer /healthz")
            (tmp / "post.lua").write_text(_POST_LUA % token)
            (tmp / "get.lua").write_text(_GET_LUA % token)
            cases = [("POST /v1/jobs", "post.lua", f"{base}/v1/jobs"),
                     ("GET /v1/jobs/{id}", "get.lua", f"{base}/v1/jobs/{job_id}"),
                     ("GET /v1/jobs?limit=50", "get.lua", f"{base}/v1/jobs?limit=50")]
            for r in range(args.rounds):
                for case, script, target in cases[r % 3:] + cases[:r % 3]:
                    pids = [server.pid, *children_of(server.pid)]
                    cpu0, t0 = sum(map(_cpu_s, pids)), time.monotonic()
                    out = subprocess.run(
                        ["wrk", f"-t{args.threads}", f"-c{args.connections}",
                         f"-d{args.seconds:g}s", "--latency", "-s", str(tmp / script),
                         target], capture_output=True, text=True, check=True).stdout
                    cpu = (sum(map(_cpu_s, pids)) - cpu0) / (time.monotonic() - t0)
                    row = {"round": r + 1, "case": case, **parse_wrk(out),
                           "server_cpu_cores": cpu, "load": C.loadavg()}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    finally:
        C.drop_pg_database(name)
        shutil.rmtree(tmp, ignore_errors=True)
    summary = []
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case]
        med = {k: sorted(r[k] for r in mine)[len(mine) // 2]
               for k in ("rps", "p50_ms", "p99_ms", "server_cpu_cores")}
        summary.append({"case": case, **med, "each_round": [round(r["rps"]) for r in mine],
                        "non_2xx": sum(r["non_2xx"] for r in mine)})
    md = C.table(["case", "requests/s (median)", "each round", "p50 ms", "p99 ms",
                  "server CPU (cores)", "non-2xx"],
                 [[s["case"], s["rps"], ", ".join(map(str, s["each_round"])), s["p50_ms"],
                   s["p99_ms"], s["server_cpu_cores"], s["non_2xx"]] for s in summary])
    run.results = {"rows": rows, "summary": summary}
    run.finish(md)


def _up(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


if __name__ == "__main__":
    main()
