"""The claim's event ("started on w1", "resumed on w1 from step 40/100"), worded once.

SQLite's claim renders it in Python from the claimed row (:func:`claim_event`);
PostgreSQL's one-statement claim computes it in SQL from the row it updates, with the
SQL generated here from the same templates (:func:`claim_event_sql`), so the two
dialects cannot word it differently.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from spotrun.jobs import EventKind


@dataclass(frozen=True)
class _Wording:
    kind: EventKind
    template: str  # fields: worker, attempt, step, of_total


# In the order they are tried: a resumable checkpoint, then a later attempt, then the first.
RESUMED = _Wording(EventKind.RESUMED, "resumed on {worker} from step {step}{of_total}")
RESTARTED = _Wording(EventKind.STARTED,
                     "restarted on {worker} from the beginning (attempt {attempt})")
STARTED = _Wording(EventKind.STARTED, "started on {worker}")


def claim_event(*, worker: str, attempt: int, checkpoint: str | None,
                checkpoint_step: int | None, progress_total: int | None
                ) -> tuple[EventKind, str]:
    """The claim's event kind and message for a job just claimed (its new attempt)."""
    if checkpoint_step is not None and checkpoint:
        wording = RESUMED
    elif attempt > 1:
        wording = RESTARTED
    else:
        wording = STARTED
    of_total = f"/{progress_total}" if progress_total else ""
    return wording.kind, wording.template.format(
        worker=worker, attempt=attempt, step=checkpoint_step, of_total=of_total)


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _template_sql(template: str, fields: dict[str, str]) -> str:
    parts: list[str] = []
    for literal, name, _spec, _conv in string.Formatter().parse(template):
        if literal:
            parts.append(_sql_literal(literal))
        if name is not None:
            parts.append(fields[name])
    return " || ".join(parts)


def claim_event_sql(row: str) -> tuple[str, str]:
    """SQL expressions for the kind and the message of the claim's event, of the claimed
    job's updated row named ``row`` (its attempt already the new one)."""
    fields = {
        "worker": f"{row}.worker_name",
        "attempt": f"{row}.attempt::text",
        "step": f"{row}.checkpoint_step::text",
        "of_total": (f"(CASE WHEN coalesce({row}.progress_total, 0) <> 0 "
                     f"THEN '/' || {row}.progress_total ELSE '' END)"),
    }
    resumable = (f"{row}.checkpoint_step IS NOT NULL "
                 f"AND coalesce({row}.checkpoint, '') <> ''")
    restarted = f"{row}.attempt > 1"
    kind = (f"CASE WHEN {resumable} THEN {_sql_literal(RESUMED.kind.value)} "
            f"WHEN {restarted} THEN {_sql_literal(RESTARTED.kind.value)} "
            f"ELSE {_sql_literal(STARTED.kind.value)} END")
    message = (f"CASE WHEN {resumable} THEN {_template_sql(RESUMED.template, fields)}\n"
               f"             WHEN {restarted} THEN "
               f"{_template_sql(RESTARTED.template, fields)}\n"
               f"             ELSE {_template_sql(STARTED.template, fields)} END")
    return kind, message
