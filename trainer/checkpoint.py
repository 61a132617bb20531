"""One checkpointer for everything resumable: the engine (sharded model, optimizer, scheduler),
the step, the read-health counts, and per rank the data reader's position, torch RNG and (rank 0)
the metrics the tracking store may not have yet.

    CHECKPOINTS/              a folder in storage (trainer/storage.py)
      latest                  the newest complete tag; written last, atomically
      step-00000300/          DeepSpeed's files + rank-0.pt, rank-1.pt, ... (reader state, RNG)
        complete              written once every rank's files are in storage

A crash while saving leaves `latest` naming the previous complete checkpoint, and a tag without
`complete` is never resumed from nor kept. Each rank writes and reads only its own files; on an
object store through a local folder of its own. Our files load with torch's weights-only
unpickler; DeepSpeed's own files still go through its full unpickler (see README).
"""
from __future__ import annotations

import re

import torch

from trainer.metric_log import MetricLog
from trainer.ranks import barrier, from_rank0, gather, rank
from trainer.storage import Storage

LATEST = "latest"
COMPLETE = "complete"
# DeepSpeed names each data-parallel rank's files zero_pp_rank_<r>_mp_rank_<m>_...; ours rank-<r>.pt
_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rank-)(\d+)[_.]")


def prune(storage: Storage, keep: int) -> None:
    """Keeps the newest `keep` complete tags; removes older ones and any a crash left incomplete."""
    tags = sorted(name for name in storage.folders() if name.startswith("step-"))
    complete = [tag for tag in tags if storage.exists(f"{tag}/{COMPLETE}")]
    for tag in tags:
        if tag not in complete[len(complete) - keep:]:
            storage.remove(tag)


def belongs_to_rank(file_name: str, this_rank: int) -> bool:
    """Whether a checkpoint file is one `this_rank` loads: its own, or one no rank owns."""
    owner = _RANK_FILE.search(file_name)
    return owner is None or int(owner.group(1)) == this_rank


class Checkpointer:
    """Saves every `every` steps and after the last (never when `every` is 0), keeping `keep` tags."""

    def __init__(self, storage: Storage, every: int, engine, loader, health, keep: int = 2):
        self.storage, self.every, self.keep = storage, every, keep
        self.engine, self.loader, self.health = engine, loader, health

    def after_step(self, step: int, last: bool, log: MetricLog) -> None:
        if self.every and (step % self.every == 0 or last):
            self.save(step, log)

    def save(self, step: int, log: MetricLog) -> str:
        """Every rank's files under one tag, its `complete` mark, then the `latest` pointer;
        returns the tag."""
        tag = f"step-{step:08d}"
        if rank() == 0:  # what a crashed save of this tag left (a resumed run saves it again)
            self.storage.remove(tag)
        barrier()
        with self.storage.staged(tag) as folder:
            torch.save({"reader": self.loader.state_dict(), "torch_rng": torch.get_rng_state(),
                        "metric_log": log.state_dict() if rank() == 0 else None},
                       folder / f"rank-{rank()}.pt")
            self.engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False,
                                        client_state={"step": step, "read_health": self.health.state_dict()})
        barrier()  # every rank's files are in storage (flushed) before the tag is marked and the pointer moves
        if rank() == 0:
            self.storage.write_text(f"{tag}/{COMPLETE}", f"{step}\n")
            self.storage.write_text(LATEST, tag)
            prune(self.storage, self.keep)
        barrier()
        return tag

    def restore(self, log: MetricLog) -> int:
        """Load the checkpoint rank 0 finds newest, the same tag on every rank; returns the step it
        was taken at (0: none). A rank that cannot see its files of that tag stops every rank,
        named: no rank ever starts from step 0 while the others resume."""
        pointer = self.storage.read_text(LATEST) if rank() == 0 else None
        tag = from_rank0(pointer.strip() if pointer else None)
        if tag is None:
            return 0
        rank_file = f"{tag}/rank-{rank()}.pt"
        blind = [r for r, missing in enumerate(gather(not self.storage.exists(rank_file))) if missing]
        if blind:
            raise ValueError(f"{self.storage.child(tag).url}: rank(s) {blind} cannot read their files of the "
                             f"checkpoint rank 0 resumes from; every rank must see the same checkpoint storage "
                             f"(cluster.storage), and a checkpoint resumes on as many ranks as wrote it")
        with self.storage.fetched(tag, keep=lambda name: belongs_to_rank(name, rank())) as folder:
            path, client_state = self.engine.load_checkpoint(str(folder.parent), tag=folder.name)
            if path is None:
                raise ValueError(f"{self.storage.child(tag).url}: DeepSpeed could not load this checkpoint")
            saved = torch.load(folder / f"rank-{rank()}.pt", weights_only=True)
        self.loader.load_state_dict(saved["reader"])
        torch.set_rng_state(saved["torch_rng"])
        if saved.get("metric_log"):
            log.load_state_dict(saved["metric_log"])
        self.health.load_state_dict(client_state["read_health"])
        print(f"resumed from {self.storage.child(tag).url} at step {client_state['step']}", flush=True)
        return int(client_state["step"])
