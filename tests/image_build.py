"""The container image's build (``.ci/image``), started in the background as soon as the
session knows it will run the image tests, so that its minutes of debootstrap, pip and
layer commits overlap the rest of the suite instead of adding to it.

The build runs at the lowest CPU priority (``nice``): the tests that run meanwhile get the
processors first. Not at the idle I/O class: the tests' steady fsyncs would starve it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Build:
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    started: float


_build: Build | None = None


def start() -> Build:
    """Start the build once per session (later calls return the same one)."""
    global _build
    if _build is None:
        folder = Path(tempfile.mkdtemp(prefix="spotrun-image-build-"))
        out, err = folder / "stdout", folder / "stderr"
        low = ["nice", "-n", "19"]
        with out.open("wb") as o, err.open("wb") as e:
            proc = subprocess.Popen([*low, str(ROOT / ".ci" / "image")], stdout=o, stderr=e,
                                    stdin=subprocess.DEVNULL,
                                    env={**os.environ, "PYTHON": sys.executable})
        _build = Build(proc, out, err, time.monotonic())
    return _build


def result(timeout: float) -> tuple[int, str, str, float]:
    """Wait for the build: its exit code, stdout, stderr and seconds since it started."""
    b = start()
    try:
        code = b.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        b.proc.kill()
        b.proc.wait()
        code = -9
    return (code, b.out.read_text(errors="replace"), b.err.read_text(errors="replace"),
            time.monotonic() - b.started)


def stop() -> None:
    """End a build still running when the session ends (the image tests did not run)."""
    if _build is not None and _build.proc.poll() is None:
        _build.proc.kill()
        _build.proc.wait()
