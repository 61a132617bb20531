"""The function every Ray Train worker runs for one stage."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import ray.train
import torch


def _redirect_output(log_file: Path) -> None:
    """Worker stdout/stderr (library warnings included) go to the run's log folder."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
        os.dup2(fd, stream.fileno())


def train_worker(config: dict) -> None:
    from data_shards.reader import Topology
    from launch.tracking import MlflowMetricsLogger
    from trainer.stage import run_stage

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    job = config["job"]
    _redirect_output(Path(config["log_dir"]) / f"{job.stage.name}-rank{rank}.log")
    torch.set_num_threads(config["torch_threads"])
    if job.init_export and job.init_export.startswith("models:/"):
        import mlflow
        mlflow.set_tracking_uri(config["tracking_uri"])
        job.init_export = mlflow.artifacts.download_artifacts(job.init_export, dst_path=tempfile.mkdtemp())

    if rank == 0:
        mlflow_log = MlflowMetricsLogger(config["tracking_uri"], config["run_id"])
        board = config["progress_board"]

        def log(metrics: dict, step: int) -> None:
            mlflow_log(metrics, step)
            board.post.remote(step, metrics)

        def report_plan(table: str) -> None:
            print(table, flush=True)
            mlflow_log.text(table + "\n", "trainable_parameters.txt")
            board.note.remote(table)
    else:
        def log(metrics: dict, step: int) -> None:
            pass

        def report_plan(table: str) -> None:
            pass

    export = run_stage(job, Topology(rank, world), log, report_plan)
    checkpoint = ray.train.Checkpoint.from_directory(str(export)) if export else None
    ray.train.report({"exported": rank == 0}, checkpoint=checkpoint)
