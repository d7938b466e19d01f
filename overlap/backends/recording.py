"""The ``recording`` backend: a test double that logs what the executor issues.

It keeps the exact sequence of submit / record / wait / host_wait calls, so a test (or the vLLM
plugin's tests) can check *what was issued in which order on which stream* without a device.
With ``run=True`` (the default) it also runs each submitted callable at once, like ``inline``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from overlap.plan.plan import Stream


class Issue(NamedTuple):
    """One backend call: ``action`` on ``stream`` with a step label or an event number."""

    action: str  # "submit" | "record" | "wait" | "host_wait" | "synchronize"
    stream: str
    what: str | int | None = None

    def __str__(self) -> str:
        if self.what is None:
            return f"{self.stream}: {self.action}"
        what = self.what if isinstance(self.what, str) else f"e{self.what}"
        return f"{self.stream}: {self.action} {what}"


class RecordingBackend:
    """Records the issue/record/wait sequence; events are numbered from 0 in record order."""

    name = "recording"

    def __init__(self, run: bool = True) -> None:
        self.run = run
        self.log: list[Issue] = []
        self._events = 0

    def make_stream(self, stream: Stream) -> str:
        return stream.name

    def submit(self, handle: str, fn: Callable[[], None], label: str) -> None:
        self.log.append(Issue("submit", handle, label))
        if self.run:
            fn()

    def record(self, handle: str) -> int:
        event, self._events = self._events, self._events + 1
        self.log.append(Issue("record", handle, event))
        return event

    def wait(self, handle: str, event: Any) -> None:
        self.log.append(Issue("wait", handle, event))

    def host_wait(self, event: Any) -> None:
        self.log.append(Issue("host_wait", "host", event))

    def synchronize(self) -> None:
        self.log.append(Issue("synchronize", "host"))

    def close(self) -> None:
        pass

    def lines(self) -> list[str]:
        """The log as text lines, e.g. ``comm: wait e3``."""
        return [str(issue) for issue in self.log]

    def clear(self) -> None:
        """Forget the log (event numbers keep counting)."""
        self.log.clear()
