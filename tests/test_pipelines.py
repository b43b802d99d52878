"""The built-in pipelines, run inline."""

from __future__ import annotations

from spotrun.local import run_inline


def test_sleep_holds_state_larger_than_one_randbytes_call() -> None:
    # One random.randbytes call stops at about 256 MB; 300 MB of state must still work.
    result = run_inline("sleep", {"seconds": 0, "steps": 1, "state_mb": 300})
    assert result == {"slept": 0.0, "steps": 1, "resumed_from": 0}
