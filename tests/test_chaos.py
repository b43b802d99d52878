"""The chaos drill: its schedule, and its short form with real workers and real signals.

The drills run the real CLI (``python -m spotrun chaos ... --json``) against a fresh
database, and read its JSON report: every check passes, and kills of each kind happened.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spotrun import chaos
from spotrun.chaos import audit, drill, processes, report
from spotrun.config import Settings
from spotrun.events import Preempted
from spotrun.jobs import Event
from spotrun.store import JobStore, LeaseLost
from spotrun.worker import refusals

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Enough chaos for every kind of kill several times over in 20 s, on 3 workers.
RATES = ["--sigterm-rate", "0.15", "--sigkill-rate", "0.1", "--freeze-rate", "0.1"]


# ------------------------------------------------------------------- schedule


def _schedule(seed: int, **overrides: Any) -> chaos.Schedule:
    kw: dict[str, Any] = dict(seed=seed, workers=4, jobs=40, duration=60, sigterm_rate=0.1,
                              sigkill_rate=0.05, freeze_rate=0.03, db_restart=False)
    kw.update(overrides)
    return chaos.make_schedule(**kw)


def test_same_seed_same_schedule() -> None:
    a, b = _schedule(7), _schedule(7)
    assert a == b
    assert a.fingerprint() == b.fingerprint()
    assert _schedule(8).fingerprint() != a.fingerprint()


def test_schedule_mix_and_kill_counts() -> None:
    s = _schedule(1)
    assert (s.count("digits-train"), s.count("digits-infer"), s.count("sleep")) == (6, 4, 30)
    kinds = [k.kind for k in s.kills]
    assert (kinds.count("sigterm"), kinds.count("sigkill"), kinds.count("freeze")) == (6, 3, 2)
    assert all(0 < k.at < 60 and 0 <= k.slot < 4 for k in s.kills)
    assert [k.at for k in s.kills] == sorted(k.at for k in s.kills)
    for j in s.jobs:
        if j.pipeline == "sleep":
            assert 0.5 <= j.params["seconds"] <= 3 and 10 <= j.params["steps"] <= 30
        elif j.pipeline == "digits-train":
            assert 2 <= j.params["epochs"] <= 4 and j.checkpoint_every_steps
        else:
            assert j.at is None and j.model_of is not None  # waits for its model
    # A rate above zero always gives at least one kill; zero gives none.
    few = _schedule(1, duration=5, sigterm_rate=0.01, sigkill_rate=0, freeze_rate=0)
    assert [k.kind for k in few.kills] == ["sigterm"]
    assert _schedule(1, with_torch=False).count("sleep") == 40


def test_stall_and_cuts_are_drawn_after_everything_else() -> None:
    plain, faulted = _schedule(7), _schedule(7, db_stall=True, cut_replies=True)
    assert (plain.jobs, plain.kills) == (faulted.jobs, faulted.kills)
    assert faulted.db_stall_at is not None and 6 <= faulted.db_stall_at <= 15
    assert len(faulted.cuts) == 6 and all(0 < t < 60 for t in faulted.cuts)
    assert plain.db_stall_at is None and plain.cuts == ()


def test_db_restart_schedules_a_replacement_during_the_outage() -> None:
    s = _schedule(3, db_restart=True)
    assert s.db_restart_at is not None and 18 <= s.db_restart_at <= 36
    assert any(s.db_restart_at < k.at < s.db_restart_at + chaos.DB_OUTAGE_SECONDS
               for k in s.kills)


# --------------------------------------------------------------- measurements


def _ev(at: float, kind: str, attempt: int, message: str, worker: str = "w") -> Event:
    return Event(dt.datetime.fromtimestamp(at, tz=dt.UTC), kind, worker, attempt, message)


def test_interruptions_count_steps_redone_and_time_to_resume() -> None:
    events = (
        _ev(100.0, "started", 1, "started on w"),
        _ev(101.0, "checkpoint", 1, "checkpoint at step 10 saved in 0.01 s"),
        _ev(105.0, "lease_expired", 1, "lease of worker w expired at step 14/30; back in "
            "the queue"),
        _ev(105.5, "resumed", 2, "resumed on v from step 10/30", "v"),
        _ev(106.0, "preempted", 2, "preempted on v at step 12/30; checkpoint saved in 0.01 s",
            "v"),
        _ev(106.25, "resumed", 3, "resumed on u from step 12/30", "u"),
    )
    found, unparsed = audit.interruptions(events, 0.1, {"w": [102.0]}, chaos.LEASE_SECONDS)
    assert unparsed == 0
    expiry, handback = found
    assert (expiry.kind, expiry.steps, expiry.gap) == ("lease_expired", 4, 0.5)
    assert expiry.seconds == pytest.approx(1.0)  # killed at 102, last checkpoint at 101
    assert (handback.kind, handback.steps, handback.gap) == ("preempted", 0, 0.25)


def test_quantiles_and_refused_lines(tmp_path: Path) -> None:
    assert report.quantiles([]) == {"count": 0, "p50": None, "p99": None, "max": None}
    q = report.quantiles([float(x) for x in range(1, 101)])
    assert (q["p50"], q["p99"], q["max"]) == (50.0, 99.0, 100.0)


def test_refused_writes_are_counted_from_the_workers_records_not_their_words(
        tmp_path: Path, store: JobStore) -> None:
    job = store.submit("sleep", {})
    wid = store.register_worker(name="c1-1", host="h", pid=1, pool="spot", has_cuda=False,
                                lease_seconds=10)
    old = store.claim(worker_id=wid, worker_name="c1-1", lease_seconds=10)
    assert old is not None
    store.expire_lease_now(job.id)
    store.sweep_expired()
    assert store.claim(worker_id=wid, worker_name="c1-1", lease_seconds=10) is not None
    with pytest.raises(LeaseLost) as refused:
        store.hand_back(old[0], Preempted("c1-1", 3))
    assert (refused.value.write, refused.value.job_id, refused.value.attempt) == (
        "hand-back", job.id, 1)
    # What a worker's log holds, in the format its processes log with.
    handler = logging.FileHandler(tmp_path / "worker-c1-1.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    words = logging.getLogger("spotrun.worker")
    for logger in (refusals.log, words):
        logger.addHandler(handler)
    try:
        refusals.record(refused.value)
        words.warning("job %s: %s; stopping it", job.id, refused.value)
        refusals.record(LeaseLost("heartbeat refused", write="heartbeat", job_id=job.id,
                                  attempt=1))
        words.warning("worker c1-1: database unreachable (connection refused)")
    finally:
        for logger in (refusals.log, words):
            logger.removeHandler(handler)
        handler.close()
    with open(tmp_path / "worker-c1-1.log", "a") as f:
        f.write("x WARNING spotrun.refused: spotrun-refused {\"wri")  # a worker killed mid-line
    assert drill.refused_lines(tmp_path) == {"hand-back": 1, "heartbeat": 1}


def test_db_restart_without_postgres_is_one_line_and_exit_2(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    monkeypatch.setattr(processes, "find_postgres_bin", lambda: None)
    out: list[str] = []
    settings = Settings.from_env(home=str(tmp_path))
    code = chaos.main(settings, workers=2, jobs=2, duration=5, sigterm_rate=0.1,
                      sigkill_rate=0.1, freeze_rate=0.1, db_restart=True, seed=0,
                      as_json=False, echo=out.append)
    assert code == 2 and out == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "initdb" in err[0] and err[0].startswith("spotrun: ")


# ---------------------------------------------------------------- real drills


def _env(home: Path, db_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTRUN_")}
    # A temporary folder of the drill's own: what it leaves there is its alone, whatever
    # else runs on the machine meanwhile.
    env.update(SPOTRUN_HOME=str(home), PYTHONUNBUFFERED="1", TMPDIR=str(_tmpdir(home)))
    if db_url is not None:
        env["SPOTRUN_DATABASE_URL"] = db_url
    return env


def _leftovers(home: Path) -> list[str]:
    """Processes still running with this drill's SPOTRUN_HOME, and its temporary dirs."""
    found = []
    needle = f"SPOTRUN_HOME={home}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found.append(f"pid {proc.name}: {(proc / 'cmdline').read_bytes()!r}")
        except OSError:
            continue
    return found


_TMPDIRS: dict[Path, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def _remove_tmpdirs() -> Iterator[None]:
    yield
    for folder in _TMPDIRS.values():
        shutil.rmtree(folder, ignore_errors=True)


def _tmpdir(home: Path) -> Path:
    # Outside pytest's tmp_path, whose parents only root may enter: the drill's private
    # PostgreSQL runs as the postgres user in a folder under it.
    if home not in _TMPDIRS:
        folder = Path(tempfile.mkdtemp(prefix="spotrun-test-chaos-"))
        folder.chmod(0o1777)
        _TMPDIRS[home] = folder
    return _TMPDIRS[home]


def _temp_dirs(home: Path) -> set[str]:
    return {p.name for p in _tmpdir(home).glob("spotrun-chaos-*")}


def _drill(home: Path, db_url: str | None, *args: str, timeout: float = 170,
           **extra_env: str) -> dict[str, Any]:
    before = _temp_dirs(home)
    proc = subprocess.run([sys.executable, "-m", "spotrun", "chaos", *args, "--json"],
                          env={**_env(home, db_url), **extra_env}, capture_output=True,
                          text=True, timeout=timeout)
    try:
        report: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"no JSON report (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    failed = [c for c in report["checks"] if not c["ok"]]
    assert not failed, f"failed checks: {json.dumps(failed, indent=2)}\n{proc.stderr}"
    assert report["ok"] is True and proc.returncode == 0, proc.stderr
    kills = report["metrics"]["kills"]
    assert kills["sigterm"] >= 1 and kills["sigkill"] >= 1 and kills["freeze"] >= 1, kills
    assert report["metrics"]["jobs"]["succeeded"] == report["config"]["jobs"]
    assert report["metrics"]["replacements"] >= 3  # every kill but the freezes replaced
    assert not _leftovers(home)
    assert _temp_dirs(home) <= before, "the drill left temporary directories behind"
    if "--db-restart" not in args:
        # The audit on its own, on the store the drill left: every check of it passes.
        audit = subprocess.run([sys.executable, "-m", "spotrun", "audit", "--json"],
                               env=_env(home, db_url), capture_output=True, text=True,
                               timeout=120)
        found = json.loads(audit.stdout)
        assert audit.returncode == 0 and found["ok"] is True, audit.stdout + audit.stderr
        assert found["jobs"] == report["config"]["jobs"]
    return report


@pytest.mark.slow
def test_chaos_drill_sqlite_then_its_cost(sqlite_url: str, tmp_path: Path) -> None:
    # Priced pools: the drill's spot workers declare $0.35/h; on-demand costs $1.20/h.
    report = _drill(tmp_path, sqlite_url, "--workers", "3", "--jobs", "12", "--duration",
                    "20", *RATES, "--seed", "1", "--db-stall", SPOTRUN_PRICE_PER_HOUR="0.35")
    assert report["metrics"]["db_stall"]["ok"] is True
    m = report["metrics"]
    assert m["lease_expiries"] >= 1 and m["preemptions"] >= 1
    assert 0 < m["goodput"]["ratio"] <= 1
    assert m["notice_to_exit_seconds"]["count"] == m["kills"]["sigterm"]

    proc = subprocess.run(
        [sys.executable, "-m", "spotrun", "cost", "--json"], capture_output=True, text=True,
        env={**_env(tmp_path, sqlite_url), "SPOTRUN_PRICES": "spot=0.35,on-demand=1.20"},
        timeout=60)
    assert proc.returncode == 0, proc.stderr
    cost = json.loads(proc.stdout)
    totals, jobs = cost["totals"], cost["jobs"]
    assert totals["jobs"] == len(jobs) == 12
    assert totals["cost"] == pytest.approx(sum(j["cost"] for j in jobs))
    assert totals["on_demand_cost"] == pytest.approx(sum(j["on_demand_cost"] for j in jobs))
    assert totals["saving"] == pytest.approx(totals["on_demand_cost"] - totals["cost"])
    assert set(totals["paid_seconds_by_pool"]) == {"spot"}
    assert totals["cost_by_pool"]["spot"] == pytest.approx(
        totals["paid_seconds_by_pool"]["spot"] * 0.35 / 3600)
    assert totals["preemptions"] >= 1 and totals["redone_seconds"] >= 0
    assert totals["saving"] > 0 and 0 < totals["saving_percent"] < 100


@pytest.mark.slow
def test_chaos_drill_postgres(pg_url: str, tmp_path: Path) -> None:
    _drill(tmp_path, pg_url, "--workers", "3", "--jobs", "12", "--duration", "20", *RATES,
           "--seed", "2")


@pytest.mark.slow
def test_chaos_drill_postgres_stall_and_replies_cut_after_commit(
        pg_url: str, tmp_path: Path) -> None:
    report = _drill(tmp_path, pg_url, "--workers", "3", "--jobs", "12", "--duration", "20",
                    *RATES, "--seed", "4", "--db-stall", "--cut-replies")
    names = {c["name"] for c in report["checks"]}
    assert {"a database stall requeued no live job",
            "a reply lost after its commit was not redone"} <= names
    assert report["metrics"]["replies_cut"] >= 1
    assert report["metrics"]["db_stall"]["ok"] is True


def test_cut_replies_on_sqlite_is_one_line_and_exit_2(sqlite_url: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "spotrun", "chaos", "--workers", "1",
                           "--jobs", "1", "--duration", "1", "--cut-replies"],
                          env=_env(tmp_path, sqlite_url), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "PostgreSQL" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_chaos_drill_db_restart(tmp_path: Path) -> None:
    try:
        chaos.PrivatePostgres.locate()
    except chaos.ChaosError as exc:
        if IN_CI:
            pytest.fail(str(exc))
        pytest.skip(f"no private PostgreSQL possible here: {exc}")
    # SPOTRUN_DATABASE_URL points elsewhere on purpose: --db-restart must ignore it.
    report = _drill(tmp_path, "sqlite:////nonexistent/ignored.db", "--workers", "3",
                    "--jobs", "10", "--duration", "15", *RATES, "--seed", "3",
                    "--db-restart")
    assert report["config"]["private_postgres"] is True
    restart = report["metrics"]["db_restart"]
    assert restart["stop_ok"] and restart["start_ok"] and restart["outage_seconds"] >= 2


@pytest.mark.slow
def test_ctrl_c_stops_workers_and_removes_temp_dirs(sqlite_url: str, tmp_path: Path) -> None:
    """Ctrl-C ends a long drill while it holds a worker frozen, even when the drill was
    started with SIGINT ignored, as the background jobs of a non-interactive shell are (a
    CI runner's, ``cmd &`` in a script): Python then raises no KeyboardInterrupt."""
    before = _temp_dirs(tmp_path)
    cmd = [sys.executable, "-m", "spotrun", "chaos", "--workers", "2", "--jobs", "6",
           "--duration", "600", "--seed", "4", "--freeze-rate", "1", "--sigterm-rate", "0",
           "--sigkill-rate", "0"]
    # stderr goes to a file: a pipe read only at the end could fill and block the drill.
    err_path = tmp_path / "chaos.err"
    with err_path.open("w") as err_file:
        proc = subprocess.Popen(["sh", "-c", 'trap "" INT; exec "$@"', "sh", *cmd],
                                env=_env(tmp_path, sqlite_url), stdout=subprocess.PIPE,
                                stderr=err_file, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the drill's running log: wait until a worker is frozen
            if "SIGSTOP" in line:
                break
        proc.send_signal(signal.SIGINT)
        # The drill would run for 600 s: ending at all is ending on the Ctrl-C.
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err_path.read_text()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not _leftovers(tmp_path)
    assert _temp_dirs(tmp_path) <= before
