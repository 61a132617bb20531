"""A stage's training plan: which modules train, at which learning rate, and the table that
shows it (each module's parameter count, trainable count and learning rate)."""
from __future__ import annotations

from torch import nn

from trainer.config import StageConfig

# The most specific first: a parameter belongs to the first module that holds it.
MODULE_ORDER = ("embeddings", "lora", "soft_prompt", "projector", "vision", "llm")


def numel(param: nn.Parameter) -> int:
    return getattr(param, "ds_numel", param.numel())  # ZeRO-3 keeps only a shard in .data


def module_parameters(model) -> dict[str, list[nn.Parameter]]:
    params = {
        "vision": list(model.vision.parameters()),
        "projector": list(model.projector.parameters()),
        "soft_prompt": list(model.soft_prompt.parameters()) if model.soft_prompt is not None else [],
        "llm": list(model.llm.parameters()),
        "embeddings": list(model.llm.get_input_embeddings().parameters()),
        "lora": [p for name, p in model.llm.named_parameters() if "lora_" in name],
    }
    owned, claimed = {}, set()
    for name in MODULE_ORDER:
        owned[name] = [p for p in params[name] if id(p) not in claimed]
        claimed |= {id(p) for p in owned[name]}
    return owned


def apply_training_plan(model, stage: StageConfig) -> list[dict]:
    """Freeze everything, unfreeze the stage's modules; optimizer parameter groups, one per
    trained module with its learning rate."""
    model.requires_grad_(False)
    owned = module_parameters(model)
    if "llm" in stage.trainable and "embeddings" not in stage.trainable:
        owned["llm"] += owned.pop("embeddings")  # the whole LLM trains, its embeddings at its rate
    groups = []
    for name in MODULE_ORDER:
        if name not in stage.trainable or name not in owned:
            continue
        if not owned[name]:
            raise ValueError(f"stages.{stage.name}.trainable: the model has no {name!r} parameters")
        for param in owned[name]:
            param.requires_grad_(True)
        groups.append({"name": name, "params": owned[name], "lr": stage.optimizer.module_lr.get(name, stage.optimizer.lr)})
    return groups


def plan_table(model, groups: list[dict]) -> str:
    """`module  parameters  trainable  lr`, one row per module the model has, and a total."""
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    rows = [("module", "parameters", "trainable", "lr")]
    total = trained = 0
    for name, params in module_parameters(model).items():
        if not params:
            continue
        count = sum(numel(p) for p in params)
        trainable = sum(numel(p) for p in params if p.requires_grad)
        total, trained = total + count, trained + trainable
        rates = sorted({f"{lr_of[id(p)]:g}" for p in params if id(p) in lr_of})
        rows.append((name, f"{count:,}", f"{trainable:,}", ", ".join(rates) or "frozen"))
    rows.append(("total", f"{total:,}", f"{trained:,} ({trained / max(total, 1):.2%})", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths)))
                     for r in rows)
