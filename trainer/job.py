"""The stage job: everything a worker needs for one stage, as the driver resolved it from the
job config (plain data: Ray sends it to workers on any node)."""

from __future__ import annotations

from dataclasses import dataclass

from data_shards.config import ReaderConfig
from data_shards.read.stream import ShardLists
from trainer.config import EngineConfig, ModelConfig, StageConfig


@dataclass
class StageJob:
    """`stage` is the stage's config as the user wrote it; the fields below it are what the driver
    resolved: expanded shard lists, URLs in storage, the seed and the global batch."""

    model: ModelConfig
    engine: EngineConfig
    data: ReaderConfig
    stage: StageConfig
    train_shards: ShardLists  # the stage's data as the driver expanded it: every rank splits these lists
    eval_shards: ShardLists | None
    init_export_url: str | None  # the export (in storage) the stage starts from; None: build from `model`
    export_dir: str  # in storage (a URL or a path): trainer/storage.py
    checkpoint_dir: str
    seed: int
    resume_checkpoint_url: str | None = None  # the checkpoint tag the stage's `resume_from` names, in storage
    micro_batches_per_step: int | None = None  # the global batch; None: grad_accum on every rank
    probe_shards: ShardLists | None = None  # the stage's probe_eval data, expanded by the driver
    peak_flops_per_device: float | None = None  # for MFU; None: known GPUs only
