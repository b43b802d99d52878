"""``spotrun chaos``: kill workers every way a cloud can, then audit the store.

The drill starts N real ``spotrun worker`` processes on a store, submits a mix of jobs
(digits-train, digits-infer once a model exists, sleep), and for the chaos window sends
SIGTERM (a notice; SIGKILL if the worker outlives the grace period), SIGKILL (no notice) and
SIGSTOP past the lease, then SIGCONT (a frozen VM), restarting a private PostgreSQL on
request; on request too, it stalls the database (a lock on ``jobs`` held past a lease) and
cuts workers' connections right after the server's reply to a claim or a result (through a
loopback proxy, :mod:`spotrun.faultproxy`). An autoscaler's part: every worker that exits
is replaced. Once every job has ended it checks, from the store alone, that nothing was
lost, nothing ran to completion twice, every result came from the lease holder and every
digits-train result is bit-identical to an uninterrupted run; then it reports what the
chaos cost.

The schedule (jobs, their params and arrival times, the kills, the database restart) comes
from ``random.Random(seed)`` before anything starts, so a seed always gives the same
schedule; which process a kill lands on depends on which workers are up at that moment.

The package: :mod:`~spotrun.chaos.schedule` (what the drill will do),
:mod:`~spotrun.chaos.processes` (worker processes, a private PostgreSQL, free ports),
:mod:`~spotrun.chaos.drill` (doing it), :mod:`~spotrun.chaos.audit` (the checks, usable
on any store: ``spotrun audit``), :mod:`~spotrun.chaos.report` and
:mod:`~spotrun.chaos.cli` (``spotrun chaos``).
"""

from __future__ import annotations

from spotrun.chaos.audit import Check
from spotrun.chaos.cli import main
from spotrun.chaos.drill import (
    DB_OUTAGE_SECONDS,
    GRACE_SECONDS,
    HEARTBEAT_SECONDS,
    LEASE_SECONDS,
    Drill,
    KillRecord,
)
from spotrun.chaos.processes import ChaosError, PrivatePostgres, WorkerProc, find_postgres_bin
from spotrun.chaos.report import Report, format_report
from spotrun.chaos.schedule import KILL_KINDS, PlannedJob, PlannedKill, Schedule, make_schedule

__all__ = [
    "DB_OUTAGE_SECONDS", "GRACE_SECONDS", "HEARTBEAT_SECONDS", "KILL_KINDS", "LEASE_SECONDS",
    "ChaosError", "Check", "Drill", "KillRecord", "PlannedJob", "PlannedKill",
    "PrivatePostgres", "Report", "Schedule", "WorkerProc", "find_postgres_bin",
    "format_report", "main", "make_schedule",
]
