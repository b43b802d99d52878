"""``command``: run a program that exists on the worker, keeping its work across preemptions.

The contract with the program (docs/command-jobs.md is its one page):

- it inherits the worker's environment plus the job's ``env``, and runs in ``cwd``;
- ``SPOTRUN_CHECKPOINT_DIR`` is a local directory: empty on a first attempt, else exactly
  the files of the job's last committed checkpoint;
- on a notice its process group gets SIGTERM; when it exits (whatever its code) the job is
  handed back, and the directory is committed first if the program changed it; still
  running when the budget ends, the group is SIGKILLed and nothing of the directory is
  committed;
- a line ``spotrun:checkpoint`` on stdout asks for a commit now: the group is paused
  (SIGSTOP) while the directory is committed, then resumed (SIGCONT);
- a line ``spotrun:progress step=10 total=200 loss=0.31`` on stdout reports progress;
  every other line of stdout (INFO) and stderr (WARNING) is kept in the job's logs;
- exit 0 without a notice: the job succeeds with the JSON object the program wrote to
  ``SPOTRUN_RESULT_FILE``, or ``{"exit_code": 0}``; any other exit fails it with the code
  and the last lines of stderr;
- a cancel or the time limit: SIGTERM, then SIGKILL after ``stop_grace_seconds``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

from pydantic import Field, field_validator

from spotrun.pipelines.base import JobContext, Params, State, SubmitRefused, pipeline

PROGRESS = "spotrun:progress"
CHECKPOINT = "spotrun:checkpoint"
RESERVED_ENV = ("SPOTRUN_CHECKPOINT_DIR", "SPOTRUN_RESULT_FILE", "SPOTRUN_JOB_ID",
                "SPOTRUN_ATTEMPT")
# Operators list programs (absolute paths, separated by ':') that tokens other than an
# admin's may run through the API and the dashboard.
ALLOW_ENV = "SPOTRUN_COMMAND_PROGRAMS"
MAX_LINE = 16_384  # longer lines are cut: logs are bounded per attempt anyway
MAX_RESULT_BYTES = 1_000_000
STDERR_TAIL = 10
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class CommandError(Exception):
    """The program could not be run, or ended badly; the message says how, in one line
    (a failed program's last lines of stderr follow it)."""


class CommandParams(Params):
    # The schemas say what the validators below check, for the API's document.
    argv: list[str] = Field(min_length=1, max_length=10_000,
                            description="the program and its arguments",
                            json_schema_extra={
                                "prefixItems": [{"type": "string", "minLength": 1}],
                                "items": {"type": "string", "maxLength": 131_072,
                                          "pattern": "^[^\\x00]*$"}})
    env: dict[str, str] = Field(default_factory=dict,
                                description="variables added to the worker's environment",
                                json_schema_extra={
                                    "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$",
                                                      "not": {"enum": list(RESERVED_ENV)}},
                                    "additionalProperties": {"type": "string",
                                                             "pattern": "^[^\\x00]*$"}})
    cwd: str | None = Field(None, min_length=1, max_length=4096,
                            description="working directory on the worker")
    stop_grace_seconds: float = Field(
        10.0, ge=0, le=3600,
        description="on a cancel or the time limit, seconds between SIGTERM and SIGKILL")
    cuda: bool = Field(False, description="run only on a worker with CUDA")

    @field_validator("argv")
    @classmethod
    def _argv(cls, argv: list[str]) -> list[str]:
        if not argv[0]:
            raise ValueError("the program (argv[0]) is empty")
        for arg in argv:
            if "\0" in arg or len(arg) > 131_072:
                raise ValueError("an argument holds a NUL byte or is over 128 kB")
        return argv

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str]) -> dict[str, str]:
        for name, value in env.items():
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not an environment variable name")
            if name in RESERVED_ENV:
                raise ValueError(f"{name} is set by the worker")
            if "\0" in value:
                raise ValueError(f"the value of {name} holds a NUL byte")
        return env


def allowed_programs() -> frozenset[str]:
    """The programs an operator lets every token run (``SPOTRUN_COMMAND_PROGRAMS``)."""
    raw = os.environ.get(ALLOW_ENV, "")
    return frozenset(p for p in raw.split(os.pathsep) if os.path.isabs(p))


def may_submit(params: dict[str, Any], *, is_admin: bool) -> str | None:
    """Why a caller of the API may not submit this command job, or None if they may."""
    if is_admin:
        return None
    program = str((params.get("argv") or [""])[0])
    if program not in allowed_programs():
        return ("command jobs run programs on the workers: only an admin token may submit "
                f"them, or a program the operator allowed in {ALLOW_ENV}")
    if params.get("env"):
        # LD_PRELOAD, PYTHONPATH and their kind would turn an allowed program into any.
        return "only an admin token may set env for a command job"
    return None


def find_program(argv0: str, *, path: str | None, cwd: str | None) -> str:
    """The executable ``argv0`` names, looked up as the worker would, or CommandError."""
    if "/" in argv0:
        full = argv0 if os.path.isabs(argv0) else os.path.join(cwd or os.getcwd(), argv0)
        if not os.path.isfile(full):
            raise CommandError(f"program {argv0!r} was not found")
        if not os.access(full, os.X_OK):
            raise CommandError(f"program {argv0!r} is not executable")
        return full
    found = shutil.which(argv0, path=path)
    if found is None:
        raise CommandError(f"program {argv0!r} was not found on the PATH")
    return found


def _check(params: Any, store: Any) -> None:
    # With SQLite the workers run on this machine: refuse a missing program at once.
    # With PostgreSQL the workers are elsewhere; they fail such a job with one line.
    assert isinstance(params, CommandParams)
    if getattr(store, "is_postgres", True):
        return
    path = params.env.get("PATH", os.environ.get("PATH"))
    if params.cwd is not None and not os.path.isdir(params.cwd):
        raise SubmitRefused(f"param 'cwd': {params.cwd!r} is not a directory on this "
                            "machine, where the workers of this SQLite database run",
                            param="cwd")
    try:
        find_program(params.argv[0], path=path, cwd=params.cwd)
    except CommandError as exc:
        raise SubmitRefused(f"param 'argv': {exc} on this machine, where the workers of "
                            "this SQLite database run", param="argv") from None


def parse_progress(text: str) -> tuple[int, int | None, dict[str, Any]]:
    """``step=10 total=200 loss=0.31`` -> (10, 200, {"loss": 0.31}); ValueError if bad."""
    fields: dict[str, str] = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r} is not key=value")
        fields[key] = value
    if "step" not in fields:
        raise ValueError("it has no step=")
    step = int(fields.pop("step"))
    total = int(fields.pop("total")) if "total" in fields else None
    if step < 0 or (total is not None and total < 0):
        raise ValueError("step and total must not be negative")
    metrics: dict[str, Any] = {}
    for key, value in list(fields.items())[:32]:
        try:
            number = float(value)
            metrics[key[:64]] = number if math.isfinite(number) else value[:200]
        except ValueError:
            metrics[key[:64]] = value[:200]
    return step, total, metrics


def fingerprint(directory: Path) -> dict[str, tuple[int, int]]:
    """Every regular file's (size, mtime) by relative path: what "changed" is judged by."""
    found: dict[str, tuple[int, int]] = {}
    for dirpath, _dirs, names in os.walk(directory):
        for name in names:
            path = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                found[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns)
    return found


class _Program:
    """The running program: its process group, its output readers, the commit requests."""

    def __init__(self, ctx: JobContext, argv: list[str], env: dict[str, str],
                 cwd: str | None) -> None:
        self.ctx = ctx
        self.step = ctx.resume.step if ctx.resume is not None else 0
        self.total: int | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        self.commit_wanted = threading.Event()
        self.killed = False  # SIGKILLed by the worker at the deadline: commit nothing
        self.paused = threading.Lock()  # held while the group is stopped for a commit
        try:
            self.proc = subprocess.Popen(
                argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise CommandError(f"program {argv[0]!r} could not be started: "
                               f"{exc.strerror or exc}") from None
        self.pgid = self.proc.pid  # start_new_session: the program leads its own group
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, True),
                             name=f"spotrun-stdout-{ctx.job_id}", daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, False),
                             name=f"spotrun-stderr-{ctx.job_id}", daemon=True)]
        for t in self.readers:
            t.start()

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)

    def kill_now(self) -> None:
        """The worker's hand-back without us (the budget ran out): end the whole group."""
        self.killed = True
        self.signal(signal.SIGKILL)

    def _read(self, stream: IO[bytes], stdout: bool) -> None:
        log = self.ctx.log
        while True:
            raw = stream.readline(MAX_LINE)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if stdout and line.startswith(CHECKPOINT) and line[len(CHECKPOINT):].strip() == "":
                self._ask_commit()
            elif stdout and line.startswith(PROGRESS + " "):
                try:
                    step, total, metrics = parse_progress(line[len(PROGRESS):])
                except ValueError as exc:
                    log.warning("ignored a malformed progress line (%s): %s", exc, line[:200])
                    continue
                self.step = step
                self.total = total if total is not None else self.total
                self.ctx.progress(step, self.total, **metrics)
            elif stdout:
                log.info("%s", line)
            else:
                self.stderr_tail.append(line[:500])
                log.warning("%s", line)

    def _ask_commit(self) -> None:
        # Paused as soon as the line is read, so that the commit holds what the directory
        # held then, not a file the program has begun to write since.
        if self.ctx.should_stop() or self.killed:
            return  # after a notice the directory is committed once, at the exit
        if self.paused.acquire(blocking=False):
            self.signal(signal.SIGSTOP)
            self.commit_wanted.set()

    def resume(self) -> None:
        # Released first: the program cannot print its next request before SIGCONT.
        self.paused.release()
        self.signal(signal.SIGCONT)

    def finish_output(self) -> None:
        """Wait for the last lines, with a bound: a process that left the group (a new
        session of its own) may hold the pipes open."""
        give_up = time.monotonic() + 2.0
        for t in self.readers:
            t.join(max(0.0, give_up - time.monotonic()))
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@pipeline("command", params=CommandParams, state_dir=True, check=_check,
          requires_cuda=lambda p: bool(getattr(p, "cuda", False)),
          description="Run a program on the worker; its SPOTRUN_CHECKPOINT_DIR survives "
          "preemptions")
def run(ctx: JobContext) -> dict[str, Any]:
    p = ctx.params
    assert isinstance(p, CommandParams)
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix=f"spotrun-{ctx.job_id}-")))
        state_dir = ctx.state_dir
        if state_dir is None:  # run inline, outside a worker
            state_dir = scratch / "checkpoint"
            state_dir.mkdir()
        result_file = scratch / "result.json"
        env = {**os.environ, **p.env,
               "SPOTRUN_CHECKPOINT_DIR": str(state_dir),
               "SPOTRUN_RESULT_FILE": str(result_file),
               "SPOTRUN_JOB_ID": ctx.job_id, "SPOTRUN_ATTEMPT": str(ctx.attempt)}
        if p.cwd is not None and not os.path.isdir(p.cwd):
            raise CommandError(f"cwd {p.cwd!r} is not a directory on worker {ctx.worker}")
        try:
            program = find_program(p.argv[0], path=env.get("PATH"), cwd=p.cwd)
        except CommandError as exc:
            raise CommandError(f"{exc} on worker {ctx.worker or 'here'}") from None
        return _supervise(ctx, p, [program, *p.argv[1:]], env, state_dir, result_file)
    raise AssertionError("unreachable")  # pragma: no cover - for mypy's sake


def _supervise(ctx: JobContext, p: CommandParams, argv: list[str], env: dict[str, str],
               state_dir: Path, result_file: Path) -> dict[str, Any]:
    committed = fingerprint(state_dir)
    prog = _Program(ctx, argv, env, p.cwd)
    ctx.on_abandon = prog.kill_now
    term_at: float | None = None
    try:
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                prog.proc.wait(0.05)
            if prog.proc.returncode is not None:
                break
            if prog.commit_wanted.is_set():
                prog.commit_wanted.clear()
                try:
                    # A notice since the request: the commit at the exit will hold more.
                    if not ctx.should_stop():
                        committed = _commit(ctx, prog, state_dir, committed)
                finally:
                    prog.resume()
            if ctx.should_stop():
                now = time.monotonic()
                if term_at is None:
                    term_at = now
                    prog.signal(signal.SIGCONT)  # a paused group could not hear it
                    prog.signal(signal.SIGTERM)
                # A notice: the program may use the whole budget; the worker SIGKILLs
                # the group when it runs out. A cancel or time limit: our grace period.
                elif ctx.notice_deadline() is None and now - term_at >= p.stop_grace_seconds:
                    prog.signal(signal.SIGKILL)
    finally:
        # Whatever the program left behind in its group ends with it.
        prog.signal(signal.SIGKILL)
        if prog.proc.returncode is None:
            prog.proc.kill()
            prog.proc.wait()
        prog.finish_output()
    code = prog.proc.returncode
    if prog.killed:
        ctx.stop()  # the worker already handed the job back with its last commit
    if ctx.should_stop():
        if fingerprint(state_dir) != committed:
            # The group is gone and the directory is deleted after the hand-back.
            ctx.checkpoint_now(State(prog.step, {}, {"kind": "command"}, str(state_dir),
                                     directory_final=True))
        ctx.stop()
    if code != 0:
        raise CommandError(_exit_words(code) + "".join(
            f"\n  {line}" for line in prog.stderr_tail))
    return _result(result_file)


def _commit(ctx: JobContext, prog: _Program, state_dir: Path,
            committed: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Commit the directory while the program is paused; the new baseline."""
    now = fingerprint(state_dir)
    if now == committed:
        return committed
    ctx.checkpoint_now(State(prog.step, {}, {"kind": "command"}, str(state_dir)))
    return now


def _exit_words(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the program was killed by {name}"
    return f"the program exited with code {code}"


def _result(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"exit_code": 0}
    if path.stat().st_size > MAX_RESULT_BYTES:
        raise CommandError(f"SPOTRUN_RESULT_FILE holds over {MAX_RESULT_BYTES // 1000} kB; "
                           "keep the result small and put large outputs elsewhere")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CommandError(f"SPOTRUN_RESULT_FILE is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CommandError("SPOTRUN_RESULT_FILE must hold a JSON object, not "
                           f"{type(value).__name__}")
    return value


PIPELINE = run
