"""What every Ray Train worker runs for one stage, with everything the driver hands it. A worker
never talks to MLflow: it sends metrics, notes, its log and its export's location to the driver."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import ray
import ray.train
import torch

from data_shards.errors import ValleyForgeError
from trainer.interruption import Notice
from trainer.job import StageJob
from trainer.storage import Storage


def _redirect_output(log_file: Path) -> None:
    """Worker stdout/stderr (library warnings included) go to a log file on this node."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
        os.dup2(fd, stream.fileno())


@dataclass
class StorageMarker:
    """A file the driver wrote into a local-path `cluster.storage`: a worker that does not see it
    is on a node that does not share that path."""

    storage: str
    name: str

    def check(self) -> None:
        if not Storage(self.storage).exists(self.name):
            raise ValleyForgeError(
                f"cluster.storage {self.storage} is a local path that node {socket.gethostname()} "
                f"({ray.util.get_node_ip_address()}) does not see: with workers on more than one node, "
                f"set cluster.storage to a URL (s3://, gs://) or a mount every node shares"
            )


@dataclass
class StageWorker:
    """Called once in each worker process: trains the job's stage on this rank; rank 0 posts
    the metrics, the trainable-parameter table, each checkpoint and the export's location."""

    job: StageJob
    run_id: str
    inbox: object  # the driver's DriverInbox actor
    marker: StorageMarker | None  # checked before anything else when storage is a local path
    torch_threads: int

    def __call__(self) -> None:
        from data_shards.read.reader import Topology
        from launch.worker_logs import LogShipper
        from trainer.stage import StageRunner

        context = ray.train.get_context()
        rank = context.get_world_rank()
        log_file = Path(tempfile.gettempdir()) / "valleyforge-logs" / f"{self.run_id}-rank{rank}.log"
        _redirect_output(log_file)
        shipper = LogShipper(log_file, rank, self.inbox).start()
        try:
            node = ray.get_runtime_context().get_node_id()
            print(f"rank {rank}: pid {os.getpid()} on {socket.gethostname()}, node {node}", flush=True)
            self.inbox.hello.remote(rank, node, socket.gethostname(), os.getpid())
            if self.marker:
                self.marker.check()
            torch.set_num_threads(self.torch_threads)
            with self._init_folder() as init_folder:
                runner = StageRunner(
                    self.job,
                    Topology(rank, context.get_world_size()),
                    init_folder,
                    on_checkpoint=lambda record: self.inbox.checkpointed.remote(record),
                )
            if rank == 0:
                print(runner.trainable_table, flush=True)
                self.inbox.note.remote(runner.trainable_table, "trainable_parameters.txt")
            runner.train(self._metric_log() if rank == 0 else lambda metrics, step: None, notices=self._notices)
            if runner.stopped_at is not None:
                if rank == 0:
                    self.inbox.stopped.remote(runner.stopped_at)
            else:
                export, chosen = runner.export()
                if export is not None:
                    self.inbox.exported.remote(export.url, chosen)
        except BaseException:
            traceback.print_exc()  # into this rank's log, which the driver quotes
            raise
        finally:
            shipper.stop()
        log_file.unlink(missing_ok=True)  # the driver has it all

    def _notices(self) -> Notice:
        """Asked on every rank after each step: Ray Train's preemption notice (a barrier over the
        ranks) and, on rank 0, whether the driver asks the stage to stop."""
        preemption = ray.train.get_preemption_info()
        stop = ray.train.get_context().get_world_rank() == 0 and ray.get(self.inbox.stop_requested.remote())
        if preemption is None:
            return Notice(stop)
        deadline = preemption.deadline_ms / 1000 if preemption.deadline_ms else None
        return Notice(stop, tuple(preemption.preempted_node_ids), deadline)

    def _metric_log(self):
        from trainer.metric_log import MetricLog

        return MetricLog(
            lambda metrics, step: self.inbox.post.remote(step, metrics),
            lambda: ray.get(self.inbox.stored_through.remote()),
        )

    @contextmanager
    def _init_folder(self) -> Iterator[Path | None]:
        """The stage's starting export as a local folder: storage's own folder when storage is a
        local path; else one copy per node, made by the node's first rank and removed once every
        rank has loaded it. Nodes are told apart by Ray node id (several nodes may share an IP)."""
        from trainer.ranks import barrier, gather, rank

        if self.job.init_export_url is None:
            yield None
            return
        storage = Storage(self.job.init_export_url)
        if storage.is_local:
            yield Path(storage.root)
            return
        node = ray.get_runtime_context().get_node_id()
        first_on_node = gather(node).index(node) == rank()
        node_copy = Path(tempfile.gettempdir()) / f"valleyforge-init-{self.run_id}-{node[:12]}"
        if first_on_node:
            storage.download("", node_copy)
        barrier()
        try:
            yield node_copy
            barrier()  # every rank on this node has loaded it
        finally:
            if first_on_node:
                shutil.rmtree(node_copy, ignore_errors=True)
