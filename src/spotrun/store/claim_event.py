"""The claim's event ("started on w1", "resumed on w1 from step 40/100"), defined once.

Its payload and its words are :class:`spotrun.events.Started` and
:class:`spotrun.events.Resumed`. SQLite's claim builds the payload from the claimed row
(:func:`claim_payload`); PostgreSQL's one-statement claim computes the event in SQL from
the row it updates, with SQL generated here from those payloads' own wording
(:func:`claim_event_sql`: each wording rendered with placeholder values, the placeholders
then replaced by the row's columns), so the two dialects cannot word it differently.
"""

from __future__ import annotations

from spotrun.events import DATA_VERSION, Resumed, Started, render
from spotrun.jobs import EventKind


def claim_payload(*, worker: str, attempt: int, checkpoint: str | None,
                  checkpoint_step: int | None, progress_total: int | None
                  ) -> Started | Resumed:
    """The claim's event for a job just claimed (``attempt``: its new attempt)."""
    if checkpoint_step is not None and checkpoint:
        return Resumed(worker, checkpoint_step, progress_total)
    return Started(worker, attempt)


def claim_event(*, worker: str, attempt: int, checkpoint: str | None,
                checkpoint_step: int | None, progress_total: int | None
                ) -> tuple[EventKind, str]:
    """The claim's event kind and message (see :func:`claim_payload`)."""
    payload = claim_payload(worker=worker, attempt=attempt, checkpoint=checkpoint,
                            checkpoint_step=checkpoint_step, progress_total=progress_total)
    return payload.kind, payload.message()


# Placeholders: values no wording contains, each replaced by its column in the SQL.
_WORKER = "\x00worker\x00"
_ATTEMPT, _STEP, _TOTAL = 987_654_321, 876_543_219, 765_432_198


def _sql_literal(text: str) -> str:
    # psycopg's placeholders are %(name)s: a % in the wording would be read as one.
    assert "%" not in text, text
    return "'" + text.replace("'", "''") + "'"


def _words_sql(message: str, columns: dict[str, str]) -> str:
    """``message`` as an SQL concatenation, each placeholder replaced by its column."""
    parts: list[str] = []
    rest = message
    while rest:
        found = [(rest.find(p), p) for p in columns if p in rest]
        if not found:
            parts.append(_sql_literal(rest))
            break
        at, placeholder = min(found)
        if at:
            parts.append(_sql_literal(rest[:at]))
        parts.append(columns[placeholder])
        rest = rest[at + len(placeholder):]
    return " || ".join(parts)


def claim_event_sql(row: str) -> tuple[str, str, str]:
    """SQL expressions for the kind, the message and the data (JSON text) of the claim's
    event, of the claimed job's updated row named ``row`` (its attempt the new one)."""
    columns = {_WORKER: f"{row}.worker_name", str(_ATTEMPT): f"{row}.attempt::text",
               str(_STEP): f"{row}.checkpoint_step::text",
               str(_TOTAL): f"{row}.progress_total::text"}
    resumable = (f"{row}.checkpoint_step IS NOT NULL "
                 f"AND coalesce({row}.checkpoint, '') <> ''")
    with_total = f"coalesce({row}.progress_total, 0) <> 0"
    restarted = f"{row}.attempt > 1"
    resumed_kind, resumed_total, _ = render(Resumed(_WORKER, _STEP, _TOTAL))
    _, resumed_alone, _ = render(Resumed(_WORKER, _STEP, None))
    started_kind, restarted_words, _ = render(Started(_WORKER, _ATTEMPT))
    _, started_words, _ = render(Started(_WORKER, 1))
    kind = (f"CASE WHEN {resumable} THEN {_sql_literal(resumed_kind)} "
            f"ELSE {_sql_literal(started_kind)} END")
    message = (
        f"CASE WHEN {resumable} AND {with_total} THEN {_words_sql(resumed_total, columns)}\n"
        f"             WHEN {resumable} THEN {_words_sql(resumed_alone, columns)}\n"
        f"             WHEN {restarted} THEN {_words_sql(restarted_words, columns)}\n"
        f"             ELSE {_words_sql(started_words, columns)} END")
    # The payloads' JSON (events.to_json): their fields, None left out, and the version.
    data = (f"(CASE WHEN {resumable} THEN jsonb_strip_nulls(jsonb_build_object("
            f"'v', {DATA_VERSION}, 'worker', {row}.worker_name, 'step', {row}.checkpoint_step,"
            f" 'total', {row}.progress_total))"
            f" ELSE jsonb_build_object('v', {DATA_VERSION}, 'worker', {row}.worker_name,"
            f" 'attempt', {row}.attempt) END)::text")
    return kind, message, data
