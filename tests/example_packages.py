"""The packages under examples/, made importable for real spotrun processes as if each had
been ``pip install``-ed: its modules on ``PYTHONPATH`` and a ``dist-info`` carrying the
entry points its ``pyproject.toml`` declares (no build, no network)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def install_example(name: str, site: Path) -> str:
    """Install ``examples/<name>`` into ``site``; return the ``PYTHONPATH`` to run with."""
    root = EXAMPLES / name
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    dist = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    lines = []
    for group, points in project.get("entry-points", {}).items():
        lines.append(f"[{group}]")
        lines += [f"{k} = {v}" for k, v in points.items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return os.pathsep.join([str(site), str(root)])
