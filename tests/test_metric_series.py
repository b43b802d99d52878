"""A job's metric series (its training curve): bounded, thinned evenly, fenced; on both
databases."""

from __future__ import annotations

import itertools

import pytest

from spotrun.jobs import Progress
from spotrun.schema import jobs
from spotrun.store import MAX_METRIC_POINTS, Beat, JobStore, LeaseLost


def _claimed(store: JobStore) -> tuple[str, object]:
    job = store.submit("sleep", {"seconds": 0})
    wid = store.register_worker(name="w1", host="h", pid=1, pool="spot", has_cuda=False,
                                lease_seconds=30)
    got = store.claim(worker_id=wid, worker_name="w1", lease_seconds=30)
    assert got is not None
    return job.id, got[0]


@pytest.mark.parametrize("via", ["progress", "heartbeat"])
def test_the_series_stays_bounded_and_spans_the_whole_run(store: JobStore, via: str) -> None:
    job_id, lease = _claimed(store)
    steps = 4 * MAX_METRIC_POINTS + 7
    for step in range(1, steps + 1):
        metrics = {"loss": 1.0 / step, "acc": step / steps, "phase": "train", "flag": True}
        if via == "progress":
            store.save_progress(lease, step, steps, metrics)  # type: ignore[arg-type]
        else:  # the worker's way: progress rides on the beat
            got = store.beat(lease.worker_id, [Beat(lease, Progress(step, steps, metrics))],  # type: ignore[attr-defined]
                             30.0)
            assert got.held == {job_id: False}
    series = store.analytics.metric_series(job_id)
    assert MAX_METRIC_POINTS // 2 <= len(series) <= MAX_METRIC_POINTS
    got = [p.step for p in series]
    assert got == sorted(got) and got[0] == 1 and got[-1] == steps
    # Thinned evenly: each thinning keeps points near an even grid of MAX/2 over the whole
    # span, so no gap is wider than two of its cells (and the newest points are dense).
    gaps = [b - a for a, b in itertools.pairwise(got)]
    assert max(gaps) <= 2 * steps / (MAX_METRIC_POINTS // 2) + 1, gaps
    assert gaps[-1] == 1
    # Numbers only: the words and the booleans a pipeline reports are not curves.
    assert all(set(p.metrics) == {"loss", "acc"} for p in series)
    assert series[-1].metrics["loss"] == pytest.approx(1.0 / steps)
    assert {p.attempt for p in series} == {1}


def test_a_zombie_adds_no_point(store: JobStore) -> None:
    job_id, lease = _claimed(store)
    store.save_progress(lease, 1, 10, {"loss": 0.5})  # type: ignore[arg-type]
    with store.engine.begin() as conn:  # another attempt took the job over
        conn.execute(jobs.update().where(jobs.c.id == job_id).values(attempt=2))
    with pytest.raises(LeaseLost):
        store.save_progress(lease, 2, 10, {"loss": 0.4})  # type: ignore[arg-type]
    assert [p.step for p in store.analytics.metric_series(job_id)] == [1]
    assert store.analytics.metric_series("no-such-job") == []
