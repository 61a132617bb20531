"""Running a test's worker function on gloo ranks (2 unless told) under Ray Train, as the
launcher does, and the tiny stage job those tests train."""

import json
from pathlib import Path

import ray.train
import torch
from ray.train import ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from data_shards.config import ReaderConfig
from data_shards.read.reader import Topology, shard_lists
from trainer.config import EngineConfig, ModelConfig, StageConfig
from trainer.job import StageJob


def fit_on_ranks(worker, config: dict, storage, timeout_s: int = 1800, num_workers: int = 2) -> None:
    """`worker(config)` on `num_workers` CPU ranks (sharing the 2 CPUs of `ray_local`); a collective
    that waits past `timeout_s` fails the run."""
    TorchTrainer(
        worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="gloo", timeout_s=timeout_s),
        scaling_config=ScalingConfig(num_workers=num_workers, resources_per_worker={"CPU": min(1, 2 / num_workers)}),
        run_config=ray.train.RunConfig(storage_path=str(storage)),
    ).fit()


def worker_topology() -> Topology:
    """Inside a worker: one intra-op thread (2 ranks share 2 cores) and this rank's place."""
    torch.set_num_threads(1)
    context = ray.train.get_context()
    return Topology(context.get_world_rank(), context.get_world_size())


def losses_worker(config) -> None:
    """Trains `config["job"]`; each rank writes the losses it logged to OUT/rank<R>.json."""
    from trainer.stage import StageRunner

    topology, losses = worker_topology(), []
    StageRunner(config["job"], topology).train(lambda metrics, step: losses.append(metrics["train/loss"]))
    Path(config["out"], f"rank{topology.rank}.json").write_text(json.dumps(losses))


def tiny_job(synth_data, tmp_path, stage: dict, data: dict, engine: dict | None = None, **model) -> StageJob:
    """A ZeRO-3 stage job on the tiny random model; the stage trains on the synthetic instruct
    split with the vicuna_v1 template unless `stage` says otherwise."""
    stage_cfg = StageConfig(**{"train_data": str(synth_data / "instruct" / "train"), "template": "vicuna_v1", **stage})
    return StageJob(
        model=ModelConfig(vision={"tiny": {}}, llm={"tiny": {}}, word_vocab=str(synth_data / "vocab.txt"), **model),
        engine=EngineConfig(zero_stage=3, param_persistence_threshold=0, **(engine or {})),
        data=ReaderConfig(**data),
        stage=stage_cfg,
        train_shards=shard_lists(stage_cfg.train_data),
        eval_shards=None,
        init_export_url=None,
        export_dir=str(tmp_path / "export"),
        checkpoint_dir=str(tmp_path / "ckpt"),
        seed=0,
    )
