"""What the driver resolves before a stage's workers start: each stage's shard lists (expanded
once for every worker), where a stage starts (the model config, a registered version, a recorded
checkpoint or an export folder, put into storage for the workers), and the StageJob that carries
it all to them."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient

from data_shards.errors import ValleyForgeError
from data_shards.manifest import read_manifest
from data_shards.read.reader import check_enough_shards, shard_lists
from data_shards.read.stream import ShardLists
from launch.checkpoint_registry import checkpoint_location
from launch.config import JobConfig
from launch.tracking import fetch_model, resolve_model_uri
from trainer.checkpoint_export import export_checkpoint
from trainer.config import StageConfig, is_checkpoint_uri
from trainer.job import StageJob
from trainer.storage import Storage


@dataclass
class StageShards:
    """A stage's data, expanded once on the driver: every rank splits these lists."""

    train: ShardLists
    eval: ShardLists | None
    probes: ShardLists | None


def resolve_inputs(cfg: JobConfig) -> dict[str, StageShards]:
    """Each stage's train, eval and probe shard lists; fails before any worker starts when a data
    split or init source is unusable."""
    lists = {}
    for stage in cfg.stages:
        try:
            train, evaluation, probes = stage.train_data, stage.eval_data, stage.probe_eval
            lists[stage.name] = StageShards(
                shard_lists(train),
                shard_lists(evaluation) if evaluation else None,
                shard_lists(probes.data) if probes else None,
            )
            check_enough_shards(lists[stage.name].train, cfg.data_streams(stage))
            if evaluation:  # read by each rank's DataLoader workers, on as many ranks as there may be
                check_enough_shards(lists[stage.name].eval, cfg.cluster.max_workers * max(cfg.data.num_workers, 1))
        except ValleyForgeError as err:
            raise ValleyForgeError(f"stages.{stage.name}: {err}") from None
        source = stage.init_from
        if source not in ("auto", "config") and not source.startswith("models:/") and not Path(source).is_dir():
            raise ValleyForgeError(
                f"stages.{stage.name}.init_from: {source!r} is not auto, config, a models:/ URI or an export folder"
            )
    if cfg.evaluation:
        read_manifest(cfg.evaluation.data)
    return lists


@dataclass
class StageStart:
    """Where a stage starts, resolved: `source` a models:/ URI pinned to a version, a recorded
    checkpoint (models:/m-...) or an export folder; None: built from the model config."""

    source: str | None
    description: str


def stage_start(client: MlflowClient, stage: StageConfig, previous_model: str | None) -> StageStart:
    """The stage's `init_from` resolved; `auto` is the previous stage's registered model (its
    name `previous_model`), or the model config for the first stage."""
    source = stage.init_from
    if source == "auto":
        source = "config" if previous_model is None else f"models:/{previous_model}@latest"
    if source == "config":
        return StageStart(None, "model config")
    if is_checkpoint_uri(source):
        return StageStart(source, f"checkpoint {source}")
    if source.startswith("models:/"):
        return StageStart(*resolve_model_uri(client, source))
    return StageStart(str(Path(source).absolute()), source)


def checkpoint_to_load(client: MlflowClient, cfg: JobConfig, uri: str) -> Storage:
    """Where the recorded checkpoint `uri` (models:/m-...) lies, refused unless under the job's
    cluster.storage or one of cluster.checkpoint_sources: a record in the tracking store does not
    make a folder one this job may load (DeepSpeed unpickles checkpoint files in full)."""
    location = checkpoint_location(client, uri)
    roots = [cfg.resolved_storage(), *cfg.cluster.checkpoint_sources]
    if not any(is_under(location, root) for root in roots):
        raise ValleyForgeError(
            f"{uri}: its files lie at {location}, outside cluster.storage ({roots[0]}); add that folder to "
            f"cluster.checkpoint_sources to load checkpoints from it"
        )
    return Storage(location)


def is_under(location: str, root: str) -> bool:
    """Whether the URL or absolute path `location` names something inside the folder `root`."""
    if ".." in location.split("/"):
        return False
    return location.rstrip("/").startswith(root.rstrip("/") + "/")


def put_start_in_storage(
    client: MlflowClient, cfg: JobConfig, tracking_uri: str, storage: Storage, stage_name: str, source: str
) -> Storage:
    """The stage's starting export, put into storage once for every worker: from the registry
    (downloaded here, the only MLflow client), a recorded checkpoint (made into an export here)
    or a folder on this machine."""
    target = storage.child("inits", stage_name)
    if is_checkpoint_uri(source):
        export_checkpoint(checkpoint_to_load(client, cfg, source), target)
        return target
    with tempfile.TemporaryDirectory(prefix="valleyforge-init-") as tmp:
        target.upload(fetch_model(source, tracking_uri, Path(tmp) / "export"))
    return target


def stage_job(
    cfg: JobConfig,
    index: int,
    stage: StageConfig,
    shards: StageShards,
    storage: Storage,
    init: Storage | None,
    resume_checkpoint_url: str | None,
) -> StageJob:
    """The job the workers of `stage`, the config's stage number `index`, get."""
    return StageJob(
        model=cfg.model,
        engine=cfg.engine,
        data=cfg.data.model_copy(update={"streams": cfg.data_streams(stage)}),
        stage=stage,
        train_shards=shards.train,
        eval_shards=shards.eval,
        probe_shards=shards.probes,
        init_export_url=init.url if init else None,
        export_dir=storage.child("exports", stage.name).url,
        checkpoint_dir=storage.child("checkpoints", stage.name).url,
        seed=cfg.seed + index,
        peak_flops_per_device=cfg.cluster.peak_flops_per_device,
        resume_checkpoint_url=resume_checkpoint_url,
        micro_batches_per_step=cfg.micro_batches_per_step(stage),
    )
