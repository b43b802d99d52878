"""Fair shares of the fleet: one user's 500 jobs do not make everyone else wait, and a
running quota caps a user's share. On both databases."""

from __future__ import annotations

from conftest import Env, wait_until
from spotrun.store import JobStore


def _claim(store: JobStore, worker: str) -> tuple[str, str | None] | None:
    wid = store.register_worker(name=worker, host="test", pid=1, pool="spot",
                                has_cuda=False, lease_seconds=60)
    got = store.claim(worker_id=wid, worker_name=worker, lease_seconds=60)
    if got is None:
        return None
    return got[0].job_id, got[1].owner


def test_the_claim_shares_running_jobs_out_by_owner(store: JobStore) -> None:
    queued = {"a": [store.submit("sleep", {}, owner="a").id for _ in range(20)],
              "b": [store.submit("sleep", {}, owner="b").id for _ in range(3)],
              None: [store.submit("sleep", {}).id for _ in range(2)]}  # an operator's
    urgent = store.submit("sleep", {}, priority=5).id
    assert _claim(store, "w0") == (urgent, None)  # above 0 goes first, whoever owns it
    running: dict[str | None, int] = {"a": 0, "b": 0, None: 1}
    for i in range(1, 16):
        got = _claim(store, f"w{i}")
        assert got is not None
        job_id, owner = got
        # Each claim goes to an owner with the fewest running jobs among those waiting,
        # and inside an owner first in, first out (ids within one millisecond are not
        # ordered: the clock is the order).
        waiting = [o for o, ids in queued.items() if ids]
        assert running[owner] == min(running[o] for o in waiting), (i, owner, running)
        created = {j: store.get(j, with_events=False).created_at for j in queued[owner]}
        assert created[job_id] == min(created.values())
        queued[owner].remove(job_id)
        running[owner] += 1
    assert running == {"a": 10, "b": 3, None: 3}


def test_a_running_quota_caps_a_users_share(store: JobStore) -> None:
    store.set_quota("a", {"max_running": 2})
    for _ in range(5):
        store.submit("sleep", {}, owner="a")
    got = [_claim(store, f"w{i}") for i in range(4)]
    assert [g is not None for g in got] == [True, True, False, False]
    store.submit("sleep", {}, owner="b")
    assert _claim(store, "w9") is not None  # another user still gets the free worker


def test_a_latecomer_is_not_stuck_behind_500_jobs(env: Env) -> None:
    """User A queues 500 jobs, then user B queues 5; with 4 workers, each of B's jobs
    starts before A's next 8 do."""
    store = env.store()
    workers = [env.worker(f"w{i}") for i in range(4)]
    for w in workers:
        w.wait_ready()
    for _ in range(500):
        store.submit("sleep", {"seconds": 0.2, "steps": 1}, owner="a")
    wait_until(lambda: len(store.list_jobs(owner="a", state=None, limit=500)) == 500
               and sum(1 for j in store.list_jobs(owner="a", limit=500)
                       if j.state.value != "queued") >= 8, 60, "A's first jobs to run")
    after = store.last_event_id()
    bs = {store.submit("sleep", {"seconds": 0.2, "steps": 1}, owner="b").id
          for _ in range(5)}

    def starts() -> list[str]:
        found = []
        for _eid, job_id, kind, _at in store.analytics.event_kinds_after(after):
            if kind in ("started", "resumed"):
                found.append("b" if job_id in bs else "a")
        return found

    wait_until(lambda: starts().count("b") == 5, 60, "B's jobs to start",
               on_fail=lambda: str(starts()))
    seen = starts()
    last_b = max(i for i, o in enumerate(seen) if o == "b")
    assert seen[:last_b].count("a") < 8, seen
    env.stop_all()
    store.close()
