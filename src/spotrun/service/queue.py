"""Submit and cancel: the checks and writes behind ``spotrun submit``/``cancel``, ``POST
/v1/jobs``, the dashboard's forms and the bus intake.

``caller`` is who asks: a :class:`Principal` (a token or a session: their quotas apply,
their params that name other jobs see only theirs, command jobs need an admin or an
allowed program), or None for the operator's own tools (the CLI, the intake), which act
with full rights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from spotrun.config import ConfigError, check_pool
from spotrun.jobs import Job
from spotrun.pipelines.base import SubmitRefused
from spotrun.pipelines.command import may_submit
from spotrun.pipelines.registry import (
    UnknownPipeline,
    describe_validation_error,
    get,
    validate_submission,
)
from spotrun.quotas import QuotaExceeded
from spotrun.service import callback_urls
from spotrun.service.auth import JOB_ID_RE, Principal
from spotrun.service.submission import (
    MAX_BATCH,
    Forbidden,
    IdempotencyConflict,
    Invalid,
    ItemError,
    Problem,
    Refused,
    ServiceError,
    Submission,
    bad_value,
    check_text,
)
from spotrun.store import Conflict, JobNotFound, JobStore, KeyReused, NewJob, dumps


def check(store: JobStore, sub: Submission, *, caller: Principal | None,
          allow_private_callbacks: bool) -> tuple[dict[str, Any], bool]:
    """Check a request at the edge: (params as stored, requires CUDA).

    Raises :class:`UnknownPipeline`, :class:`Invalid` naming the fields and why, or
    :class:`Forbidden` (a command job the caller may not submit).
    """
    if sub.pool is not None:
        try:
            check_pool(sub.pool)
        except ConfigError as exc:
            raise Invalid.one("pool", str(exc)) from None
    pipe = get(sub.pipeline)
    bad = bad_value(sub.params, "params")
    if bad:
        raise Invalid([bad])
    try:
        pipe.validate(sub.params, strict=sub.strict_params)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"])
            reason = "unknown param" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(Problem(f"params.{loc}" if loc else "params", reason))
        raise Invalid(problems, describe_validation_error(sub.pipeline, exc)) from None
    try:
        _pipe, params, cuda = validate_submission(
            sub.pipeline, sub.params, store,
            owner=None if caller is None else caller.owner_filter)
    except SubmitRefused as exc:
        message = str(exc.args[0]) if exc.args else str(exc)
        where = "params" if exc.param is None else f"params.{exc.param}"
        raise Refused(message, where, missing=exc.missing) from None
    if sub.callback_url is not None:
        try:
            callback_urls.check_callback_url(sub.callback_url,
                                             allow_private=allow_private_callbacks)
        except callback_urls.CallbackForbidden as exc:
            # A well-formed URL to a destination the server will not call: not an input
            # error (the API document's pattern admits it) but a refusal.
            raise Forbidden(f"callback_url: {exc}", "callback_url") from None
        except callback_urls.CallbackRefused as exc:
            raise Invalid.one("callback_url", str(exc), f"callback_url: {exc}") from None
    if caller is not None and sub.pipeline == "command":
        # Command jobs run programs on the workers: an admin, or a program the operator
        # allowed.
        refused = may_submit(params, is_admin=caller.is_admin)
        if refused:
            raise Forbidden(refused)
    return params, cuda


def submit(store: JobStore, sub: Submission, *, caller: Principal | None,
           owner: str | None = None, idempotency_key: str | None = None,
           allow_private_callbacks: bool = False) -> Job:
    """Check and queue a job; return it as stored.

    Raises what :func:`check` and :func:`enqueue` raise.
    """
    params, cuda = check(store, sub, caller=caller,
                         allow_private_callbacks=allow_private_callbacks)
    return enqueue(store, sub, params, cuda, caller=caller, owner=owner,
                   idempotency_key=idempotency_key)


def enqueue(store: JobStore, sub: Submission, params: dict[str, Any], requires_cuda: bool,
            *, caller: Principal | None, owner: str | None = None,
            idempotency_key: str | None = None) -> Job:
    """Queue a job that :func:`check` passed (``params`` and ``requires_cuda`` are its
    answer); return it as stored.

    ``owner`` defaults to the caller's name (none for the operator). With an
    ``idempotency_key``, a retry returns the job queued first, and a key used for a
    different job raises :class:`IdempotencyConflict`. A caller over a quota raises
    :class:`QuotaExceeded`.
    """
    try:
        return _queue(store, [(sub, params, requires_cuda, idempotency_key)],
                      caller=caller, owner=owner, batch=False)[0]
    except KeyReused as exc:
        raise IdempotencyConflict(exc.job_id) from None


def submit_many(store: JobStore, subs: Sequence[Submission], *, caller: Principal | None,
                idempotency_keys: Sequence[str | None] | None = None,
                allow_private_callbacks: bool = False) -> list[Job]:
    """Check and queue a batch of jobs in one transaction: all of them or none. Returns
    them as stored, in order.

    Each job is checked as :func:`submit` checks one, and its idempotency key (its place
    in ``idempotency_keys``) is honoured as one job's is; a key may appear once a batch.
    The caller's quotas apply to the whole batch. An item refused raises
    :class:`ItemError` naming it; over the queued quota raises :class:`QuotaExceeded`.
    """
    if not 1 <= len(subs) <= MAX_BATCH:
        raise Invalid.one("jobs", f"must hold 1 to {MAX_BATCH} jobs, not {len(subs)}")
    keys = list(idempotency_keys or [None] * len(subs))
    if len(keys) != len(subs):
        raise ValueError("one idempotency key (or None) per submission")
    checked = []
    first: dict[str, int] = {}
    for i, (sub, key) in enumerate(zip(subs, keys, strict=True)):
        try:
            check_text("idempotency_key", key)
            if key is not None and key in first:
                raise Invalid.one("idempotency_key", f"repeats the key of job {first[key]}")
            params, cuda = check(store, sub, caller=caller,
                                 allow_private_callbacks=allow_private_callbacks)
        except (ServiceError, UnknownPipeline) as exc:
            raise ItemError(i, exc) from None
        if key is not None:
            first[key] = i
        checked.append((sub, params, cuda, key))
    try:
        return _queue(store, checked, caller=caller, owner=None, batch=True)
    except KeyReused as exc:
        raise ItemError(exc.index, IdempotencyConflict(exc.job_id)) from None


def _queue(store: JobStore, checked: Sequence[tuple[Submission, dict[str, Any], bool,
                                                    str | None]],
           *, caller: Principal | None, owner: str | None, batch: bool) -> list[Job]:
    """Queue checked jobs (each: the request, its params as stored, requires CUDA, its
    key) in one transaction, under the caller's quota; a ``batch``'s item over a quota
    raises :class:`ItemError`."""
    if owner is None and caller is not None:
        owner = caller.name
    quota = None if caller is None or caller.is_admin else store.quota_for(caller.name)
    if quota is not None and owner is not None:
        # Checked here too, where the item is known, so that the answer can name it.
        for i, (sub, params, _cuda, _key) in enumerate(checked):
            try:
                quota.check_request(owner, priority=sub.priority, max_retries=sub.max_retries,
                                    params_bytes=len(dumps(params).encode()))
            except QuotaExceeded as exc:
                if not batch:
                    raise
                raise ItemError(i, exc) from None
    now = store.now() if any(sub.deadline is not None for sub, *_ in checked) else 0.0
    items = [NewJob(
        sub.pipeline, params, priority=sub.priority, max_retries=sub.max_retries,
        on_preempt=sub.on_preempt, timeout=sub.timeout, requires_cuda=cuda, pool=sub.pool,
        idempotency_key=key, callback_url=sub.callback_url,
        checkpoint_every_steps=sub.checkpoint_every_steps,
        checkpoint_every_seconds=sub.checkpoint_every_seconds,
        max_preemptions=sub.max_preemptions,
        deadline=None if sub.deadline is None else now + sub.deadline)
        for sub, params, cuda, key in checked]
    try:
        return store.submit_many(items, owner=owner, quota=quota)
    except Conflict:
        if all(item.idempotency_key is None for item in items):
            raise
        # A concurrent retry with the same key won the insert: answer with its job.
        return store.submit_many(items, owner=owner, quota=quota)


def cancel(store: JobStore, job_id: str, *, caller: Principal | None) -> Job:
    """Cancel a job: at once if queued, at its next step if running; return it.

    Raises :class:`JobNotFound` for a job that does not exist or the caller cannot see.
    """
    if caller is not None and not JOB_ID_RE.match(job_id):
        # What a caller sends is not looked up unless it can be an id (no NUL to the
        # database); the answer is the same as for a job that does not exist.
        raise JobNotFound(f"no job with id {job_id[:64]!r}")
    return store.cancel(job_id, owner=None if caller is None else caller.owner_filter)
