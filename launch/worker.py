"""What every Ray Train worker runs for one stage, with everything the driver hands it."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import ray.train
import torch

from trainer.config import StageJob


def _redirect_output(log_file: Path) -> None:
    """Worker stdout/stderr (library warnings included) go to the run's log folder."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
        os.dup2(fd, stream.fileno())


@dataclass
class StageWorker:
    """Called once in each worker process: trains the job's stage on this rank and reports the
    export (rank 0) to Ray Train. Rank 0 also logs to MLflow and posts progress."""
    job: StageJob
    tracking_uri: str
    run_id: str
    progress_board: object  # the driver's ProgressBoard actor
    log_dir: str
    torch_threads: int

    def __call__(self) -> None:
        from data_shards.read.reader import Topology
        from launch.tracking import MlflowMetricsLogger, fetch_model
        from trainer.stage import StageRunner

        context = ray.train.get_context()
        rank = context.get_world_rank()
        _redirect_output(Path(self.log_dir) / f"{self.job.stage.name}-rank{rank}.log")
        torch.set_num_threads(self.torch_threads)
        init_folder = fetch_model(self.job.init_from, self.tracking_uri) if self.job.init_from else None
        runner = StageRunner(self.job, Topology(rank, context.get_world_size()), init_folder)
        if rank == 0:
            mlflow_log = MlflowMetricsLogger(self.tracking_uri, self.run_id)
            print(runner.trainable_table, flush=True)
            mlflow_log.text(runner.trainable_table + "\n", "trainable_parameters.txt")
            self.progress_board.note.remote(runner.trainable_table)

            def log(metrics: dict, step: int) -> None:
                mlflow_log(metrics, step)
                self.progress_board.post.remote(step, metrics)
        else:
            def log(metrics: dict, step: int) -> None:
                pass
        runner.train(log)
        export = runner.export()
        checkpoint = ray.train.Checkpoint.from_directory(str(export)) if export else None
        ray.train.report({"exported": rank == 0}, checkpoint=checkpoint)
