"""The shutdown coordinator: hears every kind of notice, keeps the budget, runs the hooks.

One per process. Signal handlers only record the signal; a watcher thread, woken through
``signal.set_wakeup_fd`` even while the main thread sits in a long C call, turns it into a
notice. Cloud metadata watchers call :meth:`ShutdownCoordinator.notify` with the deadline
they learnt. Components that must act before the process ends register a hook; each hook
runs once, bounded, after the worker has handed its jobs back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

log = logging.getLogger("spotrun.shutdown")


@runtime_checkable
class GracefulTerminate(Protocol):
    """A component that wants to act before the process ends (close, flush, deregister)."""

    def graceful_terminate(self, time_left: float) -> None: ...


@dataclass(frozen=True)
class Notice:
    """A warning that this process or machine is going away."""

    reason: str  # "SIGTERM", "gce: preempted", "aws: spot terminate at ...", ...
    source: str  # "signal", "gce", "aws", "azure", "api", ...
    received_at: float  # time.time()
    received_mono: float  # time.monotonic(), for the budget
    deadline_mono: float  # when the worker must have exited (monotonic)
    reported_deadline: float | None = None  # wall-clock deadline the source gave, if any


@dataclass(order=True)
class _Hook:
    order: int
    name: str = field(compare=False)
    fn: Callable[[float], None] = field(compare=False)
    timeout: float = field(compare=False, default=2.0)
    done: bool = field(compare=False, default=False)


class ShutdownCoordinator:
    """Records notices, computes the deadline, and runs the registered hooks once."""

    def __init__(self, *, grace_seconds: float = 15.0, safety_margin: float = 1.0,
                 exit_fn: Callable[[int], None] = os._exit) -> None:
        self.grace_seconds = grace_seconds
        self.safety_margin = safety_margin
        self._exit = exit_fn
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._notice: Notice | None = None
        self._listeners: list[Callable[[Notice], None]] = []
        self._advisories: list[Callable[[str], None]] = []
        self._hooks: list[_Hook] = []
        self._hooks_ran = False
        self._signals_seen = 0
        self._first_signal_mono: float | None = None
        self._installed: dict[int, object] = {}
        self._wakeup_r: socket.socket | None = None
        self._wakeup_w: socket.socket | None = None
        self._old_wakeup_fd = -1
        self._watcher: threading.Thread | None = None

    # ---------------------------------------------------------------- notices

    @property
    def notice(self) -> Notice | None:
        return self._notice

    @property
    def stopping(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    def time_left(self) -> float:
        n = self._notice
        if n is None:
            return float("inf")
        return n.deadline_mono - time.monotonic()

    def notify(self, reason: str, *, source: str = "api", deadline: float | None = None,
               since_mono: float | None = None) -> Notice:
        """Record a notice (thread-safe). ``deadline`` is a wall-clock time, if known;
        ``since_mono`` when the notice arrived, if earlier than now (a signal).

        The first notice sets the budget: the earlier of notice + grace and the reported
        deadline, minus the safety margin. A later notice can only bring it forward.
        """
        now_wall, now_mono = time.time(), time.monotonic()
        if since_mono is not None and since_mono < now_mono:
            # The grace runs from the signal, not from when a busy machine let this
            # thread see it.
            now_wall, now_mono = now_wall - (now_mono - since_mono), since_mono
        limit = now_mono + self.grace_seconds
        if deadline is not None:
            limit = min(limit, now_mono + (deadline - now_wall))
        limit -= self.safety_margin
        with self._lock:
            old = self._notice
            if old is not None and old.deadline_mono <= limit:
                return old
            notice = Notice(reason, source, now_wall, now_mono, limit, deadline)
            if old is not None:
                notice = Notice(old.reason, old.source, old.received_at, old.received_mono,
                                limit, deadline)
            self._notice = notice
            listeners = list(self._listeners)
        self._event.set()
        if old is None:
            by = (f"deadline given by {source}" if deadline is not None
                  and deadline - now_wall < self.grace_seconds else "grace period")
            log.warning("shutdown notice: %s; %.1f s to hand work back (%s)", reason,
                        max(0.0, notice.deadline_mono - time.monotonic()), by)
        for fn in listeners:
            try:
                fn(notice)
            except Exception:
                log.exception("shutdown listener failed")
        return notice

    def advise(self, reason: str) -> None:
        """An early warning that does not stop the process (e.g. AWS rebalance)."""
        log.warning("advisory: %s", reason)
        for fn in list(self._advisories):
            try:
                fn(reason)
            except Exception:
                log.exception("advisory listener failed")

    def on_notice(self, fn: Callable[[Notice], None]) -> None:
        with self._lock:
            self._listeners.append(fn)
            notice = self._notice
        if notice is not None:
            fn(notice)

    def on_advisory(self, fn: Callable[[str], None]) -> None:
        self._advisories.append(fn)

    # ---------------------------------------------------------------- signals

    def install_signal_handlers(
        self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)
    ) -> None:
        """Install handlers that only record; must be called from the main thread."""
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._wakeup_r.setblocking(True)
        self._wakeup_w.setblocking(False)
        self._old_wakeup_fd = signal.set_wakeup_fd(self._wakeup_w.fileno(),
                                                   warn_on_full_buffer=False)
        for signum in signals:
            self._installed[signum] = signal.signal(signum, self._record_signal)
        self._watcher = threading.Thread(target=self._watch_wakeup_fd,
                                         name="spotrun-signal-watcher", daemon=True)
        self._watcher.start()

    def uninstall_signal_handlers(self) -> None:
        for signum, old in self._installed.items():
            signal.signal(signum, old)  # type: ignore[arg-type]
        self._installed.clear()
        signal.set_wakeup_fd(self._old_wakeup_fd)
        if self._wakeup_w is not None:
            self._wakeup_w.close()

    def _record_signal(self, signum: int, frame: object) -> None:
        # Runs in the main thread between bytecodes. Record only: the wake-up fd has
        # already told the watcher thread, which does everything else. The time is the
        # budget's start: on a loaded machine the watcher may only run later.
        if self._first_signal_mono is None:
            self._first_signal_mono = time.monotonic()
        self._signals_seen += 1

    def _watch_wakeup_fd(self) -> None:
        assert self._wakeup_r is not None
        count = 0
        while True:
            try:
                data = self._wakeup_r.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                count += 1
                name = _signal_name(signum)
                if count == 1:
                    self.notify(name, source="signal", since_mono=self._first_signal_mono)
                else:
                    log.error("second signal (%s): exiting now", name)
                    flush_logs()
                    self._exit(128 + signum)

    # ------------------------------------------------------------------ hooks

    def register(self, name: str, hook: GracefulTerminate | Callable[[float], None], *,
                 order: int = 100, timeout: float = 2.0) -> None:
        """Register a hook, run once after the work is handed back, lowest order first.

        The hook is given the seconds left and bounded by ``timeout`` and the deadline.
        """
        fn = hook.graceful_terminate if isinstance(hook, GracefulTerminate) else hook
        with self._lock:
            if any(h.name == name for h in self._hooks):
                raise ValueError(f"a shutdown hook named {name!r} is registered already")
            self._hooks.append(_Hook(order, name, fn, timeout))

    def unregister(self, name: str) -> None:
        with self._lock:
            self._hooks = [h for h in self._hooks if h.name != name]

    def run_hooks(self) -> dict[str, str]:
        """Run every hook once, in order; errors and hangs are logged, never fatal.

        Returns what became of each hook: "ok", "error: ...", "timed out" or "skipped".
        """
        with self._lock:
            if self._hooks_ran:
                return {}
            self._hooks_ran = True
            hooks = sorted(self._hooks)
        outcome: dict[str, str] = {}
        for hook in hooks:
            left = self.time_left()
            budget = min(hook.timeout, left)
            if budget <= 0:
                outcome[hook.name] = "skipped"
                log.error("shutdown hook %s skipped: no time left", hook.name)
                continue
            box: list[BaseException | None] = []

            def call(h: _Hook = hook, t: float = left,
                     box: list[BaseException | None] = box) -> None:
                try:
                    h.fn(t)
                    box.append(None)
                except BaseException as exc:
                    box.append(exc)

            # A daemon thread, so that a hook that hangs cannot keep the process alive.
            t = threading.Thread(target=call, name=f"spotrun-hook-{hook.name}", daemon=True)
            t.start()
            t.join(budget)
            if t.is_alive():
                outcome[hook.name] = "timed out"
                log.error("shutdown hook %s still running after %.1f s; moving on",
                          hook.name, budget)
            elif box and box[0] is not None:
                outcome[hook.name] = f"error: {box[0]!r}"
                log.error("shutdown hook %s failed: %r", hook.name, box[0])
            else:
                outcome[hook.name] = "ok"
        return outcome


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def flush_logs() -> None:
    """Flush every root handler: what a process says before ``os._exit`` must be kept."""
    for h in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            h.flush()


_coordinator: ShutdownCoordinator | None = None
_coordinator_lock = threading.Lock()


def coordinator(*, grace_seconds: float = 15.0, safety_margin: float = 1.0
                ) -> ShutdownCoordinator:
    """The process-wide coordinator (created on first use, with these settings)."""
    global _coordinator
    with _coordinator_lock:
        if _coordinator is None:
            _coordinator = ShutdownCoordinator(grace_seconds=grace_seconds,
                                               safety_margin=safety_margin)
        return _coordinator


def register(name: str, hook: GracefulTerminate | Callable[[float], None], *,
             order: int = 100, timeout: float = 2.0) -> None:
    """Register a shutdown hook with the process-wide coordinator."""
    coordinator().register(name, hook, order=order, timeout=timeout)
