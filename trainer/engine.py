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
from trainer.model import VideoLanguageModel
from trainer.schedule import warmup_cosine


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
        "bf16": {"enabled": engine.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # torch AdamW: no fused ops to JIT-build
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def set_trainable(model: VideoLanguageModel, trainable: list[str]) -> None:
    for name in ("vision", "projector", "llm"):
        getattr(model, name).requires_grad_(name in trainable)


def build_engine(plan: ModelPlan, engine_cfg: EngineConfig, stage: StageConfig, micro_batch_size: int,
                 attn_implementation: str, init_std: float, seed: int):
    """A DeepSpeed engine around the planned model, weights filled, ready to train `stage`."""
    ds_config = deepspeed_config(engine_cfg, stage, micro_batch_size)
    # transformers' own init would write into already-partitioned (empty) tensors; skip it,
    # fill_weights initialises or loads every parameter right after.
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=engine_cfg.zero_stage == 3), no_init_weights():
        model = build_model(plan, attn_implementation)
    fill_weights(model, plan, init_std, seed)
    set_trainable(model, stage.trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = stage.optimizer
    optimizer = torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
    multiplier = partial(warmup_cosine, total_steps=stage.steps, warmup_steps=stage.schedule.warmup_steps,
                         min_lr_ratio=stage.schedule.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt_: LambdaLR(opt_, multiplier), dist_init_required=False)
    return engine
