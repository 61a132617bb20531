"""The driver's side of one running stage: what its workers send (metrics, notes, log text,
checkpoints, placement) goes to the console's progress line, the stage's MLflow run and the
log folder."""

from __future__ import annotations

import time
from functools import partial

from launch.checkpoint_registry import CheckpointRegistry
from launch.inbox import Mail
from launch.progress import ProgressLine
from launch.tracking import RunWriter
from launch.tracking_queue import TrackingQueue
from launch.worker_logs import StageLogs
from trainer.storage import Storage


class StageRelay:
    """Relays one stage's mail; the tracking writes go through `tracking`, a queue that waits out
    an unreachable tracking server while training goes on."""

    def __init__(
        self,
        name: str,
        steps: int,
        run_id: str,
        run: RunWriter,
        logs: StageLogs,
        ranks: int,
        tracking: TrackingQueue,
        registry: CheckpointRegistry,
        checkpoints: Storage,
    ):
        self.name, self.run, self.logs, self.tracking = name, run, logs, tracking
        self.registry, self.checkpoints = registry, checkpoints
        self.line = ProgressLine(name, steps)
        tracking.say = self.line.print_above
        self.latest: dict = {}
        self.placement: dict[int, tuple[str, str, int]] = {}
        self.queued_through = tracking.stored_through  # the newest step whose metrics are stored or on their way
        self.notes_seen: set[str] = set()
        logs.begin(run_id, ranks)
        tracking.put("recording the stage's checkpoints", partial(registry.sync, checkpoints))

    def receive(self, mail: Mail) -> None:
        """Takes the workers' mail: logs and notes to their files, metrics and notes to the
        tracking queue, rank 0's latest metrics to the progress line."""
        for rank, text in mail.logs:
            self.logs.append(rank, text)
        for text, artifact_file in mail.notes:
            if text in self.notes_seen:  # said again by a restarted worker group
                continue
            self.notes_seen.add(text)
            self.line.print_above(text)
            if artifact_file:
                self.tracking.put(f"storing {artifact_file}", partial(self.run.text, text + "\n", artifact_file))
        for step, metrics in mail.metrics:
            self.latest = {"step": step, **metrics}
            if step <= self.queued_through:  # sent again after a restart: logged once
                continue
            self.tracking.put(
                f"logging step {step}", partial(self.run.metrics, metrics, step, int(time.time() * 1000)), step
            )
            self.queued_through = step
        for record in mail.checkpoints:
            why = f" ({record.why})" if record.why else ""
            self.line.print_above(f"[{self.name}] checkpoint at step {record.step}{why}: {record.url}")
            self.tracking.put(f"recording checkpoint step {record.step}", partial(self.registry.record, record))
        if mail.placement != self.placement:
            self.placement = mail.placement
            self.tracking.put("tagging the placement", partial(self.run.tag, "placement", self.where()))
        waiting, waited_s = self.tracking.backlog()
        self.line.update(self.latest, f"  ({waiting} writes wait for the tracking server)" if waited_s > 10 else "")

    def where(self, ranks=None) -> str:
        """`rank 0: node 1a2b3c (host, pid 123), ...`: where the ranks ran, as far as they said."""
        return ", ".join(
            f"rank {r}: node {node[:8]} ({host}, pid {pid})"
            for r, (node, host, pid) in sorted(self.placement.items())
            if ranks is None or r in ranks
        )

    def store_logs(self) -> None:
        """Queues the logs after everything else, then waits until the tracking store has it all."""
        self.tracking.put("recording the stage's checkpoints", partial(self.registry.sync, self.checkpoints))
        for file in self.logs.files():
            self.tracking.put(f"storing {file.name}", partial(self.run.artifact, file, "logs"))
        self.tracking.close()

    def finish(self) -> None:
        self.line.finish(
            f"{self.latest.get('step', 0)} steps, final loss {self.latest.get('train/loss', float('nan')):.3f}"
        )
