"""The driver's SIGTERM and SIGINT (`ray job stop` and `valleyforge jobs stop` send SIGTERM; Ctrl-C
SIGINT). The first asks the running stage to stop after the step in progress, which its workers
save; the driver then records that checkpoint and exits naming the step (Stopped). A second
signal stops the driver at once."""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

from data_shards.errors import ValleyForgeError


class StopRequest:
    def __init__(self):
        self.signal: int | None = None  # the first signal received
        self.active = False  # within `listening`
        self.previous: dict[int, object] = {}  # the handlers replaced

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @contextmanager
    def listening(self) -> Iterator[StopRequest]:
        """Within the block, SIGTERM and SIGINT ask for a stop (in the main thread; a signal the
        process was started ignoring stays ignored, as a background job's SIGINT is)."""
        self.active = True
        self.listen()
        try:
            yield self
        finally:
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
            self.active, self.previous = False, {}

    def listen(self) -> None:
        """(Again) the handler of both signals while `active`: `ray.init` sets its own for SIGTERM (an
        exit)."""
        if not self.active or threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            current = signal.getsignal(sig)
            if current is signal.SIG_IGN or current == self._handle:
                continue
            self.previous.setdefault(sig, current)
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        # a raw write: the main thread may be inside a print to the same stream
        os.write(
            sys.stderr.fileno(),
            f"\nvalleyforge: {signal.Signals(signum).name}: stopping after the step in progress, which is saved "
            f"(a second signal stops at once)\n".encode(),
        )


class Stopped(ValleyForgeError):
    """The job stopped on request: where, and that the same command resumes there. The exit code
    is the shell's for the signal (128 + its number)."""

    def __init__(self, message: str, signum: int):
        super().__init__(f"{message}; the same command resumes there")
        self.exit_code = 128 + signum
