"""A drill's report: what it did, its checks, its numbers, as JSON and as text."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from spotrun.chaos.audit import Check
from spotrun.chaos.schedule import KILL_KINDS, Schedule


@dataclass
class Report:
    ok: bool
    checks: list[Check]
    metrics: dict[str, Any]
    config: dict[str, Any]
    schedule: Schedule
    notes: list[str] = field(default_factory=list)
    kept_logs: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [c.to_json() for c in self.checks],
                "metrics": self.metrics, "config": self.config, "notes": self.notes,
                "kept_logs": self.kept_logs, "schedule": self.schedule.to_json()}


GOODPUT_DEFINITION = (
    "useful compute seconds / paid worker seconds. Useful: what each succeeded job costs "
    "run uninterrupted (sleep: its seconds; digits-train: the wall time of its reference "
    "run; digits-infer: its last attempt, a single step). Paid: the lifetimes of all "
    "worker processes, from spawn to exit or to the moment the last job ended, idle time "
    "and start-up included, as a cloud bills them.")
WORK_LOST_DEFINITION = (
    "per interruption, the steps redone: the step the store last recorded when the job was "
    "handed back (SIGTERM) or its lease expired (SIGKILL, freeze), minus the step the next "
    "attempt resumed from; progress reaches the store with each heartbeat, so after a hard kill "
    "this is a lower bound. Seconds: after an expiry, the time from the attempt's last "
    "checkpoint (or its start) to the kill; after a hand-back, steps times the job's "
    "uninterrupted seconds per step.")

def quantiles(values: list[float]) -> dict[str, Any]:
    """Count, p50, p99 (nearest rank) and max of a sample, in seconds."""
    if not values:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    s = sorted(values)

    def rank(q: float) -> float:
        return round(s[max(0, math.ceil(q * len(s)) - 1)], 3)

    return {"count": len(s), "p50": rank(0.50), "p99": rank(0.99), "max": round(s[-1], 3)}


def format_report(r: Report) -> str:
    """The report as an operator reads it."""
    c, m = r.config, r.metrics
    mix = c["mix"]
    lines = [
        f"spotrun chaos drill: {c['workers']} workers, {c['jobs']} jobs "
        f"({mix['digits-train']} digits-train, {mix['digits-infer']} digits-infer, "
        f"{mix['sleep']} sleep), {c['duration']:g} s of chaos, seed {c['seed']} "
        f"(schedule {c['schedule_fingerprint']})",
        f"store: {c['store']}" + (" (a private PostgreSQL, restarted mid-drill)"
                                  if c["private_postgres"] else ""),
        f"workers: lease {c['lease_seconds']:g} s, heartbeat {c['heartbeat_seconds']:g} s, "
        f"grace {c['grace_seconds']:g} s; jobs: max_retries {c['max_retries']}",
        "",
        "what the drill did",
    ]
    k, ks = m["kills"], m["kills_scheduled"]
    hit = {kind: sum(1 for x in m["kill_log"] if x["kind"] == kind and x["job"])
           for kind in KILL_KINDS}
    lines += [
        f"  SIGTERM   {k['sigterm']} of {ks['sigterm']} scheduled, {hit['sigterm']} "
        f"interrupted a job; {m['sigterm_escalated_to_sigkill']} needed SIGKILL after the grace",
        f"  SIGKILL   {k['sigkill']} of {ks['sigkill']} scheduled, {hit['sigkill']} "
        "interrupted a job",
        f"  freeze    {k['freeze']} of {ks['freeze']} scheduled, {hit['freeze']} interrupted a "
        f"job (SIGSTOP {c['freeze_seconds']:g} s, past the lease, then SIGCONT)",
    ]
    db = m["db_restart"]
    if db:
        lines.append(f"  database  stopped at {db.get('stopped_at', 0):.1f} s, back at "
                     f"{db.get('started_at', float('nan')):.1f} s "
                     f"({db.get('outage_seconds', float('nan')):.1f} s without it)")
    stall = m.get("db_stall")
    if stall:
        lines.append(f"  stall     jobs locked from {stall.get('began_at', 0):.1f} s to "
                     f"{stall.get('ended_at', float('nan')):.1f} s")
    if c.get("cut_replies"):
        lines.append(f"  cuts      {m['replies_cut']} replies cut right after their commit")
    lines.append(f"  workers   {m['workers_started']} started ({c['workers']} + "
                 f"{m['replacements']} replacements); the drill took {m['wall_seconds']:.1f} s")
    lines += ["", "checks"]
    lines += [f"  {'ok  ' if x.ok else 'FAIL'}  {x.name}: {x.detail}" for x in r.checks]
    g, w = m["goodput"], m["work_lost"]
    ap, ae = w["after_preemption"], w["after_lease_expiry"]
    j = m["jobs"]
    lines += [
        "", "numbers",
        f"  jobs                 {j['succeeded']} succeeded, {j['failed']} failed, "
        f"{j['cancelled']} cancelled, {j['queued'] + j['running']} unfinished, of "
        f"{j['submitted']} submitted",
        f"  interruptions        {m['preemptions']} hand-backs on notice, "
        f"{m['lease_expiries']} lease expiries; {m['resumed_from_checkpoint']} resumed "
        f"from a checkpoint, {m['restarted_from_beginning']} restarted from the beginning",
        f"  fenced writes refused {m['fenced_writes_refused']}"
        + (" (" + ", ".join(f"{n} {kind}" for kind, n in sorted(
            m["fenced_writes_refused_by_write"].items())) + ")"
           if m["fenced_writes_refused"] else "")
        + ": zombie writes the store turned away",
        f"  goodput              {100 * g['ratio']:.1f} %: {g['useful_seconds']:.1f} s of "
        f"useful compute / {g['paid_worker_seconds']:.1f} s of paid worker time",
        f"  work lost            per hand-back on notice: {ap['steps_mean']:g} steps "
        f"(max {ap['steps_max']}), {ap['seconds_mean']:.2f} s ({ap['count']} hand-backs)",
        f"                       per lease expiry: {ae['steps_mean']:g} steps recorded "
        f"(max {ae['steps_max']}), {ae['seconds_mean']:.2f} s ({ae['count']} expiries)",
        "  " + _q("notice to exit", m["notice_to_exit_seconds"], "SIGTERMs"),
        "  " + _q("hand-back to resume", m["handback_to_resume_seconds"], "hand-backs"),
        "  " + _q("expiry to resume", m["lease_expiry_to_resume_seconds"], "expiries"),
        "  " + _q("kill to requeue", m["kill_to_requeue_seconds"], "hard kills of busy workers"),
        f"  expiries of live workers {len(m['lease_expiries_of_live_workers'])}"
        + (": " + ", ".join(f"{x['job']} on {x['worker']} at {x['at']:.1f} s"
                            + (" (database restart)" if x["during_db_restart"] else "")
                            for x in m["lease_expiries_of_live_workers"])
           if m["lease_expiries_of_live_workers"] else
           " (every expiry was of a worker the drill killed or froze)"),
        "",
        "  goodput: " + g["definition"],
        "  work lost: " + w["definition"],
    ]
    for note in r.notes:
        lines.append(f"  note: {note}")
    if r.kept_logs:
        lines.append(f"  worker logs kept in {r.kept_logs}")
    failed = [x for x in r.checks if not x.ok]
    lines += ["", f"result: PASS, all {len(r.checks)} checks passed" if not failed else
              f"result: FAIL, {len(failed)} of {len(r.checks)} checks failed: "
              + ", ".join(x.name for x in failed)]
    return "\n".join(lines)


def _q(label: str, q: dict[str, Any], what: str) -> str:
    if not q["count"]:
        return f"{label:<20} no samples"
    return (f"{label:<20} p50 {q['p50']:.2f} s, p99 {q['p99']:.2f} s, max {q['max']:.2f} s "
            f"({q['count']} {what})")

