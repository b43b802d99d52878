"""The README's commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command() -> None:
    blocks = re.findall(r"```sh\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    test_command = blocks[1].strip()
    assert test_command.endswith("&& pytest")
    assert test_command in (ROOT / ".ci" / "run").read_text()
    assert blocks[0].strip().startswith("python3 -m venv .venv")
    assert "spotrun demo" in blocks[0]
