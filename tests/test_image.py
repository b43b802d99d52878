"""The container image, built from the Dockerfile and run the way a kubelet runs it.

``.ci/image`` builds it with buildah (no Docker daemon) on a Debian bookworm base made with
debootstrap. Each test runs the image's root filesystem (``buildah mount``) as PID 1 of a
fresh PID namespace (``unshare --pid --fork --mount-proc`` and chroot), with the image's
ENTRYPOINT, user, working directory and environment, against the real PostgreSQL. Then,
as the kubelet does, SIGTERM goes to that PID 1, and ``spotrun doctor`` runs inside it
(``nsenter``, as ``kubectl exec`` does).

Needs root, buildah, debootstrap and util-linux; skipped without them, failed in CI.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import IN_CI, wait_until
from spotrun.jobs import JobState
from spotrun.store import JobStore

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("buildah", "debootstrap", "unshare", "nsenter", "chroot", "mount")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

_missing = [t for t in TOOLS if shutil.which(t) is None]
if os.geteuid() != 0:
    _missing.append("root")
if _missing:
    _why = (f"building and running the image needs {', '.join(_missing)} "
            "(apt-get install -y buildah debootstrap, as root)")
    if IN_CI:
        raise RuntimeError(_why)
    pytest.skip(_why, allow_module_level=True)


@dataclass
class Image:
    tag: str
    rootfs: Path  # the image's root filesystem, mounted
    config: dict[str, Any]  # the OCI config: Entrypoint, Cmd, User, Env, WorkingDir
    nbytes: int


def _run(*cmd: str, timeout: float = 60) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    start = time.monotonic()
    # At the lowest CPU priority: under pytest-xdist the other process's tests, some of
    # which race a grace period, get the processors first.
    build = subprocess.run(["nice", "-n", "19", str(ROOT / ".ci" / "image")],
                           capture_output=True, text=True, timeout=1100,
                           env={**os.environ, "PYTHON": sys.executable})
    assert build.returncode == 0, build.stderr[-5000:]
    tag = build.stdout.strip().splitlines()[-1]
    print(f"\nimage {tag} built in {time.monotonic() - start:.0f} s")
    config = json.loads(_run("buildah", "inspect", "--type", "image", tag))["OCIv1"]["config"]
    ctr = _run("buildah", "from", "--pull-never", tag).strip()
    try:
        rootfs = Path(_run("buildah", "mount", ctr).strip())
        nbytes = int(_run("du", "-sb", "--one-file-system", str(rootfs),
                          timeout=300).split()[0])
        print(f"image {tag}: {nbytes / 1e6:.0f} MB unpacked")
        yield Image(tag, rootfs, config, nbytes)
    finally:
        subprocess.run(["buildah", "umount", ctr], capture_output=True)
        subprocess.run(["buildah", "rm", ctr], capture_output=True)


class Container:
    """The image's root filesystem run as PID 1 of its own PID and mount namespaces."""

    def __init__(self, image: Image, log: Path, env: dict[str, str],
                 command: list[str] | None = None) -> None:
        cfg = image.config
        self.env = [*cfg.get("Env", []), *(f"{k}={v}" for k, v in env.items())]
        argv = command if command is not None else [*cfg["Entrypoint"], *cfg["Cmd"]]
        user = cfg["User"]
        root = str(image.rootfs)
        # The host-side shell only bind-mounts /dev into the new mount namespace, then execs
        # chroot, which execs env, which execs the image's command: that command is PID 1.
        setup = f'mount --bind /dev "{root}/dev" && exec "$@"'
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", f"--mount-proc={root}/proc",
             "/bin/sh", "-c", setup, "sh",
             "chroot", f"--userspec={user}", root,
             "/usr/bin/env", "-i", "-C", cfg.get("WorkingDir") or "/", *self.env, *argv],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.pid1 = wait_until(self._child, 30, "the container's PID 1", on_fail=self.log)

    def _child(self) -> int | None:
        try:
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return None
        return int(kids.split()[0]) if kids.split() else None

    def pid1_comm(self) -> str:
        return Path(f"/proc/{self.pid1}/comm").read_text().strip()

    def exec(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run a command inside, as ``kubectl exec`` would: same namespaces, root, user."""
        uid, gid = self.env_user()
        return subprocess.run(
            ["nsenter", "-t", str(self.pid1), "--pid", "--mount", "--root", "--wd",
             f"--setuid={uid}", f"--setgid={gid}", "/usr/bin/env", "-i", *self.env, *argv],
            capture_output=True, text=True, timeout=120)

    def env_user(self) -> tuple[str, str]:
        user = next(e for e in self.env if e.startswith("SPOTRUN_TEST_USER=")).split("=", 1)[1]
        uid, _, gid = user.partition(":")
        return uid, gid or uid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid1, signal.SIGKILL)  # takes the whole PID namespace with it
            self.proc.wait(30)
        self._log.close()


@pytest.fixture
def containers(image: Image, tmp_path: Path, pg_url: str) -> Iterator[list[Container]]:
    made: list[Container] = []
    yield made
    for c in made:
        c.stop()


def _start(image: Image, tmp_path: Path, pg_url: str, made: list[Container],
           command: list[str] | None = None) -> Container:
    env = {"SPOTRUN_DATABASE_URL": pg_url, "SPOTRUN_PREEMPTION_SOURCES": "signal",
           "SPOTRUN_GRACE_SECONDS": "13", "SPOTRUN_POD_TERMINATION_GRACE_SECONDS": "15",
           "SPOTRUN_TEST_USER": image.config["User"]}
    c = Container(image, tmp_path / f"container-{len(made)}.log", env, command)
    made.append(c)
    return c


def _running_past(st: JobStore, job_id: str, step: int) -> bool:
    job = st.get(job_id, with_events=False)
    return job.state is JobState.RUNNING and job.progress.step >= step


def _signal_check(c: Container) -> dict[str, Any]:
    proc = c.exec("spotrun", "doctor", "--json")
    assert proc.stdout, proc.stderr
    checks: list[dict[str, Any]] = json.loads(proc.stdout)
    return next(ch for ch in checks if ch["check"] == "signal path")


def test_the_image_is_what_the_dockerfile_says(image: Image) -> None:
    cfg = image.config
    assert cfg["Entrypoint"] == ["tini", "--", "spotrun"] and cfg["Cmd"] == ["worker"]
    assert cfg["User"] == "10001:10001" and cfg["WorkingDir"] == "/var/lib/spotrun"
    assert "SPOTRUN_HOME=/var/lib/spotrun" in cfg["Env"]
    assert (image.rootfs / "opt/spotrun/bin/spotrun").is_file()
    assert (image.rootfs / "usr/bin/tini").is_file()
    assert (image.rootfs / "var/lib/spotrun").stat().st_uid == 10001
    assert not (image.rootfs / "src").exists()  # the build stage's copy stays behind
    assert image.nbytes > 0


def test_sigterm_to_pid_1_hands_the_job_back_with_a_checkpoint(
        image: Image, tmp_path: Path, pg_url: str, containers: list[Container]) -> None:
    st = JobStore.open(pg_url)
    job_id = st.submit("sleep", {"seconds": 600, "steps": 6000}).id
    c = _start(image, tmp_path, pg_url, containers)
    wait_until(lambda: _running_past(st, job_id, 20), 120, "the job to run in the container",
               on_fail=c.log)
    assert c.pid1_comm() == "tini"  # the ENTRYPOINT's first word, by then exec'd
    check = _signal_check(c)
    assert check["status"] == "ok" and "PID 1 is tini" in check["detail"], check

    os.kill(c.pid1, signal.SIGTERM)  # what the kubelet does
    assert c.wait(60) == 0, c.log()
    job = st.get(job_id)
    assert job.state is JobState.QUEUED and job.preemptions == 1, [e.message for e in job.events]
    handed = next(e for e in reversed(job.events) if e.kind == "preempted")
    assert "checkpoint saved in" in handed.message, handed.message
    assert job.checkpoint is not None
    ckpt = image.rootfs / "var/lib/spotrun/checkpoints" / job.checkpoint / "MANIFEST.json"
    assert ckpt.is_file() and ckpt.stat().st_uid == 10001
    st.close()


def test_a_shell_as_pid_1_is_reported_and_loses_the_notice(
        image: Image, tmp_path: Path, pg_url: str, containers: list[Container]) -> None:
    st = JobStore.open(pg_url)
    job_id = st.submit("sleep", {"seconds": 600, "steps": 6000}).id
    # command: ["sh", "-c", "spotrun worker"] in a pod spec replaces the ENTRYPOINT.
    c = _start(image, tmp_path, pg_url, containers, ["sh", "-c", "spotrun worker"])
    wait_until(lambda: _running_past(st, job_id, 20), 120, "the job to run in the container",
               on_fail=c.log)
    assert c.pid1_comm() == "sh"
    check = _signal_check(c)
    assert check["status"] == "fail" and "PID 1 is a shell" in check["detail"], check

    os.kill(c.pid1, signal.SIGTERM)
    at = st.get(job_id, with_events=False).progress.step
    # The shell ignores it: the job goes on, 30 steps (3 s of work) past the notice...
    wait_until(lambda: _running_past(st, job_id, at + 30), 60, "the job to go on",
               on_fail=c.log)
    assert c.proc.poll() is None
    # ...until the grace period ends and the kubelet sends SIGKILL.
    c.stop()
    job = st.get(job_id)
    assert job.preemptions == 0
    assert not [e for e in job.events if e.kind == "preempted"], [e.message for e in job.events]
    assert "SIGTERM" not in c.log()
    st.close()
