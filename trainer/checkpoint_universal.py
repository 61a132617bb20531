"""A checkpoint's universal form, for resuming it on another number of ranks.

DeepSpeed's ZeRO files hold each rank's slice of the flat optimizer partitions and load only on
as many ranks as wrote them. Its `ds_to_universal` rewrites them as one file per parameter and
optimizer state (`zero/NAME/fp32.pt`, `exp_avg.pt`, ...), from which an engine built with
`"checkpoint": {"load_universal": true}` takes its own slices on any number of ranks. The
conversion runs once per tag, into the tag's `universal/` folder, on the rank whose node has the
most free memory (the others wait), with DeepSpeed's extract and merge steps spread over worker
processes when the checkpoint is large enough to gain from them: as many as the CPUs allow, and
for the extract step (each worker holds one rank's optimizer file) as many as the free memory
allows.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import psutil
import torch

from trainer.checkpoint_integrity import FileList, check_files, files_under, list_files
from trainer.ranks import barrier, from_rank0, gather, rank
from trainer.storage import Storage

UNIVERSAL = "universal"
CONVERTED = "converted"  # written into universal/ once the conversion is all in storage: its file list, JSON


def _zero_file(name: str) -> bool:
    return "/" not in name and name.endswith(("_model_states.pt", "_optim_states.pt"))


def ensure_universal(storage: Storage, tag: str, files: FileList) -> tuple[str, FileList]:
    """The folder name (in `storage`) of `tag`'s universal form and the files it holds, converted
    from the tag's ZeRO files (checked against `files`, the tag's list) unless a finished
    conversion is there; every rank returns once it is."""
    name = f"{tag}/{UNIVERSAL}"
    free = gather(psutil.virtual_memory().available)
    converter = free.index(max(free))
    if rank() == converter and not storage.exists(f"{name}/{CONVERTED}"):
        _convert(storage, tag, files, name)
    barrier()
    return name, json.loads(from_rank0(storage.read_text(f"{name}/{CONVERTED}") if rank() == 0 else None))


# Below this size the worker processes cost more to start than they save (BENCHMARKS.md, "Recovery").
PARALLEL_FROM_BYTES = 2**30


def conversion_workers(optimizer_files: list[int], free_bytes: int, cpus: int) -> tuple[int, int]:
    """Extract and merge worker processes for a checkpoint of one optimizer file per rank (their
    sizes): one of each for a small checkpoint; else an extract worker per file as the CPUs and
    free memory allow (each holds one file and the slices it cuts from it: twice its size), and a
    merge worker (one parameter's slices at a time) per CPU."""
    if sum(optimizer_files) < PARALLEL_FROM_BYTES:
        return 1, 1
    extract = min(len(optimizer_files), cpus, free_bytes // (2 * max(optimizer_files)))
    return max(extract, 1), max(cpus, 1)


def _convert(storage: Storage, tag: str, files: FileList, name: str) -> None:
    from deepspeed.checkpoint import ds_to_universal as converter

    # Its worker pools fork this process by default, and a fork of a process whose torch has run
    # parallel work can hang in the child (its OpenMP pool): they fork a fresh server process
    # instead, which imports the converter once.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([converter.__name__])
    converter.ProcessPoolExecutor = partial(ProcessPoolExecutor, mp_context=context)

    started, url = time.perf_counter(), storage.child(tag).url
    with storage.fetched(tag, keep=_zero_file) as folder, tempfile.TemporaryDirectory() as tmp:
        check_files(folder, files, _zero_file, url)
        sizes = [path.stat().st_size for path in folder.glob("*_optim_states.pt")]
        extract, merge = conversion_workers(sizes, psutil.virtual_memory().available, len(os.sched_getaffinity(0)))
        print(f"converting {url} to a universal checkpoint ({extract} extract, {merge} merge workers)", flush=True)
        output = Path(tmp) / "checkpoint"  # ds_to_universal also writes a pointer file beside it
        converter.main(
            SimpleNamespace(
                input_folder=str(folder),
                output_folder=str(output),
                num_extract_workers=extract,
                num_merge_workers=merge,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=False,
            )
        )
        converted = list_files(output, files_under(output))
        with storage.replaced(name) as target:
            shutil.copytree(output, target, dirs_exist_ok=True)
    storage.write_text(f"{name}/{CONVERTED}", json.dumps(converted) + "\n")
    print(f"converted {url} in {time.perf_counter() - started:.1f} s on rank {rank()}", flush=True)


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
