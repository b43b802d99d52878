"""The command line as scripts use it: output contract, one-line errors, fast start."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable

import pytest

from conftest import Env, wait_until


@pytest.fixture
def cli_env(env_factory: Callable[..., Env], sqlite_url: str) -> Env:
    return env_factory(sqlite_url)


def test_submit_prints_the_id_and_show_json_has_the_contract(cli_env: Env) -> None:
    out = cli_env.cli("submit", "sleep", "-p", "seconds=0.5", "-p", "steps=5",
                      "--priority", "3", "--max-retries", "2").stdout
    job_id = out.strip()
    assert "\n" not in job_id and len(job_id) > 10
    shown = json.loads(cli_env.cli("show", job_id, "--json").stdout)
    for key in ("id", "pipeline", "params", "state", "attempt", "preemptions", "retries",
                "worker", "progress", "result", "error", "created_at", "updated_at",
                "events"):
        assert key in shown
    assert shown["id"] == job_id and isinstance(shown["id"], str)
    assert shown["params"] == {"seconds": 0.5, "steps": 5, "state_mb": 0.0, "fail": False}
    assert shown["state"] == "queued" and shown["worker"] is None
    assert shown["events"][0]["message"] == "queued"
    listed = json.loads(cli_env.cli("jobs", "--json").stdout)
    assert [j["id"] for j in listed] == [job_id]
    as_json = json.loads(cli_env.cli("submit", "sleep", "--json").stdout)
    assert as_json["pipeline"] == "sleep"
    assert len(json.loads(cli_env.cli("jobs", "--json", "--limit", "1").stdout)) == 1
    assert "seconds" in cli_env.cli("pipelines").stdout


@pytest.mark.parametrize("args, message", [
    (["submit", "nope"], "unknown pipeline 'nope'; known pipelines: command, "
                         "digits-infer, digits-train, minilm-embed, minilm-finetune, sleep"),
    (["submit", "digits-train", "-p", "colour=red"], "unknown param 'colour'"),
    (["submit", "digits-train", "-p", "epochs=many"], "param 'epochs'"),
    (["submit", "digits-train", "-p", "epochs=0"], "param 'epochs': Input should be "
                                                   "greater than or equal to 1"),
    (["submit", "digits-train", "-p", "device=tpu"], "param 'device'"),
    (["submit", "sleep", "-p", "seconds"], "bad param 'seconds': expected key=value"),
    (["submit", "digits-infer", "-p", "model=missing"], "'model': is not a job id"),
    (["submit", "digits-infer", "-p", "model=" + "0" * 28], "no job with id '" + "0" * 28),
    (["submit", "digits-infer"], "param 'model' is required"),
    (["submit", "sleep", "-p", "seconds=1", "-p", "seconds=2"], "param 'seconds' is given twice"),
    (["submit", "sleep", "-p", "seconds=nan"], "param 'seconds': Input should be a finite"),
    (["submit", "sleep", "--priority", "99999999999999999999"],
     "Invalid value for '--priority'"),
    (["submit", "sleep", "--timeout", "-1"], "Invalid value for '--timeout'"),
    (["submit", "sleep", "--pool", "Spot Pool"], "is not a pool name"),
    (["submit", "sleep", "--on-preempt", "later"], "Invalid value for '--on-preempt'"),
    (["jobs", "--state", "sleeping"], "Invalid value for '--state'"),
    (["worker", "--concurrency", "0"], "Invalid value for '--concurrency'"),
    (["token", "create", ""], "bad token name ''"),
    (["nosuchcommand"], "No such command 'nosuchcommand'"),
    (["show", "nope"], "no job with id 'nope'"),
    (["cancel", "nope"], "no job with id 'nope'"),
    (["logs", "nope"], "no job with id 'nope'"),
])
def test_bad_input_is_one_line_and_creates_nothing(cli_env: Env, args: list[str],
                                                   message: str) -> None:
    proc = cli_env.cli(*args, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert message in proc.stderr
    assert json.loads(cli_env.cli("jobs", "--json").stdout) == []


def test_wait_exit_codes(cli_env: Env) -> None:
    assert cli_env.cli("wait", "nope", check=False).returncode == 1
    job_id = cli_env.cli("submit", "sleep").stdout.strip()
    proc = cli_env.cli("wait", job_id, "--timeout", "0.3", check=False)
    assert proc.returncode == 3
    cli_env.cli("cancel", job_id)
    proc = cli_env.cli("wait", job_id, check=False)
    assert proc.returncode == 1 and "cancelled" in proc.stdout


def test_unreachable_database_is_one_line(cli_env: Env) -> None:
    proc = cli_env.cli("--database-url", "postgresql://u:s3cret@127.0.0.1:1/x", "jobs",
                       check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("spotrun: cannot reach the database at "
                                  "postgresql+psycopg://u:***@127.0.0.1:1/x")
    assert "s3cret" not in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("var, value, message", [
    ("SPOTRUN_LEASE_SECONDS", "soon", "SPOTRUN_LEASE_SECONDS='soon' is not a number"),
    ("SPOTRUN_LEASE_SECONDS", "nan", "SPOTRUN_LEASE_SECONDS='nan' must be a finite number"),
    ("SPOTRUN_MAX_PREEMPTIONS", "2.5", "SPOTRUN_MAX_PREEMPTIONS='2.5' must be a whole number"),
    ("SPOTRUN_DATABASE_URL", "nonsense", "the database URL is not one spotrun can use"),
    ("SPOTRUN_HOME", "/etc/passwd", "SPOTRUN_HOME='/etc/passwd' is not a directory"),
    ("SPOTRUN_POOL", "Spot!", "SPOTRUN_POOL='Spot!' is not a pool name"),
])
def test_bad_settings_are_one_line(cli_env: Env, var: str, value: str, message: str) -> None:
    env = {**cli_env.vars, var: value}
    if var == "SPOTRUN_HOME":
        del env["SPOTRUN_DATABASE_URL"]
    proc = subprocess.run([sys.executable, "-m", "spotrun", "jobs"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"spotrun: {message}") and proc.stderr.count("\n") == 1


def test_an_unknown_checkpoint_store_is_one_line(cli_env: Env) -> None:
    proc = subprocess.run([sys.executable, "-m", "spotrun", "worker", "--no-preload"],
                          capture_output=True, text=True,
                          env={**cli_env.vars, "SPOTRUN_CHECKPOINT_URL": "nosuch://x"},
                          timeout=60)
    assert proc.returncode == 2
    assert "SPOTRUN_CHECKPOINT_URL='nosuch://x' cannot be used" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_commands_that_run_no_pipeline_import_no_ml_library(cli_env: Env) -> None:
    code = (
        "import sys\n"
        "from spotrun.cli import app\n"
        "for args in (['submit', 'digits-train', '-p', 'epochs=1'], ['jobs'], "
        "['pipelines']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in ('torch', 'sklearn', 'safetensors', 'fastapi') "
        "if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=cli_env.vars, timeout=60)
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr


def test_help_pages_load_neither_the_database_layer_nor_rich(cli_env: Env) -> None:
    """What made `spotrun --help` take 0.6 s: SQLAlchemy and rich's help formatting."""
    code = (
        "import sys\n"
        "from spotrun.cli import main\n"
        "sys.argv = ['spotrun', *sys.argv[1:]]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('HEAVY', [m for m in ('sqlalchemy', 'rich', 'psycopg') if m in sys.modules])\n"
    )
    for args in ([], ["--help"], ["submit", "--help"], ["token", "--help"]):
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                              text=True, env=cli_env.vars, timeout=60)
        assert "Usage: spotrun" in proc.stdout + proc.stderr, (args, proc.stdout, proc.stderr)
        assert "HEAVY []" in proc.stdout, (args, proc.stdout, proc.stderr)


def test_preempt_names_the_host_of_a_remote_worker(cli_env: Env) -> None:
    store = cli_env.store()
    store.register_worker(name="far", host="another-host", pid=1, pool="spot",
                          has_cuda=False, lease_seconds=10)
    store.close()
    proc = cli_env.cli("preempt", "far", check=False)
    assert proc.returncode == 2
    assert "worker far runs on host another-host, not here" in proc.stderr
    proc = cli_env.cli("preempt", "nobody", check=False)
    assert proc.returncode == 2 and "no live worker named 'nobody'" in proc.stderr


@pytest.mark.slow
def test_preempt_a_local_worker_gracefully_and_hard(cli_env: Env) -> None:
    store = cli_env.store()
    w1 = cli_env.worker("w1")
    job_id = cli_env.cli("submit", "sleep", "-p", "seconds=30", "-p", "steps=300").stdout.strip()
    wait_until(lambda: store.get(job_id, with_events=False).progress.step >= 2, 60, "a step")
    out = cli_env.cli("preempt", "w1").stdout
    assert "sent SIGTERM to worker w1" in out and "worker w1 exited" in out
    assert w1.wait(10) == 0
    job = store.get(job_id)
    assert job.state.value == "queued" and job.preemptions == 1
    w2 = cli_env.worker("w2")
    wait_until(lambda: store.get(job_id, with_events=False).worker == "w2", 60, "w2")
    out = cli_env.cli("preempt", "--all", "--hard").stdout
    assert "sent SIGKILL to worker w2" in out
    assert w2.wait(10) == -signal.SIGKILL
    store.close()


@pytest.mark.slow
def test_demo_tells_the_whole_story(cli_env: Env) -> None:
    proc = cli_env.cli("demo", "--epochs", "4", timeout=300)
    out = proc.stdout
    assert "preempting demo-w" in out and "handed the job back and exited 0" in out
    assert "resumed on demo-w" in out
    assert "identical: the preemption cost no work" in out
