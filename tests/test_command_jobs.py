"""Command jobs: real `spotrun worker` processes running real programs, sent real signals.

The programs are small Python scripts written by each test (and the PyTorch example under
examples/command/); they talk to spotrun only through the contract of
docs/command-jobs.md: the environment, signals, their exit code and their output.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Env, wait_until
from spotrun.checkpoints import CheckpointStore
from spotrun.jobs import Job, JobState
from spotrun.store import JobStore

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "command" / "train.py"
FAST = ("--lease-seconds", "1.5", "--heartbeat-seconds", "0.3")


@pytest.fixture
def senv(env_factory: Any, sqlite_url: str) -> Env:
    """Real processes on SQLite: what these tests check does not depend on the database."""
    e: Env = env_factory(sqlite_url)
    return e


@pytest.fixture
def st(senv: Env) -> Iterator[JobStore]:
    s = senv.store()
    yield s
    s.close()


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def submit(env: Env, *argv: str, options: tuple[str, ...] = ()) -> str:
    return env.cli("submit", "command", *options, "--", *argv).stdout.strip()


def final(st: JobStore, job_id: str, timeout: float = 120) -> Job:
    wait_until(lambda: st.get(job_id, with_events=False).state.is_final, timeout,
               f"job {job_id} to end", on_fail=lambda: describe(st, job_id))
    return st.get(job_id)


def describe(st: JobStore, job_id: str) -> str:
    job = st.get(job_id)
    return "\n".join([f"{job.state} {job.error}"] + [e.message for e in job.events])


def messages(job: Job) -> list[str]:
    return [e.message for e in job.events]


def at_step(st: JobStore, job_id: str, step: int, timeout: float = 90) -> None:
    def reached() -> bool:
        job = st.get(job_id, with_events=False)
        return job.state is JobState.RUNNING and job.progress.step >= step

    wait_until(reached, timeout, f"job {job_id} running at step {step}",
               on_fail=lambda: describe(st, job_id))


def handed_back(st: JobStore, job_id: str, preemptions: int) -> Job:
    def back() -> bool:
        job = st.get(job_id, with_events=False)
        return job.state is JobState.QUEUED and job.preemptions == preemptions

    wait_until(back, 60, f"job {job_id} handed back", on_fail=lambda: describe(st, job_id))
    return st.get(job_id)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def tree_digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------- directory checkpoints


@pytest.fixture(params=["local", "s3"])
def ckpt_store(request: pytest.FixtureRequest, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[CheckpointStore]:
    """A checkpoint store on a local directory, and on a real S3 server on loopback."""
    if request.param == "local":
        yield CheckpointStore(str(tmp_path / "store"))
        return
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from s3_server import S3Server, moto_server

    (tmp_path / "moto").mkdir()
    with moto_server(tmp_path / "moto") as server:
        for name in S3Server.cleared():
            monkeypatch.delenv(name, raising=False)
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        yield CheckpointStore(f"s3://{server.new_bucket()}/ckpts")


def test_a_directory_checkpoint_comes_back_byte_for_byte_or_not_at_all(
        ckpt_store: CheckpointStore, tmp_path: Path) -> None:
    from spotrun.checkpoints import MANIFEST, CheckpointCorrupt

    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "weights.bin").write_bytes(os.urandom(9 << 20))  # over one 8 MiB chunk
    (src / "sub" / "deeper" / "opt.bin").write_bytes(os.urandom(1000))
    (src / "sub" / "empty.txt").write_bytes(b"")
    (src / MANIFEST).write_text('{"the program": "owns this name too"}')
    (src / "link").symlink_to(src / "weights.bin")  # not a regular file: not committed
    saved = ckpt_store.save_dir("job1", 3, 120, src, {"kind": "command"})
    again = ckpt_store.save_dir("job1", 3, 120, src)
    assert saved.path.startswith("jobs/job1/a0003-s000000120-") and again.path != saved.path
    assert saved.nbytes == (9 << 20) + 1000 + len((src / MANIFEST).read_bytes())

    back = tmp_path / "back"
    back.mkdir()
    loaded = ckpt_store.restore_dir(saved.path, back)
    assert (loaded.step, loaded.meta, loaded.files) == (120, {"kind": "command"}, {})
    expected = tree_digest(src)
    del expected["link"]
    assert tree_digest(back) == expected

    # A final commit (the program has exited) of a local store links instead of copying.
    final = ckpt_store.save_dir("job1", 3, 121, src, final=True)
    stored = f"{ckpt_store.root}/{final.path}/files/weights.bin"
    if ckpt_store.local:
        assert os.stat(stored).st_ino == (src / "weights.bin").stat().st_ino
    back2 = tmp_path / "back2"
    back2.mkdir()
    ckpt_store.restore_dir(final.path, back2)
    assert tree_digest(back2) == expected

    # One flipped byte, a truncated file, a manifest that points outside: refused, and
    # the directory is left empty rather than half-restored.
    fs, base = ckpt_store.fs, f"{ckpt_store.root}/{again.path}"
    data = bytearray(fs.cat_file(f"{base}/files/weights.bin"))
    data[5_000_000] ^= 1
    fs.pipe_file(f"{base}/files/weights.bin", bytes(data))
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(CheckpointCorrupt, match="fails its blake3 check"):
        ckpt_store.restore_dir(again.path, bad)
    assert list(bad.iterdir()) == []
    fs.pipe_file(f"{base}/files/weights.bin", bytes(data[:100]))
    with pytest.raises(CheckpointCorrupt, match="truncated"):
        ckpt_store.restore_dir(again.path, bad)
    assert list(bad.iterdir()) == []
    manifest = json.loads(fs.cat_file(f"{base}/{MANIFEST}"))
    manifest["files"] = {"files/../../escaped.txt": {"size": 1, "sha256": "0" * 64}}
    fs.pipe_file(f"{base}/{MANIFEST}", json.dumps(manifest).encode())
    with pytest.raises(CheckpointCorrupt, match="bad file path"):
        ckpt_store.restore_dir(again.path, bad)
    assert not (tmp_path / "escaped.txt").exists() and list(bad.iterdir()) == []
    # An uncommitted directory (no manifest) does not exist for readers.
    fs.rm_file(f"{base}/{MANIFEST}")
    with pytest.raises(CheckpointCorrupt, match="never committed"):
        ckpt_store.restore_dir(again.path, bad)


# ---------------------------------------------------------------- the notice


GROUP = """
    import hashlib, json, os, signal, subprocess, sys, time
    from pathlib import Path

    out = Path(sys.argv[1])
    ckpt = Path(os.environ["SPOTRUN_CHECKPOINT_DIR"])

    def digest(d):
        return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(d.rglob("*")) if p.is_file()}

    if os.environ["SPOTRUN_ATTEMPT"] == "1":
        assert not any(ckpt.iterdir()), "a first attempt starts with an empty directory"
        # A child in the program's group, that records the SIGTERM it gets.
        child = subprocess.Popen([sys.executable, "-c", (
            "import signal, sys, time, pathlib\\n"
            "out = pathlib.Path(sys.argv[1])\\n"
            "def got(*a):\\n"
            "    (out / 'child-got-sigterm').write_text('yes')\\n"
            "    sys.exit(0)\\n"
            "signal.signal(signal.SIGTERM, got)\\n"
            "(out / 'child-ready').write_text('yes')\\n"
            "time.sleep(120)\\n"), str(out)])
        stop = []
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
        while not (out / "child-ready").exists():
            time.sleep(0.01)
        print("spotrun:progress step=1 total=2", flush=True)
        while not stop:
            time.sleep(0.01)
        (ckpt / "sub" / "deeper").mkdir(parents=True)
        (ckpt / "weights.bin").write_bytes(os.urandom(3_000_000))
        (ckpt / "sub" / "deeper" / "opt.bin").write_bytes(os.urandom(1234))
        (ckpt / "sub" / "empty.txt").write_bytes(b"")
        (ckpt / "MANIFEST.json").write_text('{"the program": "owns this name too"}')
        (out / "saved.json").write_text(json.dumps(digest(ckpt)))
        child.wait()
        sys.exit(0)  # exit 0 after a notice: the job is handed back all the same
    with open(os.environ["SPOTRUN_RESULT_FILE"], "w") as fh:
        json.dump({"restored": digest(ckpt)}, fh)
"""


def test_sigterm_reaches_the_group_exit_0_hands_back_and_the_directory_comes_back_byte_for_byte(
        senv: Env, st: JobStore, tmp_path: Path) -> None:
    prog = script(tmp_path, "group.py", GROUP)
    out = tmp_path / "out"
    out.mkdir()
    w1 = senv.worker("w1")
    job_id = submit(senv, sys.executable, str(prog), str(out))
    at_step(st, job_id, 1)
    w1.signal(signal.SIGTERM)
    assert w1.wait(60) == 0, w1.log()
    job = handed_back(st, job_id, 1)
    assert job.state is not JobState.SUCCEEDED and job.result is None
    assert (out / "child-got-sigterm").read_text() == "yes"  # the whole group heard it
    assert any(m.startswith("preempted on w1") and "checkpoint saved" in m
               for m in messages(job)), messages(job)

    senv.worker("w2")
    job = final(st, job_id)
    assert job.state is JobState.SUCCEEDED, describe(st, job_id)
    saved = json.loads((out / "saved.json").read_text())
    assert len(saved) == 4
    assert job.result == {"restored": saved}


# ------------------------------------------------- a plain PyTorch script


def test_a_pytorch_script_preempted_three_times_ends_with_the_weights_of_an_uninterrupted_run(
        senv: Env, st: JobStore, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    steps = "150"
    ref = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", steps, "--save-every", "40"],
        env={**os.environ, "SPOTRUN_CHECKPOINT_DIR": str(tmp_path / "ref")},
        capture_output=True, text=True, timeout=300, check=True)
    reference = json.loads(ref.stdout.strip().splitlines()[-1])

    job_id = submit(senv, sys.executable, str(EXAMPLE), "--steps", steps,
                    "--save-every", "40", "--step-delay", "0.02")
    last = 0
    for n in range(1, 4):
        w = senv.worker(f"w{n}")
        at_step(st, job_id, last + 15, timeout=180)
        w.signal(signal.SIGTERM)
        assert w.wait(60) == 0, w.log()
        job = handed_back(st, job_id, n)
        assert job.progress.step > last
        last = job.progress.step
    senv.worker("w4")
    job = final(st, job_id, 240)
    assert job.state is JobState.SUCCEEDED, describe(st, job_id)
    assert job.preemptions == 3 and job.attempt == 4
    assert job.result == reference
    text = messages(job)
    assert sum("checkpoint saved" in m for m in text) == 3, text
    assert "resumed at step" in senv.cli("logs", job_id).stdout


# ------------------------------------------------------- the deadline


STUBBORN = """
    import os, signal, subprocess, sys, time
    from pathlib import Path

    out = Path(sys.argv[1])
    ckpt = Path(os.environ["SPOTRUN_CHECKPOINT_DIR"])
    if os.environ["SPOTRUN_ATTEMPT"] != "1":
        listing = {str(p.relative_to(ckpt)): p.read_text()
                   for p in sorted(ckpt.rglob("*")) if p.is_file()}
        import json
        with open(os.environ["SPOTRUN_RESULT_FILE"], "w") as fh:
            json.dump({"restored": listing}, fh)
        sys.exit(0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    grandchild = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    (out / "pids").write_text(f"{os.getpid()} {grandchild.pid}")
    (ckpt / "state.txt").write_text("committed at step 5")
    print("spotrun:progress step=5 total=10", flush=True)
    print("spotrun:checkpoint", flush=True)
    while not (out / "go").exists():
        time.sleep(0.01)
    # From here on the directory is always being written: whatever the kill interrupts.
    print("spotrun:progress step=6 total=10", flush=True)
    i = 0
    while True:
        (ckpt / "state.txt").write_text(f"half-written {i}")
        with open(ckpt / "partial.bin", "ab") as fh:
            fh.write(os.urandom(65536))
        i += 1
"""


def test_a_program_that_ignores_sigterm_is_killed_with_its_group_at_the_deadline_and_resumes_from_its_last_commit(  # noqa: E501
        senv: Env, st: JobStore, tmp_path: Path) -> None:
    prog = script(tmp_path, "stubborn.py", STUBBORN)
    out = tmp_path / "out"
    out.mkdir()
    w1 = senv.worker("w1", SPOTRUN_GRACE_SECONDS="3")
    job_id = submit(senv, sys.executable, str(prog), str(out))
    wait_until(lambda: st.get(job_id, with_events=False).checkpoint is not None, 90,
               "the requested commit", on_fail=lambda: describe(st, job_id))
    (out / "go").write_text("go")
    at_step(st, job_id, 6)
    pids = [int(x) for x in (out / "pids").read_text().split()]
    w1.signal(signal.SIGTERM)
    assert w1.wait(60) == 0, w1.log()
    job = handed_back(st, job_id, 1)
    assert any("before the step in flight finished" in m and "checkpoint at step 5" in m
               for m in messages(job)), messages(job)
    wait_until(lambda: not any(alive(p) for p in pids), 10,
               "the program and its grandchild to be gone")

    senv.worker("w2")
    job = final(st, job_id)
    assert job.state is JobState.SUCCEEDED, describe(st, job_id)
    assert job.result == {"restored": {"state.txt": "committed at step 5"}}


# ---------------------------------------------------------- periodic commits


PERIODIC = """
    import os, sys, time
    from pathlib import Path

    out = Path(sys.argv[1])
    ckpt = Path(os.environ["SPOTRUN_CHECKPOINT_DIR"])
    for step in (1, 2):
        (ckpt / "model.txt").write_text(f"weights at step {step}")
        (ckpt / "logs").mkdir(exist_ok=True)
        (ckpt / "logs" / f"step{step}.txt").write_text(str(step))
        print(f"spotrun:progress step={step} total=3", flush=True)
        print("spotrun:checkpoint", flush=True)
        while not (out / f"go{step}").exists():
            time.sleep(0.01)
        # The directory moves on after the commit; the commit keeps what it held then.
        (ckpt / "model.txt").write_text(f"moving past step {step}")
"""


def test_a_program_asks_for_commits_while_it_runs(senv: Env, st: JobStore,
                                                  tmp_path: Path) -> None:
    prog = script(tmp_path, "periodic.py", PERIODIC)
    out = tmp_path / "out"
    out.mkdir()
    senv.worker("w1")
    job_id = submit(senv, sys.executable, str(prog), str(out))
    ckpts = CheckpointStore(str(senv.home / "checkpoints"))
    seen: list[str] = []
    for step in (1, 2):
        def committed(step: int = step) -> str | None:
            path = st.get(job_id, with_events=False).checkpoint
            return path if path and path not in seen and f"-s{step:09d}-" in path else None

        path = str(wait_until(committed, 90, f"the commit at step {step}",
                              on_fail=lambda: describe(st, job_id)))
        seen.append(path)
        restored = tmp_path / f"restored{step}"
        restored.mkdir()
        loaded = ckpts.restore_dir(path, restored)
        assert loaded.step == step
        expected = {"model.txt": f"weights at step {step}",
                    **{f"logs/step{s}.txt": str(s) for s in range(1, step + 1)}}
        assert {str(p.relative_to(restored)): p.read_text()
                for p in restored.rglob("*") if p.is_file()} == expected
        (out / f"go{step}").write_text("go")
    job = final(st, job_id)
    assert job.state is JobState.SUCCEEDED, describe(st, job_id)
    assert sum(m.startswith("checkpoint at step") for m in messages(job)) == 2


CORRUPTED = """
    import json, os, signal, sys, time
    from pathlib import Path

    ckpt = Path(os.environ["SPOTRUN_CHECKPOINT_DIR"])
    if os.environ["SPOTRUN_ATTEMPT"] != "1":
        with open(os.environ["SPOTRUN_RESULT_FILE"], "w") as fh:
            json.dump({"restored": (ckpt / "model.txt").read_text()}, fh)
        sys.exit(0)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    for step in (1, 2):
        (ckpt / "model.txt").write_text(f"weights at step {step}")
        print(f"spotrun:progress step={step} total=3", flush=True)
        print("spotrun:checkpoint", flush=True)
        time.sleep(0.5)
    while not stop:
        time.sleep(0.01)
    (ckpt / "model.txt").write_text("weights at step 3")
    print("spotrun:progress step=3 total=3", flush=True)
"""


def test_a_corrupt_directory_checkpoint_is_refused_and_the_previous_one_restored(
        senv: Env, st: JobStore, tmp_path: Path) -> None:
    prog = script(tmp_path, "corrupted.py", CORRUPTED)
    w1 = senv.worker("w1")
    job_id = submit(senv, sys.executable, str(prog))
    wait_until(lambda: sum(m.startswith("checkpoint at step 2") for m in
                           messages(st.get(job_id))) == 1, 90, "the commit at step 2",
               on_fail=lambda: describe(st, job_id))
    w1.signal(signal.SIGTERM)
    assert w1.wait(60) == 0, w1.log()
    job = handed_back(st, job_id, 1)
    assert job.checkpoint is not None and f"-s{3:09d}-" in job.checkpoint
    stored = senv.home / "checkpoints" / job.checkpoint / "files" / "model.txt"
    assert stored.read_text() == "weights at step 3"
    stored.write_text("weights at step 4")  # same size, other bytes

    senv.worker("w2")
    job = final(st, job_id)
    assert job.state is JobState.SUCCEEDED, describe(st, job_id)
    assert job.result == {"restored": "weights at step 2"}
    assert any(m.startswith("checkpoint at step 3 is unusable: file files/model.txt fails "
                            "its blake3 check") and "previous checkpoint at step 2" in m
               for m in messages(job)), messages(job)


# ----------------------------------------------- result, progress and logs


RESULTS = """
    import json, os, sys
    kind = sys.argv[1]
    if kind == "result":
        print("spotrun:progress step=7 total=10 loss=0.25 phase=warmup", flush=True)
        print("spotrun:progress step=oops", flush=True)
        print("hello on stdout", flush=True)
        print("hello on stderr", file=sys.stderr, flush=True)
        with open(os.environ["SPOTRUN_RESULT_FILE"], "w") as fh:
            json.dump({"accuracy": 0.9, "env": os.environ.get("MY_SETTING"),
                       "cwd": os.getcwd()}, fh)
    elif kind == "plain":
        for i in range(3000):
            print(f"line {i}")
    elif kind == "fails":
        for i in range(30):
            print(f"trace line {i}", file=sys.stderr)
        sys.exit(3)
    elif kind == "bad-result":
        with open(os.environ["SPOTRUN_RESULT_FILE"], "w") as fh:
            fh.write("[1, 2]")
"""


def test_result_file_progress_lines_logs_and_exit_codes(senv: Env, st: JobStore,
                                                       tmp_path: Path) -> None:
    prog = script(tmp_path, "results.py", RESULTS)
    ids = {kind: submit(senv, sys.executable, str(prog), kind,
                        options=("-e", "MY_SETTING=42", "--cwd", str(tmp_path)))
           for kind in ("result", "plain", "fails", "bad-result")}
    senv.worker("w1", "--concurrency", "2")
    jobs = {kind: final(st, job_id) for kind, job_id in ids.items()}

    job = jobs["result"]
    assert job.state is JobState.SUCCEEDED, describe(st, job.id)
    assert job.result == {"accuracy": 0.9, "env": "42", "cwd": str(tmp_path)}
    assert job.progress.step == 7 and job.progress.total == 10
    assert job.progress.metrics == {"loss": 0.25, "phase": "warmup"}
    logs = senv.cli("logs", job.id).stdout
    assert "INFO    hello on stdout" in logs and "WARNING hello on stderr" in logs
    assert "ignored a malformed progress line" in logs
    assert "spotrun:progress step=7" not in logs  # protocol lines are not log lines

    job = jobs["plain"]
    assert job.state is JobState.SUCCEEDED and job.result == {"exit_code": 0}
    lines = st.logs(job.id)
    assert len(lines) == 2001 and "log truncated" in lines[-1].message

    job = jobs["fails"]
    assert job.state is JobState.FAILED
    assert job.error is not None
    first, *tail = job.error.splitlines()
    assert first == "CommandError: the program exited with code 3"
    assert [t.strip() for t in tail] == [f"trace line {i}" for i in range(20, 30)]

    job = jobs["bad-result"]
    assert job.state is JobState.FAILED
    assert job.error == "CommandError: SPOTRUN_RESULT_FILE must hold a JSON object, not list"


# ------------------------------------------------------ cancel and time limit


STOPPABLE = """
    import os, signal, sys, time
    from pathlib import Path
    out = Path(sys.argv[1])
    if sys.argv[2] == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        def bye(*a):
            (out / "term-heard").write_text("yes")
            sys.exit(0)
        signal.signal(signal.SIGTERM, bye)
    (out / f"{sys.argv[2]}.pid").write_text(str(os.getpid()))
    print("spotrun:progress step=1 total=100", flush=True)
    while True:
        time.sleep(0.05)
"""


def test_cancel_and_time_limit_send_sigterm_then_sigkill_after_the_grace(
        senv: Env, st: JobStore, tmp_path: Path) -> None:
    prog = script(tmp_path, "stoppable.py", STOPPABLE)
    out = tmp_path / "out"
    out.mkdir()
    stubborn = submit(senv, sys.executable, str(prog), str(out), "ignore",
                      options=("-p", "stop_grace_seconds=1"))
    polite = submit(senv, sys.executable, str(prog), str(out), "polite",
                    options=("--timeout", "2"))
    senv.worker("w1", "--concurrency", "2")
    at_step(st, stubborn, 1)
    senv.cli("cancel", stubborn)
    job = final(st, stubborn)
    assert job.state is JobState.CANCELLED, describe(st, stubborn)
    assert not alive(int((out / "ignore.pid").read_text()))

    job = final(st, polite)
    assert job.state is JobState.FAILED
    assert job.error is not None and "time limit of 2 s" in job.error
    assert (out / "term-heard").read_text() == "yes"


# ---------------------------------------------------------------- bad submits


def test_bad_submits_get_one_line(senv: Env) -> None:
    r = senv.cli("submit", "command", "--", check=False)
    assert r.returncode == 2
    assert r.stderr == ("spotrun: nothing to run: give the program after `--`, as in "
                        "`spotrun submit command -- python train.py`\n")
    r = senv.cli("submit", "command", "--", "/no/such/program", "--flag", check=False)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
    assert "'/no/such/program' was not found" in r.stderr
    r = senv.cli("submit", "command", "--", "no-such-program-anywhere", check=False)
    assert r.returncode == 2 and "not found on the PATH" in r.stderr
    r = senv.cli("submit", "command", "-e", "NOEQUALS", "--", "true", check=False)
    assert r.returncode == 2 and r.stderr == "spotrun: --env 'NOEQUALS' is not KEY=VALUE\n"
    r = senv.cli("submit", "sleep", "--", "true", check=False)
    assert r.returncode == 2 and "only for command jobs" in r.stderr
    s = senv.store()
    try:
        assert s.list_jobs() == []
    finally:
        s.close()


def test_a_program_the_worker_cannot_find_fails_its_job_in_one_line(
        env_factory: Any, pg_url: str) -> None:
    # With PostgreSQL the workers are elsewhere: the submit cannot know, the worker does.
    env: Env = env_factory(pg_url)
    job_id = env.cli("submit", "command", "--", "no-such-program-anywhere").stdout.strip()
    env.worker("w1")
    st = env.store()
    try:
        job = final(st, job_id)
    finally:
        st.close()
    assert job.state is JobState.FAILED
    assert job.error == ("CommandError: program 'no-such-program-anywhere' was not found "
                         "on the PATH on worker w1")


# ------------------------------------------------------------ who may submit


def test_only_an_admin_token_or_an_allowed_program_submits_command_jobs(
        sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    from starlette.exceptions import StarletteDeprecationWarning

    from spotrun.config import Settings
    from spotrun.http.app import create_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StarletteDeprecationWarning)
        from fastapi.testclient import TestClient

    monkeypatch.setenv("SPOTRUN_COMMAND_PROGRAMS", f"/usr/bin/true{os.pathsep}true")
    store = JobStore.open(sqlite_url)
    settings = Settings.from_env(home=str(tmp_path / "home"), database_url=sqlite_url)
    admin, alice = store.tokens.create("admin", admin=True), store.tokens.create("alice")
    try:
        with TestClient(create_app(settings, store=store, deliverer=False)) as client:
            def post(token: str, **params: Any) -> Any:
                return client.post("/v1/jobs", headers={"Authorization": f"Bearer {token}"},
                                   json={"pipeline": "command", "params": params})

            r = post(alice, argv=["/bin/sh", "-c", "echo hi"])
            assert r.status_code == 403
            assert r.json()["detail"].startswith("command jobs run programs on the workers: "
                                                 "only an admin token may submit them")
            # Only absolute paths count: a bare name could find another program on the
            # worker's PATH.
            assert post(alice, argv=["true"]).status_code == 403
            r = post(alice, argv=["/usr/bin/true"], env={"LD_PRELOAD": "/tmp/evil.so"})
            assert r.status_code == 403
            assert r.json()["detail"] == "only an admin token may set env for a command job"
            r = post(alice, argv=["/usr/bin/true"])
            assert r.status_code == 201, r.text
            r = post(admin, argv=["/bin/sh", "-c", "echo hi"], env={"A": "1"}, cwd="/tmp")
            assert r.status_code == 201, r.text
            assert r.json()["params"]["argv"] == ["/bin/sh", "-c", "echo hi"]
            r = post(admin, argv=[])
            assert r.status_code == 422

            # The dashboard's form obeys the same rule (signed in with a session each).
            origin = {"Origin": "http://testserver"}
            client.cookies.set("spotrun_session",
                               store.tokens.create_session("alice", expires_in=600))
            r = client.get("/submit?pipeline=command")
            assert r.status_code == 200 and 'name="argv"' in r.text
            form = {"pipeline": "command", "argv": '["/bin/sh", "-c", "echo hi"]',
                    "on_preempt": "resume"}
            r = client.post("/submit", data=form, headers=origin, follow_redirects=False)
            assert r.status_code == 403 and "only an admin token" in r.text
            client.cookies.set("spotrun_session",
                               store.tokens.create_session("admin", expires_in=600))
            r = client.post("/submit", data=form, headers=origin, follow_redirects=False)
            assert r.status_code == 303, r.text
        assert [j.owner for j in store.list_jobs()].count("alice") == 1
        assert len(store.list_jobs()) == 3
    finally:
        store.close()
