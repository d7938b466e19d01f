"""The ``threads`` backend: each plan stream is a worker thread, events are ``threading.Event``.

This gives a plan real concurrency on CPU, so the orderings a device would exploit are exercised
for real: a wait missing from a plan lets a step run before the value it reads exists, which the
executor reports instead of computing garbage. Ops that release the GIL (torch kernels, sleeps,
I/O) genuinely overlap.

A worker runs its queue in order: ``run`` items, ``set`` items (an event recorded after the work
before it) and ``wait`` items (block until another stream's event is set). After a failure the
workers skip the remaining ``run`` items but still set and wait for events, so every stream
drains and nothing blocks; :meth:`ThreadsBackend.synchronize` then joins the workers and raises
the failure. Workers start again on the next submission.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from overlap.plan.plan import Stream

_RUN, _SET, _WAIT, _STOP = range(4)


class _Worker:
    """One stream: a FIFO of items and the thread that works through it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.queue: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<stream {self.name}>"


class ThreadsBackend:
    """CPU streams as worker threads (one per plan stream), synchronised with events."""

    name = "threads"

    def __init__(self) -> None:
        self._workers: list[_Worker] = []
        self._failure: BaseException | None = None
        self._lock = threading.Lock()

    def make_stream(self, stream: Stream) -> _Worker:
        worker = _Worker(stream.name)
        self._workers.append(worker)
        return worker

    def _started(self, worker: _Worker) -> _Worker:
        if worker.thread is None:
            worker.thread = threading.Thread(target=self._work, args=(worker,),
                                             name=f"overlap-stream-{worker.name}", daemon=True)
            worker.thread.start()
        return worker

    def _work(self, worker: _Worker) -> None:
        get = worker.queue.get
        while True:
            item = get()
            kind = item[0]
            if kind == _RUN:
                if self._failure is None:
                    try:
                        item[1]()
                    except BaseException as exc:  # reported by synchronize, on the host thread
                        with self._lock:
                            if self._failure is None:
                                self._failure = exc
            elif kind == _SET:
                item[1].set()
            elif kind == _WAIT:
                item[1].wait()
            else:
                return

    def submit(self, handle: _Worker, fn: Callable[[], None], label: str) -> None:
        self._started(handle).queue.put((_RUN, fn, label))

    def record(self, handle: _Worker) -> threading.Event:
        event = threading.Event()
        self._started(handle).queue.put((_SET, event))
        return event

    def wait(self, handle: _Worker, event: Any) -> None:
        self._started(handle).queue.put((_WAIT, event))

    def host_wait(self, event: Any) -> None:
        event.wait()

    def synchronize(self) -> None:
        """Wait until every stream has run what it was given; on failure join them and raise."""
        for event in [self.record(w) for w in self._workers if w.thread is not None]:
            event.wait()
        failure, self._failure = self._failure, None
        if failure is not None:
            self._stop()
            raise failure

    def _stop(self) -> None:
        for worker in self._workers:
            if worker.thread is not None:
                worker.queue.put((_STOP,))
        for worker in self._workers:
            if worker.thread is not None:
                worker.thread.join()
                worker.thread = None

    def close(self) -> None:
        """Stop and join every worker thread (after the work already queued)."""
        self._stop()
