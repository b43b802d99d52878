"""The drill: real ``spotrun worker`` processes on a store, killed every way a cloud can
(SIGTERM, SIGKILL, SIGSTOP past the lease), a database restarted, stalled or cut off
after its replies; every worker that exits is replaced. Once every job has ended it audits
the store (:mod:`spotrun.chaos.audit`) and measures what the chaos cost.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spotrun.chaos.audit import (
    Check,
    Interruption,
    check_completed_once,
    check_fenced,
    interruptions,
)
from spotrun.chaos.processes import (
    ChaosError,
    PrivatePostgres,
    WorkerProc,
    last_line,
    pdeathsig_prefix,
)
from spotrun.chaos.report import (
    GOODPUT_DEFINITION,
    WORK_LOST_DEFINITION,
    Report,
    quantiles,
)
from spotrun.chaos.schedule import KILL_KINDS, PlannedJob, Schedule
from spotrun.config import Settings
from spotrun.faultproxy import PgProxy
from spotrun.jobs import EventKind, JobState
from spotrun.pipelines.registry import validate_submission
from spotrun.store import (
    DatabaseError,
    JobRecord,
    JobStore,
    StoreError,
    redact,
)

# Short leases so that a drill of a minute sees several expiries; the heartbeat leaves six
# beats of slack per lease on a loaded machine.
LEASE_SECONDS = 3.0
HEARTBEAT_SECONDS = 0.5
GRACE_SECONDS = 10.0
# A freeze lasts past the lease by more than one sweep period, so a live worker's sweep has
# certainly requeued the job when the frozen one wakes up as a zombie.
FREEZE_PAST_LEASE = 2.0
DB_OUTAGE_SECONDS = 2.0
# A stall of twice a lease: long enough that every lease lapses by the database's clock.
DB_STALL_SECONDS = 2 * LEASE_SECONDS
# The statements whose replies --cut-replies loses: a claim, and a result (with its claim).
CUT_MARKERS = (b"spotrun_next_job", b"fin_event")
# A kill finds no victim while every worker is starting, frozen or already stopping; it
# waits for one, this long at most past the window.
KILL_LATE_SECONDS = 5.0
# Kills alone must never fail a job: the drill checks the work survives them.
MAX_RETRIES = 100
TICK = 0.05
POLL_SECONDS = 0.5
TORCH_THREADS = "1"  # the same in workers and the reference run: bit-identity depends on it

Echo = Callable[[str], object]
DB_ERRORS: tuple[type[BaseException], ...] = (DatabaseError,)

@dataclass
class KillRecord:
    at: float  # seconds into the drill
    wall: float  # time.time(), to compare with the store's event times
    kind: str
    worker: str
    job: str | None  # the job the store said the worker was running, if any


class Drill:
    def __init__(self, settings: Settings, schedule: Schedule, *, pg: PrivatePostgres | None,
                 echo: Echo | None) -> None:
        self.settings = settings
        self.schedule = schedule
        self.pg = pg
        self.echo = echo
        self.n = schedule.workers
        self.workspace = Path(tempfile.mkdtemp(prefix="spotrun-chaos-"))
        self.log_dir = self.workspace / "logs"
        self.log_dir.mkdir()
        self.tag = secrets.token_hex(4)  # keeps this run's idempotency keys its own
        self.url = settings.database_url
        self.checkpoint_url = settings.checkpoint_url
        self.store: JobStore | None = None
        self.procs: list[WorkerProc] = []
        self.slots: list[WorkerProc | None] = [None] * self.n
        self.generation = [0] * self.n
        self.ids: dict[str, str] = {}  # planned key -> job id
        self.final: dict[str, JobState] = {}  # job id -> final state, as last polled
        self.pending_kills = list(schedule.kills)
        self.kills: list[KillRecord] = []
        self.escalated: list[str] = []
        self.unexpected: list[tuple[str, int | None, str]] = []
        # Worker name -> the job it holds, from the jobs table (the workers table keeps a
        # zombie's current_job after its lease expired, so it is not asked).
        self.busy: dict[str, str] = {}
        self.db_down_since: float | None = None
        self.db_restart: dict[str, Any] | None = None
        self._db_began_mono = self._db_stopped_mono = 0.0
        self.proxy: PgProxy | None = None  # between the workers and the database
        self.db_stall: dict[str, Any] | None = None
        self.pending_cuts = list(schedule.cuts)
        self.cuts_armed = 0
        self.reference_proc: subprocess.Popen[bytes] | None = None
        self.notes: list[str] = []
        self.t0 = 0.0
        self.wall0 = 0.0
        self.work_end: float | None = None
        self.timed_out = False
        self._last_status = 0.0

    # --------------------------------------------------------------------- helpers

    def now(self) -> float:
        return time.monotonic() - self.t0

    def say(self, msg: str) -> None:
        if self.echo is not None:
            self.echo(f"{self.now():7.1f} s  {msg}" if self.t0 else f"  setup    {msg}")

    def worker_env(self) -> dict[str, str]:
        url = self.url if self.proxy is None else self.proxy.url_for(self.url)
        return {**os.environ,
                "SPOTRUN_HOME": str(self.settings.home),
                "SPOTRUN_DATABASE_URL": url,
                "SPOTRUN_CHECKPOINT_URL": self.checkpoint_url,
                "SPOTRUN_PREEMPTION_SOURCES": "signal",
                "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": TORCH_THREADS,
                "MKL_NUM_THREADS": TORCH_THREADS}

    def worker_cmd(self) -> list[str]:
        # --no-preload: most drill jobs are sleeps, and a worker that never runs a digits
        # job then never pays for importing torch (it matters on small CI machines).
        return [sys.executable, "-m", "spotrun", "worker", "--no-preload",
                "--lease-seconds", f"{LEASE_SECONDS:g}",
                "--heartbeat-seconds", f"{HEARTBEAT_SECONDS:g}",
                "--grace-seconds", f"{GRACE_SECONDS:g}"]

    def spawn(self, slot: int) -> WorkerProc:
        self.generation[slot] += 1
        w = WorkerProc(slot, self.generation[slot], self.worker_cmd(), self.worker_env(),
                       self.log_dir)
        self.procs.append(w)
        self.slots[slot] = w
        return w

    # ------------------------------------------------------------------------- run

    def run(self) -> Report:
        if self.pg is not None:
            self.url = self.pg.create()
            self.checkpoint_url = str(self.workspace / "checkpoints")
            self.say(f"private PostgreSQL up on 127.0.0.1:{self.pg.port}")
        self.store = JobStore.open(self.url)
        if self.schedule.cuts:
            if not self.store.is_postgres:
                raise ChaosError("--cut-replies cuts connections to a database server: use "
                                 "PostgreSQL (or --db-restart, which runs one)")
            self.proxy = PgProxy(self.store.server_port or 5432)
        self._preflight()
        self.t0, self.wall0 = time.monotonic(), time.time()
        self._start_references()
        for slot in range(self.n):
            self.spawn(slot)
        self.say(f"{self.n} workers started; chaos for {self.schedule.duration:g} s")
        settle = self._settle_bound()
        next_poll = 0.0
        while True:
            now = self.now()
            self._reap(now)
            self._escalate()
            if now < self.schedule.duration + KILL_LATE_SECONDS:
                self._fire_kills(now)
            self._db_restart_step(now)
            self._db_stall_step(now)
            self._cut_step(now)
            self._submit_due(now)
            if now >= next_poll:
                next_poll = now + POLL_SECONDS
                self._poll()
                if self._all_done():
                    if self.work_end is None:
                        self.work_end = now
                        self.say("every job has ended")
                    if now >= self.schedule.duration and self._quiet():
                        break
            if now >= self.schedule.duration + settle:
                self.timed_out = True
                self.say(f"gave up waiting: jobs still not ended {settle:.0f} s after the "
                         "chaos window")
                break
            time.sleep(TICK)
        if self.work_end is None:
            self.work_end = self.now()
        self._teardown()
        refs = self._collect_references()
        return self._audit(refs)

    def _settle_bound(self) -> float:
        work = sum(float(j.params.get("seconds", 5.0)) for j in self.schedule.jobs)
        return 60.0 + 3.0 * work / self.n

    def _quiet(self) -> bool:
        """Nothing of the drill's own still in flight: no freeze, no notice, no outage."""
        restarted = self.pg is None or self.schedule.db_restart_at is None or (
            self.db_restart is not None and "started_at" in self.db_restart)
        stalled = self.schedule.db_stall_at is None or (
            self.db_stall is not None and "ended_at" in self.db_stall)
        restarted = restarted and stalled and not self.pending_cuts
        kills_done = not self.pending_kills or \
            self.now() >= self.schedule.duration + KILL_LATE_SECONDS
        return restarted and kills_done and not any(
            w.alive and (w.frozen_until is not None or w.term_sent is not None)
            for w in self.procs)

    def _preflight(self) -> None:
        assert self.store is not None
        counts = self.store.analytics.count_by_state()
        unfinished = counts.get("queued", 0) + counts.get("running", 0)
        live = len(self.store.list_workers(include_stopped=False))
        if unfinished or live:
            self.notes.append(
                f"the store already held {unfinished} unfinished jobs and {live} live "
                "workers: the drill's workers may run those jobs and other workers the "
                "drill's; run drills on a store of their own")

    # ---------------------------------------------------------------- references

    def _start_references(self) -> None:
        """Uninterrupted reference runs, once per distinct params, in a child process.

        A child, with the workers' environment (threads above all), so that the reference
        is computed exactly as an uninterrupted worker would; it runs during the drill,
        mostly asleep in step delays, and a Ctrl-C there cleans up its temporary files.
        """
        distinct: dict[str, dict[str, Any]] = {}
        for j in self.schedule.jobs:
            if j.pipeline == "digits-train":
                distinct.setdefault(_params_key(j.params), j.params)
        if not distinct:
            return
        src = self.workspace / "references.in.json"
        src.write_text(json.dumps([{"key": k, "params": p} for k, p in distinct.items()]))
        with open(src, "rb") as stdin, open(self.workspace / "references.out", "wb") as out, \
                open(self.workspace / "references.err", "wb") as err:
            self.reference_proc = subprocess.Popen(
                [*pdeathsig_prefix(), sys.executable, "-m", "spotrun.chaos", "--reference"],
                stdin=stdin, stdout=out, stderr=err, env=self.worker_env(),
                start_new_session=True)

    def _collect_references(self) -> dict[str, dict[str, Any]]:
        proc = self.reference_proc
        if proc is None:
            return {}
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        found: dict[str, dict[str, Any]] = {}
        text = (self.workspace / "references.out").read_text(errors="replace")
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                found[str(item["key"])] = item
        if proc.returncode != 0 and not found:
            err = (self.workspace / "references.err").read_text(errors="replace")
            found["__error__"] = {"error": last_line(err)}
        return found

    # -------------------------------------------------------------------- workers

    def _reap(self, now: float) -> None:
        for slot, w in enumerate(self.slots):
            if w is None or w.alive:
                continue
            caused = w.killed or w.term_sent is not None
            if not caused and not w.teardown:
                tail = last_line(w.log())
                if not w.ever_ready:
                    tail = f"at start, before it was ready: {tail}"
                self.unexpected.append((w.name, w.exit_code, tail))
                self.say(f"worker {w.name} exited on its own (code {w.exit_code}): {tail}")
                # A worker that cannot even start would be replaced forever: stop there.
                if len(self.unexpected) >= 3 and not any(p.ever_ready for p in self.procs):
                    raise ChaosError(f"workers exit as they start: {tail}")
            elif w.term_sent is not None and not w.killed:
                self.say(f"worker {w.name} exited {w.exit_code} "
                         f"{w.exited_at - w.term_sent if w.exited_at else 0:.2f} s after "
                         "its SIGTERM")
            new = self.spawn(slot)
            self.say(f"replacement worker {new.name} started")

    def _thaw(self, w: WorkerProc) -> None:
        if w.frozen_until is not None:
            w.signal(signal.SIGCONT)
            w.frozen_until = None
            self.say(f"SIGCONT {w.name}: it wakes up after its lease expired")

    def _escalate(self) -> None:
        mono = time.monotonic()
        for w in self.procs:
            if not w.alive:
                continue
            if (w.term_sent is not None and not w.killed and not w.teardown
                    and mono - w.term_sent > GRACE_SECONDS):
                # Exactly what the cloud does once the notice period is over.
                w.killed = True
                w.signal(signal.SIGKILL)
                self.escalated.append(w.name)
                self.say(f"SIGKILL {w.name}: still running {GRACE_SECONDS:g} s after SIGTERM")

    def _pick_victim(self, slot: int) -> WorkerProc | None:
        order = [self.slots[(slot + i) % self.n] for i in range(self.n)]
        ready = [w for w in order if w is not None and w.ready and not w.targeted]
        busy = [w for w in ready if w.name in self.busy]
        # A kill that interrupts a job tests more than one that hits an idle worker.
        return busy[0] if busy else ready[0] if ready else None

    def _fire_kills(self, now: float) -> None:
        while self.pending_kills and self.pending_kills[0].at <= now:
            kill = self.pending_kills[0]
            w = self._pick_victim(kill.slot)
            if w is None:
                return  # nobody to kill yet: try again next tick
            self.pending_kills.pop(0)
            job = self.busy.get(w.name)
            what = f"running job {job}" if job else "idle"
            if kill.kind == "sigterm":
                w.term_sent = time.monotonic()
                w.signal(signal.SIGTERM)
                self.say(f"SIGTERM {w.name} ({what}); SIGKILL if alive after "
                         f"{GRACE_SECONDS:g} s")
            elif kill.kind == "sigkill":
                w.killed = True
                w.signal(signal.SIGKILL)
                self.say(f"SIGKILL {w.name} ({what})")
            else:
                freeze = LEASE_SECONDS + FREEZE_PAST_LEASE
                w.frozen_until = time.monotonic() + freeze
                w.signal(signal.SIGSTOP)
                # On a timer of its own: on SQLite a worker frozen inside a write
                # transaction holds the write lock, and a submit of this loop then waits on
                # it; the thaw must not wait behind that submit.
                w.thaw_timer = threading.Timer(freeze, self._thaw, args=(w,))
                w.thaw_timer.daemon = True
                w.thaw_timer.start()
                self.say(f"SIGSTOP {w.name} ({what}) for {freeze:g} s, past its lease")
            self.kills.append(KillRecord(round(now, 2), time.time(), kill.kind, w.name, job))

    # ------------------------------------------------------------------ database

    def _db_restart_step(self, now: float) -> None:
        at = self.schedule.db_restart_at
        if self.pg is None or at is None or now < at:
            return
        if self.db_restart is None:
            self.say("stopping the private PostgreSQL (pg_ctl stop -m fast)")
            began, began_mono = round(self.now(), 2), time.monotonic()
            ok = self.pg.stop("fast")
            self.db_restart = {"stopped_at": began, "stop_ok": ok}
            self._db_began_mono, self._db_stopped_mono = began_mono, time.monotonic()
            if not ok:
                self.say(f"pg_ctl stop failed: {self.pg.log_tail()}")
        elif "started_at" not in self.db_restart and \
                time.monotonic() - self._db_stopped_mono >= DB_OUTAGE_SECONDS:
            # Down for DB_OUTAGE_SECONDS after the stop completed; the outage reported runs
            # from the stop's first disconnects to the server accepting connections again.
            ok = self.pg.start() or self.pg.start()
            self.db_restart.update(started_at=round(self.now(), 2), start_ok=ok,
                                   outage_seconds=round(time.monotonic()
                                                        - self._db_began_mono, 2))
            self.say("private PostgreSQL back up" if ok else
                     f"the private PostgreSQL did not come back: {self.pg.log_tail()}")

    def _db_stall_step(self, now: float) -> None:
        at = self.schedule.db_stall_at
        if at is None or now < at or self.db_stall is not None:
            return
        self.db_stall = {"began_at": round(now, 2)}
        self.say(f"stalling the database for {DB_STALL_SECONDS:g} s (a lock on jobs held "
                 "past the lease)")
        # On a thread: the drill's own writes to jobs wait on the lock too.
        threading.Thread(target=self._stall, daemon=True).start()

    def _stall(self) -> None:
        assert self.store is not None and self.db_stall is not None
        try:
            self.store.stall_writes(DB_STALL_SECONDS)
            self.db_stall["ok"] = True
        except Exception as exc:
            self.db_stall.update(ok=False, error=last_line(str(exc)))
        self.db_stall["ended_at"] = round(self.now(), 2)

    def _cut_step(self, now: float) -> None:
        while self.pending_cuts and self.pending_cuts[0] <= now and self.proxy is not None:
            self.pending_cuts.pop(0)
            for marker in CUT_MARKERS:
                self.proxy.cut_after_reply(marker)
            self.cuts_armed += len(CUT_MARKERS)
            self.say("armed a cut of the next claim's and the next result's reply")

    def _db(self, fn: Callable[[], Any]) -> Any:
        """Run a store call; during an outage return None and try again next time."""
        try:
            value = fn()
        except DB_ERRORS:
            if self.db_down_since is None:
                self.db_down_since = self.now()
            return None
        if self.db_down_since is not None:
            self.say(f"the drill reaches the database again "
                     f"({self.now() - self.db_down_since:.1f} s without it)")
            self.db_down_since = None
        return value

    # ------------------------------------------------------------------------ jobs

    def _submit_due(self, now: float) -> None:
        for j in self.schedule.jobs:
            if j.key in self.ids or j.at is None or j.at > now:
                continue
            if self._db(functools.partial(self._submit, j, j.params)) is None:
                return

    def _submit(self, j: PlannedJob, params: dict[str, Any]) -> str:
        assert self.store is not None
        _pipe, clean, cuda = validate_submission(j.pipeline, params, self.store)
        job = self.store.submit(
            j.pipeline, clean, priority=j.priority, max_retries=MAX_RETRIES,
            # The drill runs only spot workers: escalation to on-demand would strand jobs.
            max_preemptions=MAX_RETRIES,
            requires_cuda=cuda, checkpoint_every_steps=j.checkpoint_every_steps,
            # A submit whose reply a database restart cut off is retried: the key makes
            # the retry find the job instead of queueing a second one.
            idempotency_key=f"chaos-{self.tag}-{j.key}")
        self.ids[j.key] = job.id
        return job.id

    def _poll(self) -> None:
        assert self.store is not None
        store = self.store
        busy: dict[str, str] = {}
        for key, job_id in list(self.ids.items()):
            if job_id in self.final:
                continue
            job = self._db(functools.partial(store.get, job_id, with_events=False))
            if job is None:
                return
            if job.state is JobState.RUNNING and job.worker:
                busy[job.worker] = job.id
            if job.state.is_final:
                self.final[job_id] = job.state
                if job.state is not JobState.SUCCEEDED:
                    self.say(f"job {key} ({job_id}) ended {job.state.value}: {job.error}")
        self.busy = busy
        for j in self.schedule.jobs:
            if j.key in self.ids or j.model_of is None:
                continue
            model = self.ids.get(j.model_of)
            if model is not None and self.final.get(model) is JobState.SUCCEEDED and \
                    self._db(functools.partial(self._submit, j, {**j.params, "model": model})
                             ) is None:
                return
        if self.echo is not None and self.now() - self._last_status >= 5.0:
            self._last_status = self.now()
            done = sum(1 for s in self.final.values() if s.is_final)
            alive = sum(1 for w in self.slots if w is not None and w.alive)
            n_busy = sum(1 for w in self.slots if w is not None and w.name in self.busy)
            self.say(f"{done} of {len(self.schedule.jobs)} jobs ended, "
                     f"{len(self.ids)} submitted; {alive} workers up, {n_busy} busy")

    def _all_done(self) -> bool:
        if len(self.ids) < len(self.schedule.jobs):
            # An infer job whose model failed can never be submitted: do not wait for it.
            waiting = [j for j in self.schedule.jobs if j.key not in self.ids]
            for j in waiting:
                model = self.ids.get(j.model_of or "")
                if j.model_of is None or model is None or model not in self.final or \
                        self.final[model] is JobState.SUCCEEDED:
                    return False
        return all(i in self.final for i in self.ids.values())

    # -------------------------------------------------------------------- teardown

    def _stop_all(self) -> None:
        """Thaw and SIGTERM every live worker (a SIGTERM lets it hand its job back)."""
        for w in self.procs:
            if w.thaw_timer is not None:
                w.thaw_timer.cancel()
            if w.alive:
                w.teardown = True
                w.signal(signal.SIGCONT)
                w.frozen_until = None
                w.signal(signal.SIGTERM)

    def _teardown(self) -> None:
        """Stop the fleet gracefully (the queue is empty); SIGKILL whatever lingers."""
        self._stop_all()
        give_up = time.monotonic() + GRACE_SECONDS + 2
        for w in self.procs:
            if not w.join(max(0.0, give_up - time.monotonic())):
                w.signal(signal.SIGKILL)
                w.join(10)

    def abort(self) -> None:
        """After a Ctrl-C or an error: stop every child, quickly but without orphans."""
        self._stop_all()
        proc = self.reference_proc
        if proc is not None and proc.poll() is None:
            # SIGINT: a KeyboardInterrupt in the child removes its temporary directory.
            proc.send_signal(signal.SIGINT)
        give_up = time.monotonic() + 3.0
        for w in self.procs:
            if not w.join(max(0.0, give_up - time.monotonic())):
                w.signal(signal.SIGKILL)
                w.join(5)
        if proc is not None:
            try:
                proc.wait(max(0.5, give_up - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def cleanup(self, keep_logs_in: Path | None = None) -> str | None:
        """Remove every temporary directory; keep the worker logs where asked."""
        kept = None
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.close()
        if keep_logs_in is not None:
            try:
                keep_logs_in.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(self.log_dir, keep_logs_in)
                kept = str(keep_logs_in)
            except OSError:
                kept = None
        if self.proxy is not None:
            self.proxy.close()
        if self.pg is not None:
            self.pg.destroy()
        shutil.rmtree(self.workspace, ignore_errors=True)
        return kept

    # ----------------------------------------------------------------------- audit

    def _audit(self, refs: dict[str, dict[str, Any]]) -> Report:
        assert self.store is not None
        jobs = self._fetch_jobs()
        checks: list[Check] = []
        sched = self.schedule
        n_planned = len(sched.jobs)

        missing = [j for j in sched.jobs if j.key not in self.ids]
        detail = f"{n_planned - len(missing)} of {n_planned} planned jobs submitted"
        if missing:
            detail += "; never submitted: " + ", ".join(
                f"{j.key} (its model {j.model_of} did not succeed)" if j.model_of else j.key
                for j in missing)
        checks.append(Check("every planned job submitted", not missing, detail))

        gone = [k for k, i in self.ids.items() if i not in jobs]
        open_ = [f"{k} {jobs[i].state.value}" for k, i in self.ids.items()
                 if i in jobs and not jobs[i].state.is_final]
        detail = f"all {len(self.ids)} submitted jobs exist and ended"
        if gone or open_:
            detail = "; ".join(filter(None, [
                f"missing from the store: {', '.join(gone)}" if gone else "",
                f"not ended{' (gave up waiting)' if self.timed_out else ''}: "
                + ", ".join(open_) if open_ else ""]))
        checks.append(Check("no job lost", not gone and not open_, detail))

        bad = [f"{k} {jobs[i].state.value}: {jobs[i].error}" for k, i in self.ids.items()
               if i in jobs and jobs[i].state.is_final
               and jobs[i].state is not JobState.SUCCEEDED]
        n_ok = sum(1 for i in self.ids.values()
                   if i in jobs and jobs[i].state is JobState.SUCCEEDED)
        most = max((j.attempt for j in jobs.values()), default=0)
        checks.append(Check("every job succeeded", not bad and n_ok == len(self.ids),
                             f"{n_ok} of {len(self.ids)} succeeded, in up to {most} attempts"
                             + ("; " + "; ".join(bad) if bad else "")))

        labelled = {k: jobs[i] for k, i in self.ids.items() if i in jobs}
        checks.append(check_completed_once(labelled))
        checks.append(check_fenced(labelled))
        checks.append(self._check_identical(jobs, refs))

        terms = [w for w in self.procs if w.term_sent is not None]
        # A worker noticed during the stall cannot reach the database before its deadline:
        # it exits 1 inside the grace and its lease brings the job back, as it should.
        stalled = [w for w in terms if w.exit_code == 1 and w.name not in self.escalated
                   and self._stall_overlaps(w.term_sent)]
        late = [f"{w.name} (needed SIGKILL)" if w.name in self.escalated else
                f"{w.name} (exit code {w.exit_code})"
                for w in terms if (w.name in self.escalated or w.exit_code != 0)
                and w not in stalled]
        slowest = max((w.exited_at - w.term_sent for w in terms
                       if w.exited_at is not None and w.term_sent is not None), default=0.0)
        checks.append(Check(
            "SIGTERMed workers handed back and exited 0 within the grace period", not late,
            f"{len(terms) - len(late)} of {len(terms)} did (slowest {slowest:.2f} s, grace "
            f"{GRACE_SECONDS:g} s)" + ("; not: " + ", ".join(late) if late else "")
            + (f"; {len(stalled)} noticed during the database stall exited 1 inside the "
               "grace, their leases bringing the jobs back" if stalled else "")))

        detail = "every worker exit was a kill of the drill's"
        if self.unexpected:
            detail = "; ".join(f"{n} exited {c} unasked: {t}" for n, c, t in self.unexpected)
        elif self.pg is not None:
            detail += ", including through the database restart"
        checks.append(Check("no worker died unless killed", not self.unexpected, detail))

        done = {k: sum(1 for r in self.kills if r.kind == k) for k in KILL_KINDS}
        asked = {k: sum(1 for r in sched.kills if r.kind == k) for k in KILL_KINDS}
        checks.append(Check(
            "every scheduled kill carried out", done == asked,
            ", ".join(f"{k} {done[k]} of {asked[k]}" for k in KILL_KINDS)
            + ("" if done == asked else " (no ready worker to kill in time)")))

        if self.pg is not None:
            r = self.db_restart or {}
            ok = bool(r.get("stop_ok") and r.get("start_ok"))
            detail = (f"stopped at {r['stopped_at']:.1f} s, back at {r['started_at']:.1f} s "
                      f"({r['outage_seconds']:.1f} s without a database)" if ok else
                      f"restart incomplete: {r or 'never reached its time'}")
            checks.append(Check("database restarted mid-drill", ok, detail))

        if self.schedule.db_stall_at is not None:
            checks.append(self._check_stall(jobs))
        if self.schedule.cuts:
            checks.append(self._check_cuts(jobs))

        metrics = self._metrics(jobs, refs)
        config = {"workers": self.n, "jobs": n_planned, "duration": sched.duration,
                  "seed": sched.seed, "schedule_fingerprint": sched.fingerprint(),
                  "store": redact(self.url), "private_postgres": self.pg is not None,
                  "lease_seconds": LEASE_SECONDS, "heartbeat_seconds": HEARTBEAT_SECONDS,
                  "grace_seconds": GRACE_SECONDS,
                  "freeze_seconds": LEASE_SECONDS + FREEZE_PAST_LEASE,
                  "max_retries": MAX_RETRIES, "cut_replies": bool(sched.cuts),
                  "mix": {p: sched.count(p) for p in ("digits-train", "digits-infer", "sleep")}}
        return Report(all(c.ok for c in checks), checks, metrics, config, sched,
                      notes=list(self.notes))

    def _stall_overlaps(self, term_sent: float | None) -> bool:
        """Whether a notice at ``term_sent`` (monotonic) had its grace during the stall."""
        r = self.db_stall or {}
        if term_sent is None or "began_at" not in r:
            return False
        at = term_sent - self.t0
        end = float(r.get("ended_at", float("inf")))
        return at <= end and at + GRACE_SECONDS >= float(r["began_at"])

    def _check_stall(self, jobs: dict[str, JobRecord]) -> Check:
        """The stall ran, and no live worker's job was requeued during it or just after."""
        r = self.db_stall or {}
        name = "a database stall requeued no live job"
        if not r.get("ok"):
            return Check(name, False, f"the stall did not run: {r or 'never reached its time'}")
        lo, hi = float(r["began_at"]), float(r["ended_at"]) + LEASE_SECONDS + 1.0
        hit = [x for x in self._live_expiries(jobs) if lo <= float(x["at"]) <= hi]
        detail = (f"jobs locked from {lo:.1f} s to {float(r['ended_at']):.1f} s; "
                  + ("no lease of a live worker expired" if not hit else
                     "expired: " + ", ".join(f"{x['job']} on {x['worker']} at {x['at']:.1f} s"
                                             for x in hit)))
        return Check(name, not hit, detail)

    def _check_cuts(self, jobs: dict[str, JobRecord]) -> Check:
        """Replies were cut after their commit, and none of them cost a live job a retry."""
        assert self.proxy is not None
        cut = len(self.proxy.cut)
        live = self._live_expiries(jobs)
        # A claim whose reply is lost and not found again leaks its job until the lease
        # expires: an expiry of a live worker's job that no other fault explains.
        unexplained = [x for x in live if not x["during_db_restart"] and not (
            self.db_stall and "ended_at" in self.db_stall
            and float(self.db_stall["began_at"]) <= float(x["at"])
            <= float(self.db_stall["ended_at"]) + LEASE_SECONDS + 1.0)]
        ok = cut >= 1 and not unexplained
        detail = (f"{cut} of {self.cuts_armed} armed cuts happened (a claim's or a result's "
                  "reply lost after its commit); "
                  + ("no live worker's lease expired for it" if not unexplained else
                     "expired: " + ", ".join(f"{x['job']} on {x['worker']} at {x['at']:.1f} s"
                                             for x in unexplained)))
        return Check("a reply lost after its commit was not redone", ok, detail)

    def _live_expiries(self, jobs: dict[str, JobRecord]) -> list[dict[str, Any]]:
        """Lease expiries the drill did not cause: the worker was neither killed, frozen
        nor gone. They cost a retry and the work since the last checkpoint; they come from
        a database outage longer than a lease, or a heartbeat starved of CPU."""
        stopped: dict[str, float] = {}
        for k in self.kills:
            if k.kind != "sigterm":
                stopped[k.worker] = min(stopped.get(k.worker, k.wall), k.wall)
        for w in self.procs:
            if w.exited_wall is not None:
                stopped[w.name] = min(stopped.get(w.name, w.exited_wall), w.exited_wall)
        keys = {i: k for k, i in self.ids.items()}
        out = []
        for i, job in jobs.items():
            for e in job.events:
                if e.kind == EventKind.LEASE_EXPIRED and \
                        stopped.get(e.worker or "", float("inf")) > e.at.timestamp():
                    at = e.at.timestamp() - self.wall0
                    out.append({"job": keys.get(i, i), "worker": e.worker,
                                "attempt": e.attempt, "at": round(at, 2),
                                "during_db_restart": self._in_outage(at)})
        return sorted(out, key=lambda x: float(x["at"]))

    def _in_outage(self, at: float) -> bool:
        """Whether drill time ``at`` falls in the restart's outage or the lease after it."""
        r = self.db_restart or {}
        if "stopped_at" not in r:
            return False
        end = float(r.get("started_at", r["stopped_at"])) + LEASE_SECONDS + 1.0
        return float(r["stopped_at"]) <= at <= end

    def _fetch_jobs(self) -> dict[str, JobRecord]:
        assert self.store is not None
        store = self.store
        out: dict[str, JobRecord] = {}
        give_up = time.monotonic() + 60
        for job_id in self.ids.values():
            while True:
                try:
                    job = store.get(job_id)
                    assert isinstance(job, JobRecord)
                    out[job_id] = job
                    break
                except DB_ERRORS:
                    if time.monotonic() > give_up:
                        raise
                    time.sleep(0.5)
                except StoreError:
                    break  # not found: reported as lost
        return out

    def _check_identical(self, jobs: dict[str, JobRecord],
                         refs: dict[str, dict[str, Any]]) -> Check:
        name = "digits-train results bit-identical to an uninterrupted run"
        trains = [j for j in self.schedule.jobs if j.pipeline == "digits-train"]
        if not trains:
            return Check(name, True, "no digits-train jobs in this drill (torch missing)")
        if "__error__" in refs:
            return Check(name, False, f"reference runs failed: {refs['__error__']['error']}")
        wrong, compared, interrupted = [], 0, 0
        for j in trains:
            job = jobs.get(self.ids.get(j.key, ""))
            if job is None or job.state is not JobState.SUCCEEDED:
                continue
            ref = refs.get(_params_key(j.params), {})
            got = (job.result or {}).get("weights_sha256")
            want = ref.get("weights_sha256")
            compared += 1
            interrupted += job.attempt > 1
            if want is None:
                wrong.append(f"{j.key}: no reference ({ref.get('error', 'not computed')})")
            elif got != want:
                wrong.append(f"{j.key} (attempt {job.attempt}): weights_sha256 "
                             f"{str(got)[:12]}… != reference {want[:12]}…")
        detail = (f"{compared - len(wrong)} of {compared} match their reference "
                  f"({interrupted} ran in more than one attempt; "
                  f"{len({_params_key(j.params) for j in trains})} distinct params)")
        if wrong:
            detail += "; " + "; ".join(wrong)
        return Check(name, not wrong and compared == len(trains), detail)

    # --------------------------------------------------------------------- metrics

    def _metrics(self, jobs: dict[str, JobRecord],
                 refs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        plan = {j.key: j for j in self.schedule.jobs}
        by_id = {i: plan[k] for k, i in self.ids.items()}
        useful = 0.0
        per_step: dict[str, float] = {}
        for i, job in jobs.items():
            u = _useful_seconds(job, by_id[i], refs)
            useful += u if job.state is JobState.SUCCEEDED else 0.0
            total = job.progress.total or 1
            per_step[i] = u / total if total else 0.0
        end = self.t0 + (self.work_end or self.now())
        paid = sum(max(0.0, min(w.exited_at or end, end) - w.started) for w in self.procs)

        stops: dict[str, list[float]] = {}
        for k in self.kills:
            if k.kind != "sigterm":
                stops.setdefault(k.worker, []).append(k.wall)
        lost: dict[str, list[Interruption]] = {"preempted": [], "lease_expired": []}
        unparsed = 0
        for i, job in jobs.items():
            found, bad = interruptions(job.events, per_step[i], stops, LEASE_SECONDS)
            unparsed += bad
            for x in found:
                lost[x.kind].append(x)
        handoff = [x.gap for x in lost["preempted"] if x.gap is not None]
        requeue_to_resume = [x.gap for x in lost["lease_expired"] if x.gap is not None]
        notice = [w.exited_at - w.term_sent for w in self.procs
                  if w.term_sent is not None and w.exited_at is not None
                  and w.name not in self.escalated]
        detect = _kill_to_requeue(self.kills, jobs)
        live_expiries = self._live_expiries(jobs)
        refused = refused_lines(self.log_dir)

        def lost_summary(rows: list[Interruption]) -> dict[str, Any]:
            return {"count": len(rows),
                    "steps_mean": round(sum(x.steps for x in rows) / len(rows), 2)
                    if rows else 0,
                    "steps_max": max((x.steps for x in rows), default=0),
                    "seconds_mean": round(sum(x.seconds for x in rows) / len(rows), 3)
                    if rows else 0.0,
                    "seconds_total": round(sum(x.seconds for x in rows), 2)}

        all_lost = lost["preempted"] + lost["lease_expired"]
        return {
            "wall_seconds": round(self.now(), 1),
            "kills": {k: sum(1 for r in self.kills if r.kind == k) for k in KILL_KINDS},
            "kills_scheduled": {k: sum(1 for r in self.schedule.kills if r.kind == k)
                                for k in KILL_KINDS},
            "kills_that_hit_a_job": sum(1 for r in self.kills if r.job),
            "sigterm_escalated_to_sigkill": len(self.escalated),
            "kill_log": [asdict(r) | {"wall": round(r.wall, 3)} for r in self.kills],
            "workers_started": len(self.procs),
            "replacements": len(self.procs) - self.n,
            "db_restart": self.db_restart,
            "db_stall": self.db_stall,
            "replies_cut": 0 if self.proxy is None else len(self.proxy.cut),
            "jobs": {s.value: sum(1 for j in jobs.values() if j.state is s)
                     for s in JobState} | {"submitted": len(self.ids),
                                           "planned": len(self.schedule.jobs)},
            "preemptions": sum(j.preemptions for j in jobs.values()),
            "lease_expiries": sum(1 for j in jobs.values() for e in j.events
                                  if e.kind == EventKind.LEASE_EXPIRED),
            "retries": sum(j.retries for j in jobs.values()),
            "resumed_from_checkpoint": sum(1 for j in jobs.values() for e in j.events
                                           if e.kind == EventKind.RESUMED),
            "restarted_from_beginning": sum(1 for j in jobs.values() for e in j.events
                                            if e.kind == EventKind.STARTED and e.attempt > 1),
            "fenced_writes_refused": sum(refused.values()),
            "fenced_writes_refused_by_write": refused,
            "goodput": {"ratio": round(useful / paid, 4) if paid else 0.0,
                        "useful_seconds": round(useful, 2),
                        "paid_worker_seconds": round(paid, 2),
                        "definition": GOODPUT_DEFINITION},
            "work_lost": {"after_preemption": lost_summary(lost["preempted"]),
                          "after_lease_expiry": lost_summary(lost["lease_expired"]),
                          "per_interruption_seconds_mean": round(
                              sum(x.seconds for x in all_lost) / len(all_lost), 3)
                          if all_lost else 0.0,
                          "unparsed_events": unparsed,
                          "definition": WORK_LOST_DEFINITION},
            "notice_to_exit_seconds": quantiles(notice),
            "handback_to_resume_seconds": quantiles(handoff),
            "lease_expiry_to_resume_seconds": quantiles(requeue_to_resume),
            "kill_to_requeue_seconds": quantiles(detect),
            "lease_expiries_of_live_workers": live_expiries,
        }


def _params_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def _useful_seconds(job: JobRecord, plan: PlannedJob,
                    refs: dict[str, dict[str, Any]]) -> float:
    if plan.pipeline == "sleep":
        return float(plan.params["seconds"])
    if plan.pipeline == "digits-train":
        ref = refs.get(_params_key(plan.params), {})
        if "seconds" in ref:
            return float(ref["seconds"])
        return job.run_seconds
    claims = [e for e in job.events if e.kind in (EventKind.STARTED, EventKind.RESUMED)]
    ends = [e for e in job.events if e.kind == EventKind.SUCCEEDED]
    if claims and ends:
        return max(0.0, (ends[-1].at - claims[-1].at).total_seconds())
    return job.run_seconds


def _kill_to_requeue(kills: list[KillRecord], jobs: dict[str, JobRecord]) -> list[float]:
    """Seconds from a SIGKILL or freeze to the sweep requeueing the job the worker held."""
    out = []
    for k in kills:
        job = jobs.get(k.job or "")
        if k.kind == "sigterm" or job is None:
            continue
        exp = next((e for e in job.events if e.kind == EventKind.LEASE_EXPIRED
                    and e.worker == k.worker and e.at.timestamp() >= k.wall - 1.0), None)
        if exp is not None:
            out.append(max(0.0, exp.at.timestamp() - k.wall))
    return out


# The store's LeaseLost words, as the worker logs them: "<write> of job <id> refused".
_REFUSED = re.compile(r"([a-z-]+(?: (?:pointer|result))?) of job \S+ refused")


def refused_lines(log_dir: Path) -> dict[str, int]:
    """Worker log lines reporting a fenced write refused, by the kind of write."""
    counts: dict[str, int] = {}
    for path in sorted(log_dir.glob("worker-*.log")):
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                # Only the store's fencing message: "connection refused" is an outage.
                m = _REFUSED.search(line) if "refused" in line else None
                if m is not None:
                    counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts

