"""Export a (ZeRO-3 sharded) model as folders that plain transformers and ValleyForge load.

    EXPORT/
      valleyforge_model.json   how to rebuild the whole model (architecture + component folders)
      vision/                  CLIP vision tower: config.json + model.safetensors
      llm/                     causal LM + tokenizer: AutoModelForCausalLM.from_pretrained(EXPORT/llm)
      projector/               model.safetensors (the reducer has no weights)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from trainer.build import EXPORT_SPEC
from trainer.model import VideoLanguageModel
from trainer.partitioned import is_writer_rank, gather_state_dict

FORMAT_VERSION = 1


def export_model(model: VideoLanguageModel, tokenizer, out_dir: str | Path) -> Path | None:
    """Gather the weights and write the export on rank 0 (returns its path there, None elsewhere).

    Written to a temporary folder and renamed when complete. All ranks must call.
    """
    out_dir = Path(out_dir)
    states = {name: gather_state_dict(getattr(model, name)) for name in ("vision", "llm", "projector")}
    if not is_writer_rank():
        return None
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.vision.save_pretrained(tmp / "vision", state_dict=states["vision"])
    model.llm.save_pretrained(tmp / "llm", state_dict=states["llm"])
    tokenizer.save_pretrained(tmp / "llm")
    (tmp / "projector").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in states["projector"].items()}, tmp / "projector" / "model.safetensors")
    spec = {"format_version": FORMAT_VERSION, "architecture": model.arch.to_json(),
            "components": {"vision": "vision", "llm": "llm", "projector": "projector"}}
    (tmp / EXPORT_SPEC).write_text(json.dumps(spec, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
