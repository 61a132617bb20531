"""A checkpoint made into an export, so a stage can start from any recorded checkpoint: DeepSpeed's
ZeRO shards consolidated (however many ranks wrote them) into the model the checkpoint's own
blueprint rebuilds, written as an export (trainer/export.py). One process holds the whole model."""
from __future__ import annotations

import json
from pathlib import Path

from trainer.blueprint import EXPORT_SPEC, blueprint_from_export, build_model
from trainer.checkpoint import MODEL_FILES
from trainer.export import export_model
from trainer.storage import Storage


def export_checkpoint(tag_folder: Path, storage: Storage) -> None:
    """Writes the export of the checkpoint in the local folder `tag_folder` into `storage`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    spec_path = tag_folder / MODEL_FILES / EXPORT_SPEC
    if not spec_path.is_file():
        raise ValueError(f"{tag_folder}: the checkpoint holds no {MODEL_FILES}/{EXPORT_SPEC} (an older checkpoint): "
                         f"register its stage and start from the registered version instead")
    spec = json.loads(spec_path.read_text())
    if spec.get("lora_adapter"):
        raise ValueError(f"{tag_folder}: a LoRA stage's checkpoint cannot be a start yet; register it "
                         f"(stages[].register) and start from models:/NAME/VERSION")
    blueprint = blueprint_from_export(tag_folder / MODEL_FILES)
    model = build_model(blueprint)
    state = get_fp32_state_dict_from_zero_checkpoint(str(tag_folder.parent), tag=tag_folder.name)
    missing = sorted({name for name, _ in model.named_parameters()} - set(state))  # tied weights count once
    if missing:
        raise ValueError(f"{tag_folder}: the checkpoint lacks {len(missing)} of its model's parameters "
                         f"(e.g. {missing[:3]})")
    model.load_state_dict(state, strict=False)
    export_model(model, blueprint.tokenizer, storage, spec.get("template"))
