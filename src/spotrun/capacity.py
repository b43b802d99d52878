"""Whether any live worker could run a job: said on its page, in ``show``, and at submit.

A worker takes a job when the job needs no CUDA or the worker has it, and the job names no
pool or the worker's (the claim's rule, store.py). A job that names a pool with no live
worker, or needs CUDA that no live worker of its pool has, waits for ever unless someone
starts one; saying so beats a queue that looks merely slow. A job with no such need and no
worker at all is not flagged: it waits for the first worker, as any queue does.
"""

from __future__ import annotations

from collections.abc import Sequence

from spotrun.jobs import Job, Worker

LIVE_STATES = frozenset({"idle", "busy"})


def unrunnable_reason(requires_cuda: bool, pool: str | None,
                      workers: Sequence[Worker]) -> str | None:
    """Why no live worker can run a job with these needs, or None if one can (or the job
    has no need a worker could lack)."""
    if not requires_cuda and pool is None:
        return None
    live = [w for w in workers if w.state in LIVE_STATES]
    in_pool = [w for w in live if pool is None or w.pool == pool]
    if any(w.has_cuda or not requires_cuda for w in in_pool):
        return None
    if pool is not None and not in_pool:
        need = "a GPU worker in pool" if requires_cuda else "a worker in pool"
        return (f"no live worker can run this job: it runs only on pool {pool!r}, which has "
                f"no live worker (start {need} {pool!r}: `spotrun worker --pool {pool}`)")
    where = f" in pool {pool!r}" if pool is not None else ""
    return (f"no live worker can run this job: it needs CUDA and no live worker{where} has "
            "a GPU (start a worker on a machine with one)")


def job_unrunnable(job: Job, workers: Sequence[Worker]) -> str | None:
    """:func:`unrunnable_reason` for a job that has not ended (None for one that has)."""
    from spotrun.store import JobRecord  # start-up: the CLI imports this module at once

    if job.state.is_final:
        return None
    pool = job.pool if isinstance(job, JobRecord) else None
    return unrunnable_reason(job.requires_cuda, pool, workers)
