"""LoRA on the LLM through peft: added for a stage, merged into the weights on export (the
unmerged adapter is kept beside the merged model)."""

from __future__ import annotations

from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from trainer.config import LoraConfig

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"


def add_lora(llm, cfg: LoraConfig):
    peft_config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(llm, peft_config)


def has_lora(llm) -> bool:
    return hasattr(llm, "peft_config")


def split_lora_state(state: dict, scaling: float) -> tuple[dict, dict]:
    """A peft LLM's full state -> (the base model's state with W + B A * scaling merged in,
    the adapter's state in peft's saved naming)."""
    merged, adapter = {}, {}
    for key, tensor in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            adapter[key.replace(f".{ADAPTER}.", ".")] = tensor
            continue
        name = key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
        merged[name] = tensor
        lora_a = key.replace(".base_layer.weight", f".lora_A.{ADAPTER}.weight")
        if key.endswith(".base_layer.weight") and lora_a in state:
            lora_b = lora_a.replace(".lora_A.", ".lora_B.")
            merged[name] = tensor + (state[lora_b].float() @ state[lora_a].float() * scaling).to(tensor.dtype)
    return merged, adapter
