"""The worker's record of its fenced writes refused: one log line each, in a fixed form.

A refused write (:class:`~spotrun.store.LeaseLost`) is told in words for the operator where
it is caught, and recorded here once as ``spotrun-refused {json}``: the kind of write, the
job and the attempt, as data. Readers (the chaos drill) count refusals from that JSON with
:func:`count`, never from the words.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

from spotrun.store import LeaseLost

MARK = "spotrun-refused "
log = logging.getLogger("spotrun.refused")


def record(exc: LeaseLost) -> None:
    """Log that ``exc``'s write was refused, as a line :func:`count` reads."""
    log.warning("%s%s", MARK, json.dumps(
        {"write": exc.write, "job": exc.job_id, "attempt": exc.attempt}, sort_keys=True))


def count(lines: Iterable[str]) -> dict[str, int]:
    """How many refusals the lines record, by the kind of write; other lines are skipped."""
    out: dict[str, int] = {}
    for line in lines:
        _, mark, rest = line.partition(MARK)
        if not mark:
            continue
        try:
            facts = json.loads(rest)
        except ValueError:
            continue  # a line cut short (a worker killed while it wrote)
        write = facts.get("write") if isinstance(facts, dict) else None
        if isinstance(write, str):
            out[write] = out.get(write, 0) + 1
    return out
