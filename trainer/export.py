"""Export a (ZeRO-3 sharded) model as folders that plain transformers and ValleyForge load.

    EXPORT/
      valleyforge_model.json   how to rebuild the whole model (architecture + component folders)
      vision/                  CLIP vision tower: config.json + model.safetensors
      llm/                     causal LM + tokenizer: AutoModelForCausalLM.from_pretrained(EXPORT/llm)
      projector/               model.safetensors (the reducer has no weights)
      soft_prompt/             model.safetensors (eP-ALM's prompt embeddings, when the model has them)
      llm_adapter/             peft adapter_config.json + adapter_model.safetensors, when the stage
                               trained LoRA (llm/ then holds the merged weights)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from trainer.blueprint import EXPORT_SPEC
from trainer.lora import ADAPTER, has_lora, split_lora_state
from trainer.model import VideoLanguageModel
from trainer.partitioned import gather_state_dict
from trainer.ranks import rank

FORMAT_VERSION = 1


def export_model(model: VideoLanguageModel, tokenizer, out_dir: str | Path, template: str | None = None) -> Path | None:
    """Gather the weights and write the export on rank 0 (returns its path there, None elsewhere);
    `template` is the conversation template the model was trained with (generation uses it).

    Written to a temporary folder and renamed when complete. All ranks must call.
    """
    out_dir = Path(out_dir)
    states = {name: gather_state_dict(getattr(model, name)) for name in model.components()}
    if rank() != 0:
        return None
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.vision.save_pretrained(tmp / "vision", state_dict=states["vision"])
    spec_extra = {}
    if has_lora(model.llm):  # the merged LLM for plain loading; the adapter alone beside it
        peft_config = model.llm.peft_config[ADAPTER]
        merged, adapter = split_lora_state(states["llm"], peft_config.lora_alpha / peft_config.r)
        model.llm.get_base_model().save_pretrained(tmp / "llm", state_dict=merged)
        peft_config.save_pretrained(tmp / "llm_adapter")
        save_file({k: v.contiguous() for k, v in adapter.items()}, tmp / "llm_adapter" / "adapter_model.safetensors")
        spec_extra["lora_adapter"] = "llm_adapter"
    else:
        model.llm.save_pretrained(tmp / "llm", state_dict=states["llm"])
    tokenizer.save_pretrained(tmp / "llm")
    for name in model.components():
        if name not in ("vision", "llm"):  # our own modules: plain safetensors
            (tmp / name).mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in states[name].items()}, tmp / name / "model.safetensors")
    spec = {"format_version": FORMAT_VERSION, "architecture": model.arch.to_json(),
            "components": {name: name for name in model.components()}, "template": template, **spec_extra}
    (tmp / EXPORT_SPEC).write_text(json.dumps(spec, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
