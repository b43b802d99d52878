"""``/metrics``: the Prometheus exposition of the queue, cheap at any size of the history."""

from __future__ import annotations

import threading

from spotrun.jobs import EventKind, JobState
from spotrun.service.preempt import LIVE_WORKER_STATES
from spotrun.store import JobStore

HANDOFF_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_FINAL_KINDS = (EventKind.SUCCEEDED.value, EventKind.FAILED.value, EventKind.CANCELLED.value)
# A hand-off not resumed after this many is forgotten (a bound on memory, not a rule).
_MAX_PENDING_HANDOFFS = 100_000


class Metrics:
    """The Prometheus exposition, cheap at any size of the history.

    Gauges of the live states come from two indexed counts; everything else is a counter
    kept in this process by reading only the events added since the last scrape (by
    primary key). The first scrape reads the history once.
    """

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._cursor = 0
        self._finished = {k: 0 for k in _FINAL_KINDS}
        self._preemptions = 0
        self._pending: dict[str, float] = {}  # job id -> when it was handed back
        self._handoffs = [0] * len(HANDOFF_BUCKETS)
        self._handoff_count = 0
        self._handoff_sum = 0.0

    def _follow(self) -> None:
        while True:
            batch = self.store.event_kinds_after(self._cursor)
            for event_id, job_id, kind, at in batch:
                self._cursor = event_id
                if kind in self._finished:
                    self._finished[kind] += 1
                    self._pending.pop(job_id, None)
                elif kind == EventKind.PREEMPTED.value:
                    self._preemptions += 1
                    if len(self._pending) < _MAX_PENDING_HANDOFFS:
                        self._pending[job_id] = at
                elif kind in (EventKind.STARTED.value, EventKind.RESUMED.value):
                    since = self._pending.pop(job_id, None)
                    if since is not None:
                        took = max(0.0, at - since)
                        self._handoff_count += 1
                        self._handoff_sum += took
                        for i, bound in enumerate(HANDOFF_BUCKETS):
                            if took <= bound:
                                self._handoffs[i] += 1
            if len(batch) < 5000:
                return

    def text(self) -> str:
        """The Prometheus text exposition of the queue's state."""
        with self._lock:
            self._follow()
            counts = self.store.count_by_state((JobState.QUEUED, JobState.RUNNING))
            live = self.store.list_workers(include_stopped=False)
            out = [
                "# HELP spotrun_jobs Jobs waiting or running, by state.",
                "# TYPE spotrun_jobs gauge",
                *(f'spotrun_jobs{{state="{s}"}} {n}' for s, n in sorted(counts.items())),
                "# HELP spotrun_queue_depth Jobs waiting for a worker.",
                "# TYPE spotrun_queue_depth gauge",
                f"spotrun_queue_depth {counts.get(JobState.QUEUED.value, 0)}",
                "# HELP spotrun_jobs_finished_total Jobs that ended, by final state.",
                "# TYPE spotrun_jobs_finished_total counter",
                *(f'spotrun_jobs_finished_total{{state="{k}"}} {n}'
                  for k, n in sorted(self._finished.items())),
                "# HELP spotrun_preemptions_total Jobs handed back on a preemption notice.",
                "# TYPE spotrun_preemptions_total counter",
                f"spotrun_preemptions_total {self._preemptions}",
                "# HELP spotrun_handoff_seconds Seconds from a job's hand-back on a "
                "preemption notice to its next start on a worker (hand-offs still waiting "
                "are not counted).",
                "# TYPE spotrun_handoff_seconds histogram",
                *(f'spotrun_handoff_seconds_bucket{{le="{bound}"}} {n}'
                  for bound, n in zip(HANDOFF_BUCKETS, self._handoffs, strict=True)),
                f'spotrun_handoff_seconds_bucket{{le="+Inf"}} {self._handoff_count}',
                f"spotrun_handoff_seconds_sum {self._handoff_sum:.6f}",
                f"spotrun_handoff_seconds_count {self._handoff_count}",
                "# HELP spotrun_workers Live workers by state.",
                "# TYPE spotrun_workers gauge"]
        by_state = {s: 0 for s in LIVE_WORKER_STATES}
        for w in live:
            by_state[w.state] = by_state.get(w.state, 0) + 1
        out += [f'spotrun_workers{{state="{s}"}} {n}' for s, n in sorted(by_state.items())]
        return "\n".join(out) + "\n"
