"""The API under a class's load: one ``spotrun server`` process on PostgreSQL, driven by
wrk over loopback (16 connections, 2 threads), as issue 17 measured it.

Per round, each case for ``--seconds``: ``POST /v1/jobs`` (a no-op ``sleep`` job),
``GET /v1/jobs/{id}`` (one job, always the same) and ``GET /v1/jobs?limit=50``; the
order rotates from round to round. Reported per case: requests/s, latency p50/p90/p99
(wrk's ``--latency``), non-2xx answers, and the server's CPU (its process's ``/proc``
times) in cores. No worker runs: the queued jobs stay queued.

Then ``--sse`` learners (default 500), each with a token of their own, follow their own
running job on ``GET /v1/stream/jobs/{id}``, one connection each from a client process
(asyncio); the bench's own thread beats every job's progress on a worker's leases every
2.5 s (the default heartbeat), so each stream gets an event a beat. Reported over
``--sse-seconds``: events a second, the delay from a job's ``updated_at`` to its event
reaching the client (p50/p99), streams still open at the end, and the server's CPU.

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
    p.add_argument("--sse", type=int, default=500, help="live streams (0: none)")
    p.add_argument("--sse-seconds", type=float, default=20.0)
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
        learners = _running_jobs(store, args.sse)
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
            if learners:
                row = _sse_case(store, learners, port, server.pid, args.sse_seconds, tmp)
                print(json.dumps(row), flush=True)
                rows.append(row)
        store.close()
    finally:
        C.drop_pg_database(name)
        shutil.rmtree(tmp, ignore_errors=True)
    summary = []
    for case in dict.fromkeys(r["case"] for r in rows if "rps" in r):
        mine = [r for r in rows if r["case"] == case]
        med = {k: sorted(r[k] for r in mine)[len(mine) // 2]
               for k in ("rps", "p50_ms", "p99_ms", "server_cpu_cores")}
        summary.append({"case": case, **med, "each_round": [round(r["rps"]) for r in mine],
                        "non_2xx": sum(r["non_2xx"] for r in mine)})
    md = C.table(["case", "requests/s (median)", "each round", "p50 ms", "p99 ms",
                  "server CPU (cores)", "non-2xx"],
                 [[s["case"], s["rps"], ", ".join(map(str, s["each_round"])), s["p50_ms"],
                   s["p99_ms"], s["server_cpu_cores"], s["non_2xx"]] for s in summary])
    sse_rows = [r for r in rows if "events_per_s" in r]
    if sse_rows:
        md += "\n\n" + C.table(
            ["live streams", "seconds", "events/s", "delay p50 ms", "delay p99 ms",
             "streams open at the end", "server CPU (cores)"],
            [[r["streams"], r["seconds"], r["events_per_s"], r["delay_p50_ms"],
              r["delay_p99_ms"], r["open_at_end"], r["server_cpu_cores"]]
             for r in sse_rows])
    run.results = {"rows": rows, "summary": summary}
    run.finish(md)


# The learners' side: one connection per stream, the events' delays from the jobs'
# updated_at (the same host clock). Reads streams.json, prints one JSON line at the end.
_SSE_CLIENT = r"""
import asyncio, datetime as dt, json, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
streams = json.load(open(sys.argv[3]))
delays, opened, first = [], [0], asyncio.Event()
counting = [False]

async def follow(job_id, token):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET /v1/stream/jobs/{job_id} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n".encode())
    await w.drain()
    status = await r.readline()
    if b" 200 " not in status:
        raise SystemExit(f"stream {job_id}: {status!r}")
    opened[0] += 1
    if opened[0] == len(streams):
        first.set()
    event = None
    while True:
        line = await r.readline()
        if not line:
            opened[0] -= 1
            return
        if line.startswith(b"event: "):
            event = line[7:].strip()
        elif line.startswith(b"data: ") and event == b"job" and counting[0]:
            at = json.loads(line[6:])["updated_at"]
            t = dt.datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()
            delays.append(time.time() - t)

async def main():
    tasks = [asyncio.create_task(follow(j, t)) for j, t in streams]
    await asyncio.wait_for(first.wait(), 120)
    await asyncio.sleep(5)  # past the first events of every stream
    counting[0] = True
    await asyncio.sleep(seconds)
    counting[0] = False
    print(json.dumps({"events": len(delays), "delays": sorted(delays),
                      "open": opened[0]}), flush=True)
    for t in tasks:
        t.cancel()

asyncio.run(main())
"""


def _running_jobs(store: Any, n: int) -> list[tuple[str, str, Any]]:
    """``n`` learners, each with a token and a job running on the bench's worker:
    (job id, token, lease)."""
    if n == 0:
        return []
    out = []
    for i in range(n):
        owner = f"learner-{i}"
        out.append((store.submit("sleep", {"seconds": 0}, owner=owner).id,
                    store.tokens.create(owner)))
    wid = store.register_worker(name="bench-w", host="bench", pid=os.getpid(), pool="spot",
                                has_cuda=False, lease_seconds=60)
    leases = {}
    while (got := store.claim(worker_id=wid, worker_name="bench-w", lease_seconds=60)):
        leases[got[0].job_id] = got[0]  # the learners' jobs, and the GET case's
    return [(job, token, leases[job]) for job, token in out if job in leases]


def _sse_case(store: Any, learners: list[tuple[str, str, Any]], port: int, server_pid: int,
              seconds: float, tmp: Path) -> dict[str, Any]:
    import threading

    from spotrun.config import Settings
    from spotrun.jobs import Progress
    from spotrun.store import Beat

    stop = threading.Event()
    worker_id = learners[0][2].worker_id
    every = Settings.heartbeat_seconds  # the worker's default beat

    def beat() -> None:
        step = 0
        while not stop.wait(every):
            step += 1
            store.beat(worker_id, [Beat(lease, Progress(step, 10_000, {"loss": 1 / step}))
                                   for _, _, lease in learners], 60)

    (tmp / "streams.json").write_text(json.dumps([[j, t] for j, t, _ in learners]))
    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    client = subprocess.Popen(
        [sys.executable, "-c", _SSE_CLIENT, str(port), str(seconds),
         str(tmp / "streams.json")], stdout=subprocess.PIPE, text=True)
    try:
        # The window: from the client's counting start (5 s after the last stream opened).
        def opened() -> bool:
            if client.poll() is not None:
                raise RuntimeError(f"the stream client failed ({client.returncode})")
            return _streams_of(port) >= len(learners)

        C.wait_until(opened, 120, "every stream to open")
        time.sleep(5)
        pids = [server_pid, *children_of(server_pid)]
        cpu0, t0 = sum(map(_cpu_s, pids)), time.monotonic()
        out, _ = client.communicate(timeout=seconds + 60)
        cpu = (sum(map(_cpu_s, pids)) - cpu0) / (time.monotonic() - t0)
    finally:
        stop.set()
        if client.poll() is None:
            client.kill()
        beater.join(10)
    if client.returncode != 0:
        raise RuntimeError(f"the stream client failed ({client.returncode})")
    got = json.loads(out.strip().splitlines()[-1])
    delays = got["delays"] or [float("nan")]
    pick = lambda q: delays[min(len(delays) - 1, int(q * len(delays)))] * 1000  # noqa: E731
    return {"case": "SSE", "streams": len(learners), "seconds": seconds,
            "events_per_s": got["events"] / seconds, "delay_p50_ms": pick(0.5),
            "delay_p99_ms": pick(0.99), "open_at_end": got["open"],
            "server_cpu_cores": cpu, "load": C.loadavg()}


def _streams_of(port: int) -> int:
    """Established connections to the server's port (the learners' streams)."""
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "01" and int(local.split(":")[1], 16) == port:
            n += 1
    return n


def _up(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


if __name__ == "__main__":
    main()
