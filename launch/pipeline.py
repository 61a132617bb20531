"""The driver: run a job's stages on Ray, one MLflow child run per stage under a parent run,
register each stage's export and start the next stage from the registry."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import ray
from mlflow import MlflowClient
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from data_shards.config import as_sources
from data_shards.manifest import read_manifest
from data_shards.read.reader import check_enough_shards, shard_lists
from data_shards.read.stream import ShardLists
from data_shards.read.sources import data_digest
from launch.config import JobConfig, save_resolved
from launch.progress import ProgressBoard, ProgressLine
from launch.tracking import (fetch_model, git_commit, register_export, registered_model_name, resolve_model_uri,
                             resolve_tracking_uri)
from launch.worker import StageWorker
from trainer.config import StageJob

EXPORT_ARTIFACT = "export"


@dataclass
class RegisteredStage:
    stage: str
    name: str
    version: str
    run_id: str


def resolve_inputs(cfg: JobConfig) -> dict[str, tuple[ShardLists, ShardLists | None]]:
    """Each stage's train and eval shard lists, expanded once here for every worker; fails before
    any worker starts when a data split or init source is unusable."""
    lists = {}
    for stage in cfg.stages:
        try:
            train, evaluation = stage.train_data, stage.eval_data
            lists[stage.name] = (shard_lists(train), shard_lists(evaluation) if evaluation else None)
            for data in filter(None, lists[stage.name]):
                check_enough_shards(data, cfg.cluster.num_workers, cfg.data.num_workers)
        except ValueError as err:
            raise ValueError(f"stages.{stage.name}: {err}") from None
        source = stage.init_from
        if source not in ("auto", "config") and not source.startswith("models:/") and not Path(source).is_dir():
            raise ValueError(f"stages.{stage.name}.init_from: {source!r} is not auto, config, "
                             f"a models:/ URI or an export folder")
    if cfg.evaluation:
        read_manifest(cfg.evaluation.data)
    return lists


def absolute_paths(cfg: JobConfig) -> JobConfig:
    """Workers run in other directories: hand them absolute paths."""
    def absolute(p: str | None) -> str | None:
        return p if p is None or "://" in p or p.startswith("pipe:") else str(Path(p).absolute())

    def absolute_sources(data):
        if isinstance(data, str):
            return absolute(data)
        return [s.model_copy(update={"url": absolute(s.url)}) for s in data]
    model = cfg.model.model_copy(update={
        "tokenizer": absolute(cfg.model.tokenizer), "word_vocab": absolute(cfg.model.word_vocab),
        "vision": cfg.model.vision.model_copy(update={"path": absolute(cfg.model.vision.path)}),
        "llm": cfg.model.llm.model_copy(update={"path": absolute(cfg.model.llm.path)})})
    stages = [s.model_copy(update={"train_data": absolute_sources(s.train_data), "eval_data": absolute(s.eval_data)})
              for s in cfg.stages]
    return cfg.model_copy(update={"model": model, "stages": stages})


def ray_address(cfg: JobConfig) -> str | None:
    """`cluster.address`, else RAY_ADDRESS; None: an embedded Ray. The config first, as for tracking."""
    return cfg.cluster.address or os.environ.get("RAY_ADDRESS")


def start_ray(cfg: JobConfig) -> None:
    env = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(cfg.cluster.torch_threads)}
    env["DS_ACCELERATOR"] = "cuda" if cfg.cluster.use_gpu else "cpu"
    address = ray_address(cfg)
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False, configure_logging=False)
    else:
        needed = int(cfg.cluster.num_workers * cfg.cluster.cpus_per_worker + 0.999)
        ray.init(num_cpus=cfg.cluster.num_cpus or max(os.cpu_count() or 1, needed), include_dashboard=False,
                 runtime_env={"env_vars": env}, log_to_driver=False, configure_logging=False)


class Pipeline:
    def __init__(self, cfg: JobConfig, console=print):
        self.cfg = absolute_paths(cfg)
        self.console = console
        self.out = cfg.resolved_output_dir()
        self.tracking_uri = resolve_tracking_uri(cfg.tracking)
        self.client = MlflowClient(self.tracking_uri)

    def run(self) -> list[RegisteredStage]:
        self.shard_lists = resolve_inputs(self.cfg)
        cfg_path = save_resolved(self.cfg, self.out / "config.resolved.yaml")
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_experiment(self.cfg.tracking.experiment)
        start_ray(self.cfg)
        registered: list[RegisteredStage] = []
        tags = {"config_hash": self.cfg.digest(), "git_commit": git_commit()}
        with mlflow.start_run(run_name=self.cfg.name, tags=tags) as parent:
            mlflow.log_artifact(str(cfg_path))
            mlflow.log_params(_flatten(self.cfg.model_dump(mode="json", exclude={"stages"})))
            self.console(f"MLflow run {parent.info.run_id} ({self.tracking_uri}); logs in {self.out / 'logs'}")
            for index, stage in enumerate(self.cfg.stages):
                registered.append(self.run_stage(index, stage, registered[-1] if registered else None, tags))
            if self.cfg.evaluation:
                self.run_evaluation(registered[-1], parent.info.run_id)
        return registered

    def init_source(self, stage, previous: RegisteredStage | None) -> tuple[str | None, str]:
        source = stage.init_from
        if source == "auto":
            source = "config" if previous is None else f"models:/{previous.name}@latest"
        if source == "config":
            return None, "model config"
        if source.startswith("models:/"):
            return resolve_model_uri(self.client, source)
        return str(Path(source).absolute()), source

    def run_stage(self, index: int, stage, previous: RegisteredStage | None, tags: dict) -> RegisteredStage:
        init_from, init_desc = self.init_source(stage, previous)
        data_hash = data_digest(as_sources(stage.train_data))
        stage_tags = {**tags, "stage": stage.name, "data_manifest_hash": data_hash}
        with mlflow.start_run(run_name=stage.name, nested=True, tags=stage_tags) as run:
            mlflow.log_params({**_flatten(stage.model_dump(mode="json"), "stage"), "init_from": init_desc})
            job = StageJob(model=self.cfg.model, engine=self.cfg.engine, data=self.cfg.data, stage=stage,
                           train_shards=self.shard_lists[stage.name][0], eval_shards=self.shard_lists[stage.name][1],
                           init_from=init_from, export_dir=str(self.out / "exports" / stage.name),
                           checkpoint_dir=str(self.out / "checkpoints" / stage.name), seed=self.cfg.seed + index,
                           peak_flops_per_device=self.cfg.cluster.peak_flops_per_device)
            export = self._train_on_ray(job, run.info.run_id)
            mlflow.log_artifacts(str(export), EXPORT_ARTIFACT)
            name = registered_model_name(self.cfg.tracking, stage.name)
            version = register_export(self.client, name, run.info.run_id, EXPORT_ARTIFACT, stage_tags)
            self.console(f"[{stage.name}] registered {name} version {version.version} "
                         f"(models:/{name}@latest); started from {init_desc}")
            return RegisteredStage(stage.name, name, str(version.version), run.info.run_id)

    def _train_on_ray(self, job: StageJob, run_id: str) -> Path:
        cluster = self.cfg.cluster
        board = ProgressBoard.remote()
        trainer = TorchTrainer(
            StageWorker(job, self.tracking_uri, run_id, board, str(self.out / "logs"), cluster.torch_threads),
            torch_config=TorchConfig(backend="nccl" if cluster.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cluster.num_workers, use_gpu=cluster.use_gpu,
                                         resources_per_worker={"CPU": cluster.cpus_per_worker}),
            run_config=RunConfig(name=f"{self.cfg.name}-{job.stage.name}-{int(time.time())}",
                                 storage_path=str(self.out / "ray")),
        )
        outcome: dict = {}
        fit = threading.Thread(target=lambda: outcome.update(result=_capture(trainer.fit)), daemon=True)
        line = ProgressLine(job.stage.name, job.stage.steps)
        fit.start()
        while fit.is_alive():
            for note in ray.get(board.take_notes.remote()):
                line.print_above(note)
            line.update(ray.get(board.read.remote()))
            fit.join(timeout=1.0)
        result, error = outcome["result"]
        if error is not None:
            line.finish("failed")
            raise StageFailed(job.stage.name, error, self.out / "logs")
        latest = ray.get(board.read.remote())
        line.finish(f"{latest.get('step', 0)} steps, final loss {latest.get('train/loss', float('nan')):.3f}")
        if result.checkpoint is None:
            raise StageFailed(job.stage.name, RuntimeError("no export was reported"), self.out / "logs")
        return Path(result.checkpoint.path)

    def run_evaluation(self, stage: RegisteredStage, parent_run_id: str) -> dict:
        """Attribute accuracy by generation of the last stage's registered model, on the driver."""
        from trainer.blueprint import load_export
        from trainer.evaluation import attribute_accuracy

        uri = f"models:/{stage.name}@latest"
        model, tokenizer = load_export(fetch_model(uri, self.tracking_uri))
        ev = self.cfg.evaluation
        line = ProgressLine("evaluate", 1)
        metrics = attribute_accuracy(model, tokenizer, ev.data, ev.template, ev.max_new_tokens,
                                     progress=lambda done, total: line.status(f"[evaluate] {done}/{total} clips"))
        for run_id in (stage.run_id, parent_run_id):
            self.client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, v, int(time.time() * 1000), 0)
                                                   for k, v in metrics.items()])
        per_attribute = ", ".join(f"{k.rsplit('/', 1)[1]} {v:.2f}" for k, v in metrics.items()
                                  if k.startswith("eval/attribute_accuracy/"))
        line.finish(f"{uri}: attribute accuracy {metrics['eval/attribute_accuracy']:.2f} "
                    f"({per_attribute}; chance {metrics['eval/attribute_chance']:.2f})")
        return metrics


class StageFailed(RuntimeError):
    def __init__(self, stage: str, error: BaseException, log_dir: Path):
        super().__init__(f"stage {stage!r} failed: {_root_message(error)} (worker logs: {log_dir})")


def _root_message(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


def _capture(fn):
    try:
        return fn(), None
    except BaseException as err:  # noqa: BLE001 - reported on the driver thread
        return None, err


def _flatten(doc, prefix: str = "") -> dict:
    flat = {}
    for key, value in (doc.items() if isinstance(doc, dict) else enumerate(doc)):
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, (dict, list)) and value:
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat
