"""A checkpoint made into an export, so a stage can start from any recorded checkpoint: DeepSpeed's
ZeRO shards consolidated (however many ranks wrote them) into the model the checkpoint's own
blueprint rebuilds, written as an export (trainer/export.py). One process holds the whole model."""

from __future__ import annotations

import json
from pathlib import Path

from data_shards.errors import ValleyForgeError
from trainer.blueprint import blueprint_from_export, build_model, read_export_spec
from trainer.checkpoint import COMPLETE, FILES, MODEL_FILES
from trainer.checkpoint_integrity import check_files
from trainer.checkpoint_universal import UNIVERSAL
from trainer.export import export_model
from trainer.storage import Storage


def export_checkpoint(checkpoint: Storage, storage: Storage) -> None:
    """Writes the export of the checkpoint tag `checkpoint` into `storage`, once its files are
    checked against its writer's list."""
    with checkpoint.fetched(keep=lambda name: not name.startswith(f"{UNIVERSAL}/")) as folder:
        mark = json.loads((folder / COMPLETE).read_text()) if (folder / COMPLETE).is_file() else {}
        if FILES not in mark:
            raise ValleyForgeError(
                f"{checkpoint.url}: no {COMPLETE} marker with a file list: not a complete checkpoint of this release"
            )
        check_files(
            folder,
            mark[FILES],
            lambda name: name != COMPLETE and not name.startswith(f"{UNIVERSAL}/"),
            checkpoint.url,
        )
        _export(folder, storage)


def _export(tag_folder: Path, storage: Storage) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    spec = read_export_spec(
        tag_folder / MODEL_FILES,
        "a checkpoint's model files (an older checkpoint): register "
        "its stage and start from the registered version instead",
    )
    if spec.get("lora_adapter"):
        raise ValleyForgeError(
            f"{tag_folder}: a LoRA stage's checkpoint cannot be a start yet; register it "
            f"(stages[].register) and start from models:/NAME/VERSION"
        )
    blueprint = blueprint_from_export(tag_folder / MODEL_FILES)
    model = build_model(blueprint)
    state = get_fp32_state_dict_from_zero_checkpoint(str(tag_folder.parent), tag=tag_folder.name)
    missing = sorted({name for name, _ in model.named_parameters()} - set(state))  # tied weights count once
    if missing:
        raise ValleyForgeError(
            f"{tag_folder}: the checkpoint lacks {len(missing)} of its model's parameters (e.g. {missing[:3]})"
        )
    model.load_state_dict(state, strict=False)
    export_model(model, blueprint.tokenizer, storage, spec.get("template"))
