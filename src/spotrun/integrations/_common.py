"""What the Lightning and Hugging Face integrations share: the job's step boundary, the
global RNGs held still across work that must not consume them, and a framework's nested
state (dicts, lists, tensors, numbers) stored as safetensors + JSON.

Imports torch: only a running pipeline imports this module.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from typing import Any

import torch

from spotrun.integrations.torch import _decode, _encode, _for_safetensors


class RngSnapshot:
    """The global RNGs (Python, NumPy, torch CPU, every started CUDA device) at one moment,
    kept in memory, to be put back with :meth:`restore`."""

    def __init__(self) -> None:
        self.python = random.getstate()
        self.torch = torch.get_rng_state()
        self.numpy: Any = None
        try:
            import numpy

            self.numpy = numpy.random.get_state()
        except ImportError:  # pragma: no cover - numpy is in the ml extra
            pass
        started = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
        self.cuda = torch.cuda.get_rng_state_all() if started else []

    def restore(self) -> None:
        random.setstate(self.python)
        torch.set_rng_state(self.torch)
        if self.numpy is not None:
            import numpy

            numpy.random.set_state(self.numpy)
        if self.cuda:
            torch.cuda.set_rng_state_all(self.cuda)


def tree_to_files(tree: Any, name: str, fmt: str, **extra: Any) -> dict[str, bytes]:
    """``tree`` as ``{name}.safetensors`` (its tensors) and ``{name}.json`` (the rest, with
    references to the tensors; ``fmt`` and ``extra`` beside it). Raises ``TypeError``
    naming the first value that only pickle could store."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    doc = {"format": fmt, "tree": _encode(tree, name, tensors), **extra}
    return {f"{name}.safetensors": save(_for_safetensors(tensors)),
            f"{name}.json": json.dumps(doc, sort_keys=True, allow_nan=True).encode()}


def tree_from_files(files: Mapping[str, bytes], name: str, fmt: str) -> tuple[Any, dict[str, Any]]:
    """The tree :func:`tree_to_files` stored, and the JSON document around it."""
    from safetensors.torch import load

    # start-up: torch; the Lightning and HF callbacks import this module before torch
    from spotrun.integrations.torch import StateMismatch

    missing = [f for f in (f"{name}.safetensors", f"{name}.json") if f not in files]
    if missing:
        raise StateMismatch(f"not a {fmt} checkpoint: no {', '.join(missing)}")
    doc = json.loads(files[f"{name}.json"])
    if doc.get("format") != fmt:
        raise StateMismatch(f"checkpoint format {doc.get('format')!r} is not {fmt!r}")
    return _decode(doc["tree"], load(files[f"{name}.safetensors"])), doc


def scalar_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    """The numbers among logged values (0-d tensors included), rounded for the history."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.detach().float().item()
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        out[str(key)] = round(float(value), 6)
    return out
