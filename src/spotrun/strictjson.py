"""JSON without NaN: the one place that turns a value into JSON that any parser reads.

A pipeline's result or metrics may hold NaN or an infinity (a diverged loss); JSON has no
such numbers, so they become null. The store writes its columns with :func:`finite`, the
HTTP API, the callbacks and the bus events send :func:`json_bytes`.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None, in nested dicts and lists too."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def json_bytes(value: Any) -> bytes:
    """Compact UTF-8 JSON of ``value``; NaN and infinities are sent as null."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:
        text = json.dumps(finite(value), ensure_ascii=False, allow_nan=False,
                          separators=(",", ":"))
    return text.encode("utf-8", errors="replace")
