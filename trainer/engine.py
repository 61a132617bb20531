"""Build the DeepSpeed engine for one stage: the model under zero.Init (token reduction, LoRA
and gradient checkpointing included), what trains, AdamW, warmup + cosine schedule, gradient
accumulation and clipping."""

from __future__ import annotations

import math
from functools import partial

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from torch.optim.lr_scheduler import LambdaLR
from transformers.initialization import no_init_weights

from trainer.blueprint import Blueprint, build_model, fill_weights
from trainer.config import EngineConfig, StageConfig
from trainer.job import StageJob
from trainer.lora import add_lora
from trainer.trainable import set_trainable, trainable_table


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based): linear warmup,
    then cosine decay to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def skip_inference_comm_kernel() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce kernel whenever it sets up its
    comm backend, though only its inference all-reduce uses it, never training. The build takes
    about 50 s of both cores, and happens again each time the cached build was made with other
    flags (the Ray workers of a test run alternate between two), so the kernel is marked
    unavailable and the process group's own all-reduce serves."""
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def uses_bf16(engine: EngineConfig) -> bool:
    if engine.precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return engine.precision == "bf16"


def deepspeed_config(engine: EngineConfig, stage: StageConfig, micro_batch_size: int, grad_accum: int) -> dict:
    zero = {"stage": engine.zero_stage}
    if engine.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = engine.param_persistence_threshold
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": stage.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": uses_bf16(engine)},
        "zero_allow_untested_optimizer": True,  # torch AdamW: no fused ops to JIT-build
        "zero_force_ds_cpu_optimizer": False,  # ... also when the optimizer state is offloaded
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(job: StageJob, blueprint: Blueprint, grad_accum: int):
    """A DeepSpeed engine around the blueprint's model, weights filled, ready to train the job's
    stage with `grad_accum` micro-batches per rank and step, and the table of what trains at
    which learning rate."""
    stage, seed = job.stage, job.seed
    skip_inference_comm_kernel()
    ds_config = deepspeed_config(job.engine, stage, job.data.micro_batch_size, grad_accum)
    # transformers' own init would write into already-partitioned (empty) tensors; skip it,
    # fill_weights initialises or loads every parameter right after.
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=job.engine.zero_stage == 3), no_init_weights():
        model = build_model(blueprint, job.model.attn_implementation, stage.token_reduction)
    fill_weights(model, blueprint, job.model.init_std, seed)
    for name in job.engine.gradient_checkpointing:
        getattr(model, name).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if stage.lora:
        # Added outside zero.Init (peft initialises its weights in place); identical on every
        # rank from the common seed, DeepSpeed partitions them when it wraps the model.
        torch.manual_seed(seed)
        model.llm = add_lora(model.llm, stage.lora)
    groups = set_trainable(model, stage)
    table = trainable_table(model, groups)  # before the scheduler scales the groups' learning rates
    opt = stage.optimizer
    optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
    multiplier = partial(
        warmup_cosine,
        total_steps=stage.steps,
        warmup_steps=stage.schedule.warmup_steps,
        min_lr_ratio=stage.schedule.min_lr_ratio,
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=ds_config,
        lr_scheduler=lambda opt_: LambdaLR(opt_, multiplier),
        dist_init_required=False,
    )
    return engine, table
