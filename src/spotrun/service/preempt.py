"""A simulated preemption: the notice a cloud would send, sent to a worker of this host.

``spotrun preempt``, ``POST /v1/workers/{worker}/preempt`` and the dashboard's button all
come here. A worker is signalled only on its own host and only while its pid is still a
spotrun process (a pid may have been reused since it registered).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from pathlib import Path

from spotrun.jobs import Worker
from spotrun.service.submission import ServiceError
from spotrun.store import JobStore

log = logging.getLogger("spotrun.preempt")

# The states of a worker that still runs (idle, busy, stopping).
LIVE_WORKER_STATES = ("idle", "busy", "stopping")


class NoSuchWorker(ServiceError):
    """No live worker has that name or id."""


class CannotSignal(ServiceError):
    """The worker is live in the store but cannot be signalled from here; says why."""


class NotRunning(CannotSignal):
    """The worker's pid is no spotrun process any more."""


def is_spotrun_process(pid: int) -> bool:
    """Whether ``pid`` is a live process of this machine whose command line names spotrun."""
    try:
        return b"spotrun" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def live_worker(store: JobStore, name: str) -> Worker:
    """The live worker of that name or id; raises :class:`NoSuchWorker`."""
    found = [w for w in store.find_workers(name) if w.state in LIVE_WORKER_STATES]
    if not found:
        raise NoSuchWorker(f"no live worker named {name!r}")
    return found[0]


def workers_here(store: JobStore) -> list[Worker]:
    """The live workers registered from this host."""
    host = socket.gethostname()
    return [w for w in store.list_workers(include_stopped=False) if w.host == host]


def signal_worker(w: Worker, sig: signal.Signals = signal.SIGTERM) -> None:
    """Send ``sig`` to ``w`` (SIGTERM: a preemption notice).

    Raises :class:`CannotSignal` when it runs on another host or the signal fails,
    :class:`NotRunning` when its pid is no spotrun process.
    """
    here = socket.gethostname()
    if w.host != here:
        raise CannotSignal(f"worker {w.name} runs on host {w.host}, not here ({here}); run "
                           f"`spotrun preempt {w.name}` on that host")
    if not is_spotrun_process(w.pid):
        raise NotRunning(f"worker {w.name} (pid {w.pid}) is not running any more")
    try:
        os.kill(w.pid, sig)
    except OSError as exc:
        raise CannotSignal(f"cannot signal worker {w.name} (pid {w.pid}): "
                           f"{exc.strerror}") from None
    log.info("sent %s to worker %s (pid %d) to simulate a preemption", sig.name, w.name,
             w.pid)


def preempt(store: JobStore, name: str) -> tuple[Worker, str]:
    """Send a preemption notice to the live local worker ``name``: (worker, what happens).

    Raises :class:`NoSuchWorker`, :class:`CannotSignal` (:class:`NotRunning`).
    """
    w = live_worker(store, name)
    signal_worker(w)
    return w, (f"Sent a preemption notice to worker {w.name}: it saves a checkpoint, hands "
               "its job back and stops; another worker picks the job up.")
