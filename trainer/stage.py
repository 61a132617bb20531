"""One stage inside one worker: plan the model, build the engine, stream the data, train, export."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from data_shards.config import ReaderConfig
from data_shards.conversation import get_template
from data_shards.health import ReadHealth
from data_shards.reader import ShardLoader, Topology, build_loader
from trainer.build import plan_from_config, plan_from_export
from trainer.checkpoint import Checkpointer
from trainer.config import EngineConfig, ModelConfig, StageConfig
from trainer.engine import build_engine, uses_bf16
from trainer.export import export_model
from trainer.loop import evaluate, train
from trainer.throughput import FlopCounter, StepMeter, peak_flops
from trainer.token_reduction import token_reduction_for


@dataclass
class StageJob:
    """Everything a worker needs for one stage (plain data: it travels to remote workers)."""
    model: ModelConfig
    engine: EngineConfig
    data: ReaderConfig
    stage: StageConfig
    init_export: str | None  # local export folder to start from; None: build from `model`
    export_dir: str
    checkpoint_dir: str
    seed: int
    peak_flops_per_device: float | None = None  # for MFU; None: known GPUs only


@dataclass
class PreparedStage:
    engine: object
    tokenizer: object
    train_batches: ShardLoader
    evaluate_fn: Callable[[], float] | None
    health: ReadHealth
    checkpointer: Checkpointer
    plan_table: str  # module, parameters, trainable, learning rate
    meter: StepMeter


def prepare_stage(job: StageJob, topology: Topology) -> PreparedStage:
    """The engine with its weights in place, and the stage's data streams for this rank."""
    torch.manual_seed(job.seed)
    plan = plan_from_export(job.init_export) if job.init_export else plan_from_config(job.model)
    engine, plan_table = build_engine(plan, job.engine, job.stage, job.data.micro_batch_size,
                                      job.model.attn_implementation, job.model.init_std, job.seed)
    if job.stage.token_reduction:
        engine.module.token_reduction = token_reduction_for(engine.module, job.stage.token_reduction)
    visual = engine.module.visual_spec()
    template = get_template(job.stage.template)
    train_batches = build_loader(job.stage.train_data, job.data, plan.tokenizer, template, visual,
                                 topology, train=True)
    evaluate_fn = None
    if job.stage.eval_data:
        eval_batches = iter(build_loader(job.stage.eval_data, job.data, plan.tokenizer, template, visual,
                                         topology, train=False))
        evaluate_fn = lambda: evaluate(engine, eval_batches, job.stage.eval_batches)  # noqa: E731
    health = ReadHealth(job.data.max_skip_fraction, job.data.skip_check_min_samples)
    checkpointer = Checkpointer(job.checkpoint_dir, engine, train_batches, health)
    meter = StepMeter(FlopCounter(engine.module, job.stage.trainable), engine.module.arch.visual_token_id,
                      peak_flops(job.peak_flops_per_device, uses_bf16(job.engine)))
    return PreparedStage(engine, plan.tokenizer, train_batches, evaluate_fn, health, checkpointer, plan_table, meter)


def run_stage(job: StageJob, topology: Topology, log: Callable[[dict, int], None],
              report_plan: Callable[[str], None] = print) -> Path | None:
    """Train the stage (from its newest checkpoint when `resume`) and export it; returns the
    export folder on rank 0, None elsewhere. `report_plan` receives the trainable-parameter table."""
    stage = prepare_stage(job, topology)
    report_plan(stage.plan_table)
    start_step = stage.checkpointer.restore() if job.stage.resume else 0
    train(stage.engine, stage.train_batches, job.stage.steps, job.stage.grad_accum, log, stage.evaluate_fn,
          job.stage.eval_every, stage.health, stage.meter, start_step, stage.checkpointer.save,
          job.stage.checkpoint_every)
    return export_model(stage.engine.module, stage.tokenizer, job.export_dir, job.stage.template)
