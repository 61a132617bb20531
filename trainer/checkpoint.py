"""One checkpointer for everything resumable: the engine (sharded model, optimizer, scheduler),
the step, the read-health counts, and per rank the data reader's position, torch RNG and (rank 0)
the metrics the tracking store may not have yet.

    CHECKPOINTS/              a folder in storage (trainer/storage.py)
      latest                  the newest complete tag; written last, atomically
      step-00000300/          DeepSpeed's files + rank-0.pt, rank-1.pt, ... (reader state, RNG)
        model/                the model's configs, tokenizer and spec, no weights: with the
                              shards they make an export (trainer/checkpoint_export.py)
        complete              written once every rank's files are in storage: the step, its
                              train loss and the latest eval loss, as JSON

A crash while saving leaves `latest` naming the previous complete checkpoint, and a tag without
`complete` is never resumed from nor kept. Each rank writes and reads only its own files; on an
object store through a local folder of its own. Our files load with torch's weights-only
unpickler; DeepSpeed's own files still go through its full unpickler (see README).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from trainer.metric_log import MetricLog
from trainer.ranks import barrier, from_rank0, gather, rank
from trainer.storage import Storage

LATEST = "latest"
COMPLETE = "complete"
MODEL_FILES = "model"
# DeepSpeed names each data-parallel rank's files zero_pp_rank_<r>_mp_rank_<m>_...; ours rank-<r>.pt
_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rank-)(\d+)[_.]")


def tag_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass
class CheckpointRecord:
    """What the driver records of a complete checkpoint (rank 0 sends it after each save)."""
    url: str  # the tag's folder in storage
    step: int
    scores: dict  # train/loss, and eval/loss when the stage has evaluated by then
    removed: list[str]  # URLs of the tags this save's pruning removed


def step_tags(storage: Storage) -> list[str]:
    """Every tag folder in `storage`, complete or not, oldest first."""
    return sorted(name for name in storage.folders() if name.startswith("step-"))


def complete_tags(storage: Storage, tags: list[str] | None = None) -> dict[str, dict]:
    """The complete ones of `tags` (default: all in `storage`), oldest first, each with its mark
    (step and scores)."""
    marks = {tag: storage.read_text(f"{tag}/{COMPLETE}") for tag in (step_tags(storage) if tags is None else tags)}
    return {tag: json.loads(mark) for tag, mark in marks.items() if mark is not None}


def best_tag(marks: dict[str, dict]) -> str | None:
    """The tag with the lowest eval/loss (the newest among equals); None when none was evaluated."""
    scored = [(mark["eval/loss"], -mark["step"], tag) for tag, mark in marks.items() if "eval/loss" in mark]
    return min(scored)[2] if scored else None


def prune(storage: Storage, keep: int, keep_best: bool = False) -> list[str]:
    """Keeps the newest `keep` complete tags (and with `keep_best` the lowest eval/loss); removes
    the others and any a crash left incomplete. Returns the names removed."""
    tags = step_tags(storage)
    marks = complete_tags(storage, tags)
    kept = set(list(marks)[len(marks) - keep:]) | ({best_tag(marks)} if keep_best else set())
    removed = [tag for tag in tags if tag not in kept]
    for tag in removed:
        storage.remove(tag)
    return removed


def belongs_to_rank(file_name: str, this_rank: int) -> bool:
    """Whether a checkpoint file is one `this_rank` loads: its own, or one no rank owns."""
    owner = _RANK_FILE.search(file_name)
    return owner is None or int(owner.group(1)) == this_rank


def written_by_rank(file_name: str, this_rank: int) -> bool:
    """Whether `this_rank` wrote a checkpoint file: its own; rank 0 the ones no rank owns."""
    owner = _RANK_FILE.search(file_name)
    return int(owner.group(1)) == this_rank if owner else this_rank == 0


class Checkpointer:
    """Saves every `every` steps and after the last (never when `every` is 0), keeping `keep` tags
    (and with `keep_best` the one of lowest eval/loss); rank 0 hands each save's record to
    `on_saved`."""

    def __init__(self, storage: Storage, every: int, engine, loader, health, keep: int = 2,
                 keep_best: bool = False, on_saved: Callable[[CheckpointRecord], None] | None = None,
                 write_model_files: Callable[[Path], None] = lambda folder: None):
        self.storage, self.every, self.keep, self.keep_best = storage, every, keep, keep_best
        self.engine, self.loader, self.health = engine, loader, health
        self.on_saved = on_saved or (lambda record: None)
        self.write_model_files = write_model_files  # rank 0, into each tag's `model/`

    def due(self, step: int, last: bool) -> bool:
        return bool(self.every) and (step % self.every == 0 or last)

    def save(self, step: int, log: MetricLog, scores: dict) -> str:
        """Every rank's files under one tag, its `complete` mark, then the `latest` pointer;
        returns the tag."""
        tag = tag_name(step)
        if rank() == 0:  # what a crashed save of this tag left (a resumed run saves it again)
            self.storage.remove(tag)
        barrier()
        with self.storage.staged(tag, written_here=lambda name: written_by_rank(name, rank())) as folder:
            torch.save({"reader": self.loader.state_dict(), "torch_rng": torch.get_rng_state(),
                        "metric_log": log.state_dict() if rank() == 0 else None},
                       folder / f"rank-{rank()}.pt")
            self.engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False,
                                        client_state={"step": step, "read_health": self.health.state_dict()})
            if rank() == 0:
                self.write_model_files(folder / MODEL_FILES)
        barrier()  # every rank's files are in storage (flushed) before the tag is marked and the pointer moves
        if rank() == 0:
            self.storage.write_text(f"{tag}/{COMPLETE}", json.dumps({"step": step, **scores}) + "\n")
            self.storage.write_text(LATEST, tag)
            removed = prune(self.storage, self.keep, self.keep_best)
            self.on_saved(CheckpointRecord(self.storage.child(tag).url, step, scores,
                                           [self.storage.child(t).url for t in removed]))
        barrier()
        return tag

    def restore(self, log: MetricLog, resume_from: str | None = None) -> int:
        """Load the checkpoint rank 0 finds newest (or, when the stage has none, the tag at the URL
        `resume_from`), the same tag on every rank; returns the step it was taken at (0: none). A
        rank that cannot see its files of that tag stops every rank, named: no rank ever starts
        from step 0 while the others resume."""
        pointer = self.storage.read_text(LATEST) if rank() == 0 else None
        own_tag = from_rank0(pointer.strip() if pointer else None)  # each rank then looks in its own storage
        if own_tag:
            storage, tag = self.storage, own_tag
        elif resume_from:
            parent, tag = resume_from.rstrip("/").rsplit("/", 1)
            storage = Storage(parent)
        else:
            return 0
        blind = [r for r, missing in enumerate(gather(not storage.exists(f"{tag}/rank-{rank()}.pt"))) if missing]
        if blind:
            raise ValueError(f"{storage.child(tag).url}: rank(s) {blind} cannot read their files of the "
                             f"checkpoint rank 0 resumes from; every rank must see the same checkpoint storage "
                             f"(cluster.storage), and a checkpoint resumes on as many ranks as wrote it")
        with storage.fetched(tag, keep=lambda name: belongs_to_rank(name, rank())) as folder:
            client_state = self._load_engine(folder, storage.child(tag).url)
            saved = torch.load(folder / f"rank-{rank()}.pt", weights_only=True)
        self.loader.load_state_dict(saved["reader"])
        torch.set_rng_state(saved["torch_rng"])
        if saved.get("metric_log") and storage == self.storage:  # another run's metrics stay its own
            log.load_state_dict(saved["metric_log"])
        self.health.load_state_dict(client_state["read_health"])
        print(f"resumed from {storage.child(tag).url} at step {client_state['step']}", flush=True)
        return int(client_state["step"])

    def load_weights(self, tag: str) -> None:
        """The engine's state as of this stage's checkpoint `tag` (the data position stays)."""
        with self.storage.fetched(tag, keep=lambda name: belongs_to_rank(name, rank())) as folder:
            self._load_engine(folder, self.storage.child(tag).url)

    def _load_engine(self, folder, url: str) -> dict:
        path, client_state = self.engine.load_checkpoint(str(folder.parent), tag=folder.name)
        if path is None:
            raise ValueError(f"{url}: DeepSpeed could not load this checkpoint")
        return client_state
