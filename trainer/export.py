"""Export a (ZeRO-3 sharded) model as folders that plain transformers and ValleyForge load.

EXPORT/
  valleyforge_model.json   how to rebuild the whole model (architecture + component folders)
  vision/                  CLIP vision tower: config.json + model.safetensors
  llm/                     causal LM + tokenizer: AutoModelForCausalLM.from_pretrained(EXPORT/llm)
  projector/               model.safetensors (the reducer has no weights)
  soft_prompt/             model.safetensors (eP-ALM's prompt embeddings, when the model has them)
  temporal/, text/         model.safetensors of the contrastive towers, when the model has them
                           (text/ also holds the text transformer's config.json)
  llm_adapter/             peft adapter_config.json + adapter_model.safetensors, when the stage
                           trained LoRA (llm/ then holds the merged weights)
  llava_next_video/        the whole model as transformers' LlavaNextVideoForConditionalGeneration
                           with its processor, when the model is one (trainer/llava_next_video.py);
                           the spec says why not otherwise
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from trainer import llava_next_video
from trainer.blueprint import EXPORT_SPEC
from trainer.lora import ADAPTER, has_lora, split_lora_state
from trainer.model import VideoLanguageModel
from trainer.partitioned import gather_state_dict
from trainer.ranks import rank
from trainer.storage import Storage

FORMAT_VERSION = 1


def export_model(model: VideoLanguageModel, tokenizer, storage: Storage, template: str | None = None) -> Storage | None:
    """Gather the weights and write the export into `storage`, replacing what was there, on rank 0
    (returns that storage there, None elsewhere); `template` is the conversation template the
    model was trained with (generation uses it). All ranks must call."""
    states = {name: gather_state_dict(getattr(model, name)) for name in model.components()}
    if rank() != 0:
        return None
    with storage.replaced() as folder:  # a crash while writing leaves the previous export
        _write_export(model, tokenizer, states, folder, template)
    return storage


def write_blueprint(model: VideoLanguageModel, tokenizer, folder: Path, template: str | None) -> None:
    """An export without its weights: the configs, tokenizer and spec that rebuild the module tree
    (each checkpoint holds one, so it can become an export: trainer/checkpoint_export.py)."""
    _write_configs(model, folder)
    llm = model.llm.get_base_model() if has_lora(model.llm) else model.llm
    llm.config.save_pretrained(folder / "llm")
    tokenizer.save_pretrained(folder / "llm")
    _write_spec(model, folder, template, {"lora_adapter": "llm_adapter"} if has_lora(model.llm) else {})


def _write_configs(model: VideoLanguageModel, folder: Path) -> None:
    model.vision.config.save_pretrained(folder / "vision")
    if model.text is not None:
        model.text.config.save_pretrained(folder / "text")


def _write_spec(model: VideoLanguageModel, folder: Path, template: str | None, extra: dict) -> None:
    spec = {
        "format_version": FORMAT_VERSION,
        "architecture": model.arch.to_json(),
        "components": {name: name for name in model.components()},
        "template": template,
        **extra,
    }
    (folder / EXPORT_SPEC).write_text(json.dumps(spec, indent=2) + "\n")


def _write_export(model: VideoLanguageModel, tokenizer, states: dict, folder: Path, template: str | None) -> None:
    # save_pretrained empties the state dict it is given: each gets its own (same tensors)
    model.vision.save_pretrained(folder / "vision", state_dict=dict(states["vision"]))
    _write_configs(model, folder)
    spec_extra = {}
    if has_lora(model.llm):  # the merged LLM for plain loading; the adapter alone beside it
        peft_config = model.llm.peft_config[ADAPTER]
        llm_state, adapter = split_lora_state(states["llm"], peft_config.lora_alpha / peft_config.r)
        model.llm.get_base_model().save_pretrained(folder / "llm", state_dict=dict(llm_state))
        peft_config.save_pretrained(folder / "llm_adapter")
        save_file({k: v.contiguous() for k, v in adapter.items()}, folder / "llm_adapter" / "adapter_model.safetensors")
        spec_extra["lora_adapter"] = "llm_adapter"
    else:
        llm_state = states["llm"]
        model.llm.save_pretrained(folder / "llm", state_dict=dict(llm_state))
    tokenizer.save_pretrained(folder / "llm")
    reason = llava_next_video.mismatch(model)
    if reason is None:
        llava_next_video.write_twin(model, tokenizer, states, llm_state, folder / llava_next_video.FOLDER)
        spec_extra["llava_next_video"] = {"folder": llava_next_video.FOLDER}
        print(f"export: LLaVA-NeXT-Video twin (transformers, vLLM) in {llava_next_video.FOLDER}/", flush=True)
    else:
        spec_extra["llava_next_video"] = {"unavailable": reason}
        print(f"export: no LLaVA-NeXT-Video twin: {reason}", flush=True)
    for name in model.components():
        if name not in ("vision", "llm"):  # our own modules: plain safetensors
            (folder / name).mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in states[name].items()}, folder / name / "model.safetensors")
    _write_spec(model, folder, template, spec_extra)
