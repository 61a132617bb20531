"""A checkpoint's universal form, for resuming it on another number of ranks.

DeepSpeed's ZeRO files hold each rank's slice of the flat optimizer partitions and load only on
as many ranks as wrote them. Its `ds_to_universal` rewrites them as one file per parameter and
optimizer state (`zero/NAME/fp32.pt`, `exp_avg.pt`, ...), from which an engine built with
`"checkpoint": {"load_universal": true}` takes its own slices on any number of ranks. The
conversion runs once per tag, on rank 0, into the tag's `universal/` folder.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import torch

from trainer.checkpoint_integrity import FileList, check_files, files_under, list_files
from trainer.ranks import barrier, from_rank0, rank
from trainer.storage import Storage

UNIVERSAL = "universal"
CONVERTED = "converted"  # written into universal/ once the conversion is all in storage: its file list, JSON


def _zero_file(name: str) -> bool:
    return "/" not in name and name.endswith(("_model_states.pt", "_optim_states.pt"))


def ensure_universal(storage: Storage, tag: str, files: FileList) -> tuple[str, FileList]:
    """The folder name (in `storage`) of `tag`'s universal form and the files it holds, converted
    by rank 0 from the tag's ZeRO files (checked against `files`, the tag's list) unless a
    finished conversion is there; every rank returns once it is."""
    name = f"{tag}/{UNIVERSAL}"
    if rank() == 0 and not storage.exists(f"{name}/{CONVERTED}"):
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        print(f"converting {storage.child(tag).url} to a universal checkpoint", flush=True)
        with storage.fetched(tag, keep=_zero_file) as folder, tempfile.TemporaryDirectory() as tmp:
            check_files(folder, files, _zero_file, storage.child(tag).url)
            output = Path(tmp) / "checkpoint"  # ds_to_universal also writes a pointer file beside it
            ds_to_universal(
                SimpleNamespace(
                    input_folder=str(folder),
                    output_folder=str(output),
                    num_extract_workers=1,
                    num_merge_workers=1,
                    keep_temp_folder=False,
                    strict=True,
                    inject_missing_state=False,
                )
            )
            converted = list_files(output, files_under(output))
            with storage.replaced(name) as target:
                shutil.copytree(output, target, dirs_exist_ok=True)
        storage.write_text(f"{name}/{CONVERTED}", json.dumps(converted) + "\n")
    barrier()
    return name, json.loads(from_rank0(storage.read_text(f"{name}/{CONVERTED}") if rank() == 0 else None))


@contextmanager
def universal_loading(engine) -> Iterator[None]:
    """Within: the engine's `load_checkpoint` reads a universal folder (DeepSpeed reads its
    `checkpoint.load_universal` setting only while loading).

    It also undoes two things DeepSpeed 0.19's ZeRO-3 universal load does to the optimizer. It
    gives every parameter group group 0's settings (so the learning rate of a module with its own
    `module_lr`): each group gets its own back, with the learning rate the loaded scheduler gave
    it. And it puts one shared `step` tensor into every group's state, which each group's Adam
    update would increment: bias corrections would run ahead from the second group on."""
    inner = engine.optimizer.optimizer
    settings = [{key: value for key, value in group.items() if key != "params"} for group in inner.param_groups]
    engine._config.load_universal_checkpoint = True
    try:
        yield
    finally:
        engine._config.load_universal_checkpoint = False
    for group, own, lr in zip(inner.param_groups, settings, engine.lr_scheduler.get_last_lr()):
        group.update(own, lr=lr)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
