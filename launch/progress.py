"""One progress line per stage on the driver console, fed with rank 0's metrics."""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN: no rate measured yet
        return "--"
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}m{seconds % 60:02d}s"


class ProgressLine:
    """Renders `stage  step n/N  loss  tok/s  ETA`: rewritten in place on a terminal, a line
    every `every_s` seconds otherwise (CI logs)."""

    def __init__(self, stage: str, total_steps: int, stream=None, every_s: float = 15.0):
        self.stage, self.total, self.every_s = stage, total_steps, every_s
        self.stream = stream or sys.stdout  # the one at call time: a test may have replaced it since import
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self.last_print = 0.0
        self.last_text = ""
        self.first_seen: tuple[int, float] | None = None

    def update(self, latest: dict, suffix: str = "") -> None:
        if not latest:
            text = f"[{self.stage}] starting workers ({_duration(time.monotonic() - self.started)})"
        else:
            step, now = latest["step"], time.monotonic()
            if self.first_seen is None:  # rate from the first step seen on: startup time is no step time
                self.first_seen = (step, now)
            first_step, first_time = self.first_seen
            rate = (step - first_step) / (now - first_time) if step > first_step else 0.0
            eta = (self.total - step) / rate if rate else float("nan")
            text = (
                f"[{self.stage}] step {step}/{self.total}  loss {latest['train/loss']:.3f}  "
                f"{latest['train/tokens_per_s']:,.0f} tok/s  ETA {_duration(eta)}"
            )
            if "eval/loss" in latest:
                text += f"  eval {latest['eval/loss']:.3f}"
        self.status(text + suffix)

    def status(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r" + text.ljust(len(self.last_text)))
            self.stream.flush()
        elif force or now - self.last_print >= self.every_s:
            self.stream.write(text + "\n")
            self.stream.flush()
            self.last_print = now
        self.last_text = text

    def print_above(self, text: str) -> None:
        """Text printed in full, the progress line redrawn below it."""
        if self.tty:
            self.stream.write("\r" + " " * len(self.last_text) + "\r")
        self.stream.write(text + "\n")
        if self.tty and self.last_text:
            self.stream.write(self.last_text)
        self.stream.flush()

    def finish(self, summary: str) -> None:
        if self.tty:
            self.stream.write("\r" + " " * len(self.last_text) + "\r")
        self.status(f"[{self.stage}] {summary} in {_duration(time.monotonic() - self.started)}", force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
