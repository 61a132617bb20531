"""Rank 0's step metrics on their way to the tracking store (through the driver): sent at once and
kept until the store has them. The checkpointer saves what is kept, so whatever a restart (of the
worker group or of the driver) might have lost is sent again on resume."""

from __future__ import annotations

from typing import Callable

Send = Callable[[dict, int], None]


class MetricLog:
    """`log(metrics, step)`. `stored_through()` says the newest step the store has; without it
    nothing is kept (the sender is the store)."""

    def __init__(self, send: Send, stored_through: Callable[[], int] | None = None):
        self.send, self.stored_through = send, stored_through
        self.unstored: list[tuple[int, dict]] = []

    def __call__(self, metrics: dict, step: int) -> None:
        if self.stored_through is not None:
            self.unstored.append((step, metrics))
        self.send(metrics, step)

    def state_dict(self) -> dict:
        """What the store may not have yet, asked once per checkpoint."""
        if self.unstored:
            through = self.stored_through()
            self.unstored = [(step, metrics) for step, metrics in self.unstored if step > through]
        return {"unstored": [[step, metrics] for step, metrics in self.unstored]}

    def load_state_dict(self, state: dict) -> None:
        """Sends again what a checkpoint kept; the driver drops the steps the store has."""
        for step, metrics in state["unstored"]:
            self(metrics, step)


def as_metric_log(log: MetricLog | Send) -> MetricLog:
    return log if isinstance(log, MetricLog) else MetricLog(log)
