"""What every benchmark script shares: bad input ends as one line, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from overlap.errors import OverlapError


def run_main(main: Callable[[], int | None]) -> int:
    """Run a benchmark's ``main``; a user error (bad flag value, unwritable path) exits 2."""
    try:
        return main() or 0
    except (OverlapError, OSError) as exc:
        print(f"{sys.argv[0]}: error: {exc}", file=sys.stderr)
        return 2
