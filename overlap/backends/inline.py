"""The ``inline`` backend: every step runs on the calling thread, in host issue order.

No streams and no events — issue order already satisfies every dependency of a valid plan — so
this is the fastest way to run a plan on CPU, and the reference the other backends are checked
against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from overlap.plan.plan import Stream


class InlineBackend:
    """Runs work immediately when it is submitted; a failure propagates from ``submit``."""

    name = "inline"
    immediate = True  # the executor may call steps itself instead of submitting them

    def make_stream(self, stream: Stream) -> str:
        return stream.name

    def submit(self, handle: Any, fn: Callable[[], None], label: str) -> None:
        fn()

    def record(self, handle: Any) -> None:
        return None

    def wait(self, handle: Any, event: Any) -> None:
        pass

    def host_wait(self, event: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        pass
