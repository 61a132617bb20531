"""What the workers of a running stage send the driver, through one Ray actor: metrics, notes,
log text, where each rank runs and where the export went (or the step a stop ended it at); and
the one thing the driver tells them: to stop. The driver takes it all each second
and is the one that prints, writes logs and talks to MLflow."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import ray

if TYPE_CHECKING:  # the actor's process need not import torch
    from trainer.checkpoint import CheckpointRecord


@dataclass
class Mail:
    """Everything posted since the last `take`, and what stays true for the whole stage."""

    metrics: list[tuple[int, dict]] = field(default_factory=list)  # (step, metrics) from rank 0, in order
    notes: list[tuple[str, str | None]] = field(default_factory=list)  # (text, artifact file or None)
    logs: list[tuple[int, str]] = field(default_factory=list)  # (rank, text)
    checkpoints: list[CheckpointRecord] = field(default_factory=list)  # from rank 0, in order
    placement: dict[int, tuple[str, str, int]] = field(default_factory=dict)  # rank -> (node id, host, pid)
    export: str | None = None  # where rank 0 wrote the export (a storage URL)
    chosen: dict = field(default_factory=dict)  # which weights it holds: step, scores, selected_by, checkpoint
    stopped_at: int | None = None  # the step rank 0 stopped at when the driver asked the stage to stop


@ray.remote(num_cpus=0)
class DriverInbox:
    def __init__(self):
        self.pending = Mail()
        self.placement: dict[int, tuple[str, str, int]] = {}
        self.export: str | None = None
        self.chosen: dict = {}
        self.stored = -1  # the newest step whose metrics the driver has in the tracking store
        self.stop = False  # the driver asks the stage to stop after the step in progress
        self.stopped_at: int | None = None

    def hello(self, rank: int, node_id: str, host: str, pid: int) -> None:
        """Where the rank's process runs (again, after a restart of the worker group)."""
        self.placement[rank] = (node_id, host, pid)

    def post(self, step: int, metrics: dict) -> None:
        self.pending.metrics.append((step, metrics))

    def stored_through(self, step: int | None = None) -> int:
        """The driver says (`step`) and rank 0 asks which steps' metrics are in the tracking store."""
        if step is not None:
            self.stored = max(self.stored, step)
        return self.stored

    def note(self, text: str, artifact_file: str | None = None) -> None:
        """Text for the driver to print once, and to store with the stage run as `artifact_file`."""
        self.pending.notes.append((text, artifact_file))

    def log(self, rank: int, text: str) -> None:
        self.pending.logs.append((rank, text))

    def checkpointed(self, record: CheckpointRecord) -> None:
        self.pending.checkpoints.append(record)

    def exported(self, url: str, chosen: dict) -> None:
        self.export, self.chosen = url, chosen

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop

    def stopped(self, step: int) -> None:
        self.stopped_at = step

    def take(self) -> Mail:
        mail, self.pending = self.pending, Mail()
        mail.placement, mail.export, mail.chosen = dict(self.placement), self.export, self.chosen
        mail.stopped_at = self.stopped_at
        return mail
