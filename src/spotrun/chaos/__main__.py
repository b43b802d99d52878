"""``python -m spotrun.chaos --reference``: the drill's reference runs, in a child."""

from __future__ import annotations

import sys

from spotrun.chaos.cli import reference_main

if sys.argv[1:] == ["--reference"]:
    sys.exit(reference_main())
sys.exit("usage: spotrun chaos (this module's own entry point is internal)")
