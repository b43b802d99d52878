"""The cloud preemption watchers, against local HTTP services that behave like the real
metadata services (tests/metadata_servers.py), and the whole path: a real worker process
hears the service, hands its job back within the deadline, and another worker resumes it."""

from __future__ import annotations

import http.client
import logging
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Env, wait_until
from metadata_servers import (
    AwsImds,
    AzureImds,
    FakeService,
    GceMetadata,
    closed_port,
)
from spotrun.config import ConfigError
from spotrun.jobs import EventKind, JobState
from spotrun.shutdown import Notice, ShutdownCoordinator
from spotrun.watchers import (
    AwsWatcher,
    AzureWatcher,
    Endpoint,
    GceWatcher,
    Watcher,
    detect_clouds,
    parse_sources,
    start_from_env,
    watchers_from_env,
)

GRACE = 30.0
MARGIN = 1.0
# Retry quickly so that a test sees several rounds of backoff in a fraction of a second.
FAST: dict[str, Any] = {"retry_initial": 0.02, "retry_cap": 0.1}
PREFIX = GceMetadata.PREFIX


@pytest.fixture
def coordinator() -> ShutdownCoordinator:
    exits: list[int] = []
    return ShutdownCoordinator(grace_seconds=GRACE, safety_margin=MARGIN,
                               exit_fn=exits.append)


@pytest.fixture
def started() -> Iterator[Callable[[Watcher], Watcher]]:
    """Start a watcher; every one started is stopped (and must stop) at the end."""
    made: list[Watcher] = []

    def start(w: Watcher) -> Watcher:
        made.append(w)
        return w.start()

    yield start
    for w in made:
        assert w.stop(5), f"{w} did not stop"


def ep(fake: FakeService | str) -> Endpoint:
    return Endpoint.parse(fake if isinstance(fake, str) else fake.url, "TEST_URL")


def budget(n: Notice) -> float:
    """The seconds the coordinator gave to hand work back."""
    return n.deadline_mono - n.received_mono


def raw_status(fake: FakeService, method: str, path: str,
               headers: dict[str, str] | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "spotrun.watchers" and r.levelno >= logging.WARNING]


# ------------------------------------------------------------- fake services


def test_fakes_refuse_requests_without_the_required_header() -> None:
    with GceMetadata() as gce, AwsImds() as aws, AzureImds() as azure:
        assert raw_status(gce, "GET", PREFIX + "preempted") == 403
        assert raw_status(gce, "GET", PREFIX + "preempted", {"Metadata-Flavor": "Google"}) \
            == 200
        assert raw_status(aws, "PUT", AwsImds.TOKEN) == 400
        assert raw_status(aws, "GET", AwsImds.ACTION) == 401
        assert raw_status(azure, "GET", AzureWatcher.EVENTS_PATH) == 400
        assert raw_status(azure, "GET", AzureWatcher.EVENTS_PATH, {"Metadata": "true"}) == 200


# ------------------------------------------------------------------------ GCE


def test_gce_preempted_is_a_notice_without_deadline(
        coordinator: ShutdownCoordinator, started: Callable[[Watcher], Watcher]) -> None:
    with GceMetadata() as gce:
        started(GceWatcher(coordinator, ep(gce), **FAST))
        wait_until(lambda: gce.hanging("preempted") and gce.hanging("maintenance-event"),
                   10, "hanging GETs of both keys")
        assert not coordinator.stopping
        for key in GceWatcher.KEYS:
            first, hanging = gce.seen(PREFIX + key)[:2]
            # A plain read first (for maintenance-event it is what makes GCE announce
            # events ahead), then a hanging GET from the ETag that read returned.
            assert first.query == {}
            assert hanging.query == {"wait_for_change": "true", "timeout_sec": "60",
                                     "last_etag": gce.etag(key)}
        assert all(r.headers.get("metadata-flavor") == "Google" for r in gce.requests)

        gce.set("preempted", "TRUE")
        assert coordinator.wait(10)
        n = coordinator.notice
        assert n is not None
        assert (n.source, n.reason, n.reported_deadline) == ("gce", "gce: preempted", None)
        assert budget(n) == pytest.approx(GRACE - MARGIN, abs=0.01)


def test_gce_hanging_get_is_renewed_and_maintenance_terminate_is_a_notice(
        coordinator: ShutdownCoordinator, started: Callable[[Watcher], Watcher]) -> None:
    with GceMetadata() as gce:
        started(GceWatcher(coordinator, ep(gce), timeout_sec=1, **FAST))
        # The server ends a hanging GET after timeout_sec with nothing new: ask again.
        wait_until(lambda: gce.hanging("maintenance-event") >= 2, 10, "a renewed GET")
        gce.set("maintenance-event", "MIGRATE_ON_HOST_MAINTENANCE")  # live migration
        n = gce.hanging("maintenance-event")
        wait_until(lambda: gce.hanging("maintenance-event") > n, 10, "the next GET")
        assert not coordinator.stopping
        gce.set("maintenance-event", "TERMINATE_ON_HOST_MAINTENANCE")
        assert coordinator.wait(10)
        assert coordinator.notice is not None
        assert coordinator.notice.source == "gce"
        assert "maintenance" in coordinator.notice.reason


# ------------------------------------------------------------------------ AWS


def test_aws_spot_interruption_is_a_notice_with_its_deadline(
        coordinator: ShutdownCoordinator, started: Callable[[Watcher], Watcher],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with AwsImds() as imds:
        started(AwsWatcher(coordinator, ep(imds), poll_seconds=0.05, **FAST))
        wait_until(lambda: len(imds.seen(AwsImds.ACTION)) >= 2, 10, "polls")
        assert not coordinator.stopping
        (put,) = imds.seen(AwsImds.TOKEN, "PUT")
        assert put.headers["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"
        (token,) = imds.issued()
        assert all(r.headers.get("x-aws-ec2-metadata-token") == token
                   for r in imds.seen(AwsImds.ACTION))

        deadline = int(time.time()) + 20  # AWS gives whole seconds
        imds.interrupt("terminate", deadline)
        assert coordinator.wait(10)
        n = coordinator.notice
        assert n is not None
        assert n.source == "aws" and "spot terminate" in n.reason
        assert n.reported_deadline == deadline
        assert budget(n) == pytest.approx(deadline - n.received_at - MARGIN, abs=0.01)
    assert token not in caplog.text


def test_aws_token_is_renewed_after_401(
        coordinator: ShutdownCoordinator, started: Callable[[Watcher], Watcher],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with AwsImds() as imds:
        w = started(AwsWatcher(coordinator, ep(imds), poll_seconds=0.05, **FAST))
        wait_until(lambda: len(imds.seen(AwsImds.ACTION)) >= 2, 10, "polls")
        imds.expire_tokens()
        wait_until(lambda: len(imds.seen(AwsImds.TOKEN, "PUT")) == 2, 10, "a new token")
        imds.interrupt("stop", time.time() + 30)
        assert coordinator.wait(10)
        assert coordinator.notice is not None
        assert "spot stop" in coordinator.notice.reason
        # A renewal is routine: no warning, no failed round.
        assert warnings_of(caplog) == [] and w.failures == 0
        assert not any(t in caplog.text for t in imds.issued())


def test_aws_rebalance_recommendation_advises_once_and_does_not_stop(
        coordinator: ShutdownCoordinator, started: Callable[[Watcher], Watcher]) -> None:
    advised: list[str] = []
    coordinator.on_advisory(advised.append)
    with AwsImds() as imds:
        started(AwsWatcher(coordinator, ep(imds), poll_seconds=0.05, **FAST))
        imds.rebalance(time.time())
        wait_until(lambda: advised, 10, "the advisory")
        n = len(imds.seen(AwsImds.ACTION))
        wait_until(lambda: len(imds.seen(AwsImds.ACTION)) >= n + 3, 10, "more polls")
        assert len(advised) == 1 and advised[0].startswith("aws: rebalance")
        assert not coordinator.stopping


def test_aws_notice_from_before_this_boot_is_ignored(
        coordinator: ShutdownCoordinator, started: Callable[[Watcher], Watcher]) -> None:
    with AwsImds() as imds:
        # A stop interruption's notice can outlive the stop; this one predates the boot.
        imds.interrupt("stop", time.time() - 600)
        started(AwsWatcher(coordinator, ep(imds), poll_seconds=0.05,
                           boot_time=time.time() - 60, **FAST))
        wait_until(lambda: len(imds.seen(AwsImds.ACTION)) >= 3, 10, "polls")
        assert not coordinator.stopping


# ---------------------------------------------------------------------- Azure


def test_azure_preempt_for_this_vm_is_a_notice_with_not_before(
        coordinator: ShutdownCoordinator, started: Callable[[Watcher], Watcher],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with AzureImds(vm_name="spot-vm-1") as imds:
        # No name given: the watcher asks the instance metadata for it.
        started(AzureWatcher(coordinator, ep(imds), poll_seconds=0.05, **FAST))
        wait_until(lambda: imds.seen(AzureImds.EVENTS), 10, "a poll")
        imds.schedule("Preempt", ["another-vm"], time.time() + 30)
        wait_until(lambda: "not this VM" in caplog.text, 10, "the event to be ignored")
        assert not coordinator.stopping

        not_before = int(time.time()) + 20  # Azure gives whole seconds
        imds.schedule("Preempt", ["SPOT-VM-1"], not_before)
        assert coordinator.wait(10)
        n = coordinator.notice
        assert n is not None
        assert n.source == "azure" and "Preempt" in n.reason
        assert n.reported_deadline == not_before
        assert budget(n) == pytest.approx(not_before - n.received_at - MARGIN, abs=0.01)
        assert all(r.headers.get("metadata") == "true" for r in imds.requests)
        assert imds.seen(AzureImds.NAME)[0].query == {"api-version": "2021-02-01",
                                                      "format": "text"}
        assert imds.seen(AzureImds.EVENTS)[0].query == {"api-version": "2020-07-01"}


def test_azure_reboot_advises_and_started_terminate_is_a_notice(
        coordinator: ShutdownCoordinator, started: Callable[[Watcher], Watcher]) -> None:
    advised: list[str] = []
    coordinator.on_advisory(advised.append)
    with AzureImds(vm_name="from-imds") as imds:
        started(AzureWatcher(coordinator, ep(imds), poll_seconds=0.05, vm_name="vm-a",
                             **FAST))
        imds.schedule("Reboot", ["vm-a"], time.time() + 900)
        wait_until(lambda: advised, 10, "the advisory")
        assert not coordinator.stopping
        imds.schedule("Terminate", ["vm-a"], None, status="Started")
        assert coordinator.wait(10)
        n = coordinator.notice
        assert n is not None and n.reported_deadline is None  # the grace applies
        assert not imds.seen(AzureImds.NAME)  # the name was given


# ------------------------------------------------------------ failing services


def _watcher(cloud: str, coordinator: ShutdownCoordinator, endpoint: Endpoint) -> Watcher:
    if cloud == "gce":
        return GceWatcher(coordinator, endpoint, **FAST)
    if cloud == "aws":
        return AwsWatcher(coordinator, endpoint, poll_seconds=0.05, **FAST)
    return AzureWatcher(coordinator, endpoint, poll_seconds=0.05, vm_name="vm", **FAST)


@pytest.mark.parametrize("cloud", ["gce", "aws", "azure"])
def test_unreachable_service_is_logged_once_and_retried(
        cloud: str, coordinator: ShutdownCoordinator,
        started: Callable[[Watcher], Watcher], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    w = started(_watcher(cloud, coordinator, ep(f"http://127.0.0.1:{closed_port()}")))
    wait_until(lambda: w.failures >= 4, 10, "retries")
    (warning,) = warnings_of(caplog)
    assert "connection refused" in warning and "retrying" in warning
    assert w.alive and not coordinator.stopping


@pytest.mark.parametrize(("cloud", "status"), [("gce", 403), ("aws", 401), ("azure", 400)])
def test_refusing_service_is_logged_once_then_recovers(
        cloud: str, status: int, coordinator: ShutdownCoordinator,
        started: Callable[[Watcher], Watcher], caplog: pytest.LogCaptureFixture) -> None:
    # What the worker sees when the header is missing or wrong (a proxy that strips it,
    # a token IMDS keeps refusing): a clear line, then it keeps trying.
    fake: FakeService = {"gce": GceMetadata, "aws": AwsImds, "azure": AzureImds}[cloud]()
    with fake:
        fake.fail_with = status
        w = started(_watcher(cloud, coordinator, ep(fake)))
        wait_until(lambda: w.failures >= 4, 10, "retries")
        (warning,) = warnings_of(caplog)
        assert f"HTTP {status}" in warning
        fake.fail_with = None
        wait_until(lambda: len(warnings_of(caplog)) == 2, 10, "recovery")
        assert "answers again" in warnings_of(caplog)[1]
        assert not coordinator.stopping


# -------------------------------------------------------------- configuration


def test_sources_are_parsed_and_bad_ones_refused() -> None:
    assert parse_sources(None) == (set(), True)
    assert parse_sources("") == (set(), True)
    assert parse_sources(" Signal, GCE ,") == ({"signal", "gce"}, False)
    assert parse_sources("auto,aws") == ({"aws"}, True)
    with pytest.raises(ConfigError, match=r"SPOTRUN_PREEMPTION_SOURCES.*'gcp'"):
        parse_sources("signal,gcp")


@pytest.mark.parametrize(("var", "value"), [
    ("GCE_METADATA_HOST", "http://metadata"),
    ("GCE_METADATA_HOST", "metadata:port"),
    ("AWS_EC2_METADATA_SERVICE_ENDPOINT", "169.254.169.254"),
    ("SPOTRUN_AWS_POLL_SECONDS", "soon"),
    ("SPOTRUN_AZURE_METADATA_URL", "ftp://x"),
    ("SPOTRUN_AZURE_POLL_SECONDS", "0"),
])
def test_bad_settings_name_their_variable(coordinator: ShutdownCoordinator, var: str,
                                          value: str) -> None:
    env = {"SPOTRUN_PREEMPTION_SOURCES": "gce,aws,azure", var: value}
    with pytest.raises(ConfigError, match=var):
        watchers_from_env(coordinator, env)


def _dmi(tmp_path: Path, **files: str) -> Path:
    d = tmp_path / "dmi"
    d.mkdir()
    for name, text in files.items():
        (d / name).write_text(text + "\n")
    return d


@pytest.mark.parametrize(("files", "expected"), [
    ({"product_name": "Google Compute Engine", "sys_vendor": "Google"}, ["gce"]),
    ({"sys_vendor": "Amazon EC2", "bios_vendor": "Amazon EC2"}, ["aws"]),
    ({"sys_vendor": "Xen", "bios_version": "4.11.amazon"}, ["aws"]),
    ({"sys_vendor": "Microsoft Corporation",
      "chassis_asset_tag": "7783-7084-3265-9085-8269-3286-77"}, ["azure"]),
    ({"sys_vendor": "QEMU", "product_name": "Standard PC (Q35 + ICH9, 2009)"}, []),
    ({}, []),
])
def test_clouds_are_detected_from_dmi(tmp_path: Path, files: dict[str, str],
                                      expected: list[str]) -> None:
    assert detect_clouds({}, _dmi(tmp_path, **files)) == expected


def test_clouds_are_detected_from_endpoint_variables(tmp_path: Path) -> None:
    env = {"GCE_METADATA_HOST": "127.0.0.1:1", "SPOTRUN_AZURE_METADATA_URL": "http://x"}
    assert detect_clouds(env, tmp_path / "none") == ["gce", "azure"]


def test_auto_off_cloud_starts_nothing_and_never_waits(
        coordinator: ShutdownCoordinator, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    t0 = time.monotonic()
    detect_clouds({})  # the real DMI files of this machine: must answer at once
    monkeypatch.setattr("spotrun.watchers.DMI_DIR", _dmi(tmp_path, sys_vendor="QEMU"))
    assert start_from_env(coordinator, {}) == []
    assert start_from_env(coordinator, {"SPOTRUN_PREEMPTION_SOURCES": "auto"}) == []
    assert time.monotonic() - t0 < 2.0


def test_start_from_env_starts_the_named_watchers_and_stop_cuts_hanging_gets(
        coordinator: ShutdownCoordinator) -> None:
    with GceMetadata() as gce:
        env = {"SPOTRUN_PREEMPTION_SOURCES": "signal,gce",
               "GCE_METADATA_HOST": f"127.0.0.1:{gce.port}"}
        (w,) = start_from_env(coordinator, env)
        try:
            assert isinstance(w, GceWatcher) and w.alive
            wait_until(lambda: gce.hanging("preempted") and gce.hanging("maintenance-event"),
                       10, "hanging GETs")
        finally:
            t0 = time.monotonic()
            assert w.stop(5)
        assert time.monotonic() - t0 < 2.0


def test_worker_refuses_a_bad_sources_value(env_factory: Callable[..., Env],
                                            sqlite_url: str) -> None:
    env = env_factory(sqlite_url, SPOTRUN_PREEMPTION_SOURCES="signal,gcp")
    proc = env.cli("worker", "--no-preload", check=False, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "spotrun: SPOTRUN_PREEMPTION_SOURCES='signal,gcp': unknown source 'gcp'; use a "
        "comma-separated list of signal, gce, aws, azure, or auto"]


# ------------------------------------------------------------------ whole path

NOTICE_LINE = re.compile(r"shutdown notice: (?P<reason>.+?); (?P<left>[\d.]+) s to hand work "
                         r"back")
EXIT_LINE = re.compile(r"worker w1 exits (?P<after>[\d.]+) s after the notice")
AHEAD = 8  # seconds between the flip and the deadline AWS and Azure announce


@pytest.mark.parametrize("cloud", ["gce", "aws", "azure"])
def test_worker_hands_its_job_back_on_the_clouds_notice(
        cloud: str, env_factory: Callable[..., Env], sqlite_url: str) -> None:
    env = env_factory(sqlite_url)
    store = env.store()
    fake: FakeService
    try:
        if cloud == "gce":
            fake = GceMetadata()
            grace = 20.0  # GCE names no deadline: the grace is the budget
            extra = {"GCE_METADATA_HOST": f"127.0.0.1:{fake.port}"}
        elif cloud == "aws":
            fake = AwsImds()
            grace = 60.0  # larger than the deadline, so the deadline sets the budget
            extra = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": fake.url,
                     "SPOTRUN_AWS_POLL_SECONDS": "0.1"}
        else:
            fake = AzureImds(vm_name="w1-vm")
            grace = 60.0
            extra = {"SPOTRUN_AZURE_METADATA_URL": fake.url,
                     "SPOTRUN_AZURE_POLL_SECONDS": "0.1"}
        with fake:
            w1 = env.worker("w1", SPOTRUN_PREEMPTION_SOURCES=cloud,
                            SPOTRUN_GRACE_SECONDS=str(grace), **extra)
            job_id = env.cli("submit", "sleep", "-p", "seconds=4", "-p",
                             "steps=40").stdout.strip()

            def running() -> bool:
                job = store.get(job_id, with_events=False)
                return job.state is JobState.RUNNING and job.worker == "w1" and \
                    job.progress.step >= 2

            wait_until(running, 60, "the job to run on w1", on_fail=w1.log)
            flipped = time.time()
            deadline = int(flipped) + AHEAD
            if isinstance(fake, GceMetadata):
                fake.set("preempted", "TRUE")
            elif isinstance(fake, AwsImds):
                fake.interrupt("terminate", deadline)
            else:
                fake.schedule("Preempt", ["w1-vm"], deadline)
            assert w1.wait(30) == 0, w1.log()
            took = time.time() - flipped

        log = w1.log()
        m = NOTICE_LINE.search(log)
        assert m is not None, log
        left = float(m["left"])
        assert m["reason"].startswith(f"{cloud}: ")
        if cloud == "gce":
            assert left == pytest.approx(grace - 1.0, abs=0.05)  # 1 s safety margin
        else:
            # The service's deadline, less the time the watcher took to hear it (a poll
            # of 0.1 s, on a busy machine) and the margin.
            # The log prints it to 0.1 s, hence the rounding allowance.
            assert deadline - flipped - 1.0 - 3.0 < left <= deadline - flipped - 1.0 + 0.05
        exit_line = EXIT_LINE.search(log)
        assert exit_line is not None, log
        assert float(exit_line["after"]) < left and took < left + 1.0

        job = store.get(job_id)
        assert job.state is JobState.QUEUED and job.preemptions == 1
        (handed,) = [e for e in job.events if e.kind == EventKind.PREEMPTED]
        assert "preempted" in handed.message and handed.worker == "w1"

        w2 = env.worker("w2", "--max-jobs", "1")
        assert w2.wait(60) == 0, w2.log()
        job = store.get(job_id)
        assert job.state is JobState.SUCCEEDED, job.to_json()
        assert job.result["resumed_from"] > 0
    finally:
        store.close()
