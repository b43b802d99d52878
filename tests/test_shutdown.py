"""The shutdown coordinator: record-only handlers, the budget, bounded hooks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest

from spotrun.shutdown import ShutdownCoordinator


@pytest.fixture
def coordinator() -> Iterator[ShutdownCoordinator]:
    exits: list[int] = []
    c = ShutdownCoordinator(grace_seconds=15, safety_margin=1, exit_fn=exits.append)
    c.exits = exits  # type: ignore[attr-defined]
    yield c


def test_sigterm_is_recorded_and_becomes_a_notice(coordinator: ShutdownCoordinator) -> None:
    coordinator.install_signal_handlers()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert coordinator.wait(5)
        notice = coordinator.notice
        assert notice is not None and notice.reason == "SIGTERM" and notice.source == "signal"
        assert 12 < coordinator.time_left() <= 14
    finally:
        coordinator.uninstall_signal_handlers()


def test_second_signal_exits_at_once(coordinator: ShutdownCoordinator) -> None:
    coordinator.install_signal_handlers()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert coordinator.wait(5)
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 5
        while not coordinator.exits and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.01)
        assert coordinator.exits == [128 + signal.SIGINT]  # type: ignore[attr-defined]
    finally:
        coordinator.uninstall_signal_handlers()


def test_the_earlier_deadline_wins(coordinator: ShutdownCoordinator) -> None:
    coordinator.notify("aws: terminate", source="aws", deadline=time.time() + 5)
    assert 3.5 < coordinator.time_left() <= 4
    # A later notice can bring the deadline forward, never push it back.
    coordinator.notify("SIGTERM", source="signal")
    assert coordinator.time_left() <= 4
    coordinator.notify("gce", source="gce", deadline=time.time() + 3)
    assert coordinator.time_left() <= 2
    assert coordinator.notice is not None and coordinator.notice.reason == "aws: terminate"


def test_the_budget_runs_from_when_the_notice_arrived_not_from_when_it_was_seen(
        coordinator: ShutdownCoordinator) -> None:
    # A loaded machine may let the signal watcher run seconds after the signal.
    arrived = time.monotonic() - 4
    notice = coordinator.notify("SIGTERM", source="signal", since_mono=arrived)
    assert notice.received_mono == arrived
    assert notice.deadline_mono == pytest.approx(arrived + 15 - 1)
    assert 9.5 < coordinator.time_left() <= 10
    assert abs(notice.received_at - (time.time() - 4)) < 0.5


def test_hooks_run_once_in_order_and_failures_do_not_stop_the_rest(
        coordinator: ShutdownCoordinator) -> None:
    ran: list[tuple[str, float]] = []

    class Proxy:
        def graceful_terminate(self, time_left: float) -> None:
            ran.append(("proxy", time_left))

    def broken(time_left: float) -> None:
        ran.append(("broken", time_left))
        raise RuntimeError("boom")

    def hangs(time_left: float) -> None:
        ran.append(("hangs", time_left))
        threading.Event().wait(60)

    coordinator.register("proxy", Proxy(), order=30)
    coordinator.register("hangs", hangs, order=20, timeout=0.3)
    coordinator.register("broken", broken, order=10)
    with pytest.raises(ValueError):
        coordinator.register("proxy", Proxy())
    coordinator.notify("test")
    start = time.monotonic()
    outcome = coordinator.run_hooks()
    assert time.monotonic() - start < 2
    assert [name for name, _ in ran] == ["broken", "hangs", "proxy"]
    assert all(0 < left <= 14 for _, left in ran)
    assert outcome["broken"].startswith("error") and outcome["hangs"] == "timed out"
    assert outcome["proxy"] == "ok"
    assert coordinator.run_hooks() == {}  # once only


def test_notice_heard_while_the_main_thread_is_inside_a_long_c_call() -> None:
    # pbkdf2_hmac runs in C for a long time with the GIL released (as a GPU kernel or a
    # blocking read does) and never returns to the interpreter, so the Python-level handler
    # cannot run; the wake-up fd still tells the watcher thread at once.
    script = textwrap.dedent("""
        import sys, time
        from spotrun.shutdown import ShutdownCoordinator
        c = ShutdownCoordinator(grace_seconds=5)
        c.on_notice(lambda n: (print("notice", n.reason, flush=True)))
        c.install_signal_handlers()
        print("ready", flush=True)
        import hashlib
        hashlib.pbkdf2_hmac("sha256", b"x", b"y", 10**9)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        line = proc.stdout.readline().strip()
        assert line == "notice SIGTERM"
        assert time.monotonic() - sent < 5
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
