"""What a stage trains: which modules, at which learning rate, and the table that shows it
(each module's parameter count, trainable count and learning rate)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from data_shards.errors import ValleyForgeError

if TYPE_CHECKING:
    from trainer.config import StageConfig

# The modules a stage can name in `trainable`, each with the parameters it holds: the vision
# encoder, the projector (abstractor included), the whole LLM, only the LLM's input embeddings,
# eP-ALM's soft prompt, LoRA adapters on the LLM, and a contrastive stage's temporal module (with the
# learned temperature) and text tower. A module listed later is more specific than
# one it lies inside: a parameter belongs to the last module that holds it.
TRAINABLE_MODULES = {
    "vision": lambda model: list(model.vision.parameters()),
    "projector": lambda model: list(model.projector.parameters()),
    "llm": lambda model: list(model.llm.parameters()),
    "embeddings": lambda model: list(model.llm.get_input_embeddings().parameters()),
    "soft_prompt": lambda model: list(model.soft_prompt.parameters()) if model.soft_prompt is not None else [],
    "lora": lambda model: [p for name, p in model.llm.named_parameters() if "lora_" in name],
    "temporal": lambda model: list(model.temporal.parameters()) if model.temporal is not None else [],
    "text": lambda model: list(model.text.parameters()) if model.text is not None else [],
}


def numel(param: nn.Parameter) -> int:
    return getattr(param, "ds_numel", param.numel())  # ZeRO-3 keeps only a shard in .data


def module_parameters(model) -> dict[str, list[nn.Parameter]]:
    owned, claimed = {}, set()
    for name, parameters_of in reversed(TRAINABLE_MODULES.items()):
        owned[name] = [p for p in parameters_of(model) if id(p) not in claimed]
        claimed |= {id(p) for p in owned[name]}
    return {name: owned[name] for name in TRAINABLE_MODULES}


def set_trainable(model, stage: StageConfig) -> list[dict]:
    """Freeze everything, unfreeze the stage's modules; optimizer parameter groups, one per
    trained module with its learning rate."""
    model.requires_grad_(False)
    owned = module_parameters(model)
    if "llm" in stage.trainable and "embeddings" not in stage.trainable:
        owned["llm"] += owned.pop("embeddings")  # the whole LLM trains, its embeddings at its rate
    groups = []
    for name in TRAINABLE_MODULES:
        if name not in stage.trainable or name not in owned:
            continue
        if not owned[name]:
            raise ValleyForgeError(f"stages.{stage.name}.trainable: the model has no {name!r} parameters")
        for param in owned[name]:
            param.requires_grad_(True)
        groups.append(
            {"name": name, "params": owned[name], "lr": stage.optimizer.module_lr.get(name, stage.optimizer.lr)}
        )
    return groups


def trainable_table(model, groups: list[dict]) -> str:
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
    return "\n".join(
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths))) for r in rows
    )
