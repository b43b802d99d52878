"""Scale-downs that spare busy workers: pod-deletion-cost against a loopback API server.

The server (kube_server.py) answers pod PATCH over HTTPS as the real API server does,
with tokens each bound to one pod; the workers are real processes that find it through
the in-cluster variables and a service-account folder, as in a pod.
"""

from __future__ import annotations

import itertools
import logging
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import Env, wait_until
from kube_server import COST, FakeKubeAPI
from spotrun import kube
from spotrun.jobs import JobState


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeKubeAPI]:
    folder = tmp_path / "kube"
    folder.mkdir()
    with FakeKubeAPI(folder) as server:
        yield server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _cost(api: FakeKubeAPI, pod: str, clock: Clock, **kw: float) -> kube.PodDeletionCost:
    sa = api.add_pod(pod)
    cluster = kube.InCluster.from_env(api.env(pod, sa))
    assert cluster is not None
    return kube.PodDeletionCost(cluster, clock=clock, **kw)


def test_idle_costs_least_and_unsaved_work_costs_more() -> None:
    idle = kube.deletion_cost([])
    just_checkpointed = kube.deletion_cost([0.0])
    busy = kube.deletion_cost([45.0])
    assert idle == kube.IDLE_COST < just_checkpointed < busy
    assert kube.deletion_cost([45.0, 30.0]) > busy  # two jobs lose more than one
    assert kube.deletion_cost([1e12]) == kube.MAX_COST  # the API server takes int32 only


def test_the_in_cluster_config_and_silence_outside_a_pod(api: FakeKubeAPI,
                                                         tmp_path: Path) -> None:
    sa = api.add_pod("worker-a")
    env = api.env("worker-a", sa)
    cluster = kube.InCluster.from_env(env)
    assert cluster == kube.InCluster(f"https://127.0.0.1:{api.port}", "spotrun", "worker-a",
                                     sa / "token", sa / "ca.crt")
    # HOSTNAME is the pod's name when the downward API variable is not set.
    no_name = {k: v for k, v in env.items() if k != "SPOTRUN_POD_NAME"}
    assert kube.InCluster.from_env({**no_name, "HOSTNAME": "other"}).pod == "other"  # type: ignore[union-attr]
    v6 = kube.InCluster.from_env({**env, "KUBERNETES_SERVICE_HOST": "fd00::1"})
    assert v6 is not None and v6.server == f"https://[fd00::1]:{api.port}"
    # Outside Kubernetes, or with no token mounted: nothing to do.
    assert kube.InCluster.from_env({}) is None
    assert kube.keep_deletion_cost(list, {}) is None
    no_token = {**env, "SPOTRUN_KUBERNETES_SERVICEACCOUNT_DIR": str(tmp_path / "none")}
    assert kube.InCluster.from_env(no_token) is None
    assert api.patches == []


def test_patches_only_its_own_pod_and_the_server_keeps_the_value(api: FakeKubeAPI) -> None:
    clock = Clock()
    a = _cost(api, "worker-a", clock)
    _cost(api, "worker-b", clock)
    assert a.update(0) and api.cost("worker-a") == 0
    assert a.update(17) is False  # too soon after the last PATCH
    clock.now += 2
    assert a.update(17) and api.cost("worker-a") == 17
    assert api.cost("worker-b") is None
    # The same token aimed at another pod is refused by the server, as RBAC refuses it.
    other = kube.PodDeletionCost(kube.InCluster(
        a.cluster.server, "spotrun", "worker-b", a.cluster.token_path, a.cluster.ca_path),
        clock=clock)
    assert other.update(5) is False and api.refused == [403]
    assert api.cost("worker-b") is None


def test_updates_are_rate_limited(api: FakeKubeAPI) -> None:
    clock = Clock()
    cost = _cost(api, "worker-a", clock, min_interval=2.0, refresh_interval=30.0)
    sent: list[tuple[float, int]] = []
    # Five minutes of a worker whose work changes every 0.1 s: busy with a growing cost,
    # idle for a moment every 7 s (short jobs).
    for i in range(3000):
        clock.now = 1000.0 + i * 0.1
        value = kube.IDLE_COST if i % 70 < 3 else 1 + i // 10
        if cost.update(value):
            sent.append((clock.now, value))
    times = [t for t, _ in sent]
    assert len(api.patches) == len(sent) == cost.patches
    assert all(b - a >= 2.0 - 1e-9 for a, b in itertools.pairwise(times))
    assert len(sent) <= 300 / 2.0 + 1
    # A busy cost that only grew waited for the refresh; idle <-> busy went at once.
    for (t0, v0), (t1, v1) in itertools.pairwise(sent):
        if (v0 == kube.IDLE_COST) == (v1 == kube.IDLE_COST):
            assert t1 - t0 >= 30.0 - 1e-9, (t0, v0, t1, v1)
    assert any(v == kube.IDLE_COST for _, v in sent[1:])
    assert [p.cost for p in api.patches] == [str(v) for _, v in sent]


def test_refusals_are_logged_once_and_backed_off(api: FakeKubeAPI,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    cost = _cost(api, "worker-a", clock)
    cost.cluster.token_path.write_text("revoked")
    with caplog.at_level(logging.WARNING, logger="spotrun.kube"):
        tries = 0
        for i in range(600):
            clock.now = 1000.0 + i
            before = len(api.refused)
            cost.update(i % 2 + 1)
            tries += len(api.refused) - before
    # Ten minutes of refusals: a backoff doubling to five minutes, one line in the log.
    assert 3 <= tries <= 12, tries
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "HTTP 401: Unauthorized" in lines[0], lines
    assert "revoked" not in lines[0]
    cost.cluster.token_path.write_text(next(t for t, p in api.tokens.items()
                                            if p == "worker-a"))
    clock.now += 301
    assert cost.update(9) and api.cost("worker-a") == 9


@pytest.mark.slow
def test_a_scale_down_takes_the_idle_worker_not_the_busy_one(
        env_factory: Callable[..., Env], pg_url: str, api: FakeKubeAPI) -> None:
    env = env_factory(pg_url)
    st = env.store()
    pods = {name: api.add_pod(name) for name in ("spotrun-worker-a", "spotrun-worker-b")}
    workers = {name: env.worker(name, **api.env(name, sa)) for name, sa in pods.items()}
    for w in workers.values():
        w.wait_ready()
    wait_until(lambda: all(api.cost(p) == kube.IDLE_COST for p in pods), 60,
               "both idle pods to report the idle cost")

    # A job with no checkpoint yet: all its work would be redone after a deletion.
    job_id = env.cli("submit", "sleep", "-p", "seconds=600", "-p", "steps=600").stdout.strip()
    wait_until(lambda: st.get(job_id, with_events=False).state is JobState.RUNNING, 60,
               "the job to start")
    busy = st.get(job_id, with_events=False).worker
    assert busy in pods
    idle = next(p for p in pods if p != busy)
    wait_until(lambda: (api.cost(busy) or 0) > kube.IDLE_COST, 30,
               "the busy pod's cost to rise", on_fail=workers[busy].log)
    assert api.cost(idle) == kube.IDLE_COST
    assert api.scale_down_order()[0] == idle

    # A worker outside Kubernetes (no in-cluster variables) says and sends nothing.
    outside = env.worker("outside", KUBERNETES_SERVICE_HOST="", KUBERNETES_SERVICE_PORT="")
    outside.wait_ready()
    patches = len(api.patches)

    # The job ends: the pod is idle again and the annotation says so.
    env.cli("cancel", job_id)
    wait_until(lambda: st.get(job_id, with_events=False).state.is_final, 60, "the cancel")
    wait_until(lambda: api.cost(busy) == kube.IDLE_COST, 30, "the pod to be idle again")
    assert all(p.pod in pods for p in api.patches) and len(api.patches) > patches
    assert api.refused == []
    assert COST not in outside.log() and "pod-deletion-cost" not in outside.log()
    for w in [*workers.values(), outside]:
        if w.proc.poll() is None:
            w.signal(signal.SIGTERM)
            assert w.wait(60) == 0, w.log()
    st.close()
