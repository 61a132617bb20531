"""Build the DeepSpeed engine for one stage: the model under zero.Init, what trains, AdamW,
warmup + cosine schedule, gradient accumulation and clipping."""
from __future__ import annotations

from functools import partial

import deepspeed
import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers.initialization import no_init_weights

from trainer.build import ModelPlan, build_model, fill_weights
from trainer.config import EngineConfig, StageConfig
from trainer.lora import add_lora
from trainer.trainable import apply_training_plan, plan_table
from trainer.schedule import warmup_cosine


def uses_bf16(engine: EngineConfig) -> bool:
    if engine.precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return engine.precision == "bf16"


def deepspeed_config(engine: EngineConfig, stage: StageConfig, micro_batch_size: int) -> dict:
    zero = {"stage": engine.zero_stage}
    if engine.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = engine.param_persistence_threshold
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": stage.grad_accum,
        "gradient_clipping": stage.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": uses_bf16(engine)},
        "zero_allow_untested_optimizer": True,  # torch AdamW: no fused ops to JIT-build
        "zero_force_ds_cpu_optimizer": False,   # ... also when the optimizer state is offloaded
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(plan: ModelPlan, engine_cfg: EngineConfig, stage: StageConfig, micro_batch_size: int,
                 attn_implementation: str, init_std: float, seed: int):
    """A DeepSpeed engine around the planned model, weights filled, ready to train `stage`, and
    the table of what trains at which learning rate."""
    ds_config = deepspeed_config(engine_cfg, stage, micro_batch_size)
    # transformers' own init would write into already-partitioned (empty) tensors; skip it,
    # fill_weights initialises or loads every parameter right after.
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=engine_cfg.zero_stage == 3), no_init_weights():
        model = build_model(plan, attn_implementation)
    fill_weights(model, plan, init_std, seed)
    for name in engine_cfg.gradient_checkpointing:
        getattr(model, name).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if stage.lora:
        # Added outside zero.Init (peft initialises its weights in place); identical on every
        # rank from the common seed, DeepSpeed partitions them when it wraps the model.
        torch.manual_seed(seed)
        model.llm = add_lora(model.llm, stage.lora)
    groups = apply_training_plan(model, stage)
    table = plan_table(model, groups)  # before the scheduler scales the groups' learning rates
    opt = stage.optimizer
    optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
    multiplier = partial(warmup_cosine, total_steps=stage.steps, warmup_steps=stage.schedule.warmup_steps,
                         min_lr_ratio=stage.schedule.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt_: LambdaLR(opt_, multiplier), dist_init_required=False)
    return engine, table
