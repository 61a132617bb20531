"""The driver's MLflow writes for a running stage, made in order by one thread: an outage of the
tracking server holds them (each write retried, see tracking.retried) while the stage trains on,
and the driver keeps taking what the workers send."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

from launch.tracking import retried


class TrackingQueue:
    def __init__(self, patience_s: float, stored_through: int = -1, say: Callable[[str], None] = print):
        self.patience_s, self.say = patience_s, say
        self._writes: deque[tuple[str, Callable[[], None], int | None, float]] = deque()
        self._ready = threading.Condition()
        self._closing = False
        self.stored_through = stored_through  # the newest step whose metrics are in the tracking store
        self.error: BaseException | None = None  # what stopped the writes, if anything did
        self._thread = threading.Thread(target=self._write_all, name="tracking-writes", daemon=True)
        self._thread.start()

    def put(self, what: str, write: Callable[[], None], step: int | None = None) -> None:
        """Queues `write` (described by `what`); `step`: the metrics step it stores."""
        with self._ready:
            self._writes.append((what, write, step, time.monotonic()))
            self._ready.notify()

    def backlog(self) -> tuple[int, float]:
        """(writes waiting, seconds the oldest has waited)."""
        with self._ready:
            oldest = self._writes[0][3] if self._writes else time.monotonic()
            return len(self._writes), time.monotonic() - oldest

    def close(self) -> None:
        """Waits for every queued write, or for what stopped them (`error`)."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._thread.join()

    def _write_all(self) -> None:
        while True:
            with self._ready:
                while not self._writes and not self._closing:
                    self._ready.wait()
                if not self._writes:
                    return
                what, write, step, _ = self._writes[0]
            try:
                retried(write, what, self.patience_s, self.say)
            except BaseException as err:  # noqa: BLE001 - the driver raises it
                self.error = err
                return
            with self._ready:
                self._writes.popleft()
                if step is not None:
                    self.stored_through = max(self.stored_through, step)
