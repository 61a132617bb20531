"""One checkpointer for everything resumable: the engine (sharded model, optimizer, scheduler),
the step, the read-health counts, and per rank the data reader's position and torch RNG.

    CHECKPOINTS/
      latest                  the newest complete tag; written last, atomically
      step-00000300/          DeepSpeed's files + rank-0.pt, rank-1.pt, ... (reader state, RNG)

A crash while saving leaves `latest` naming the previous complete checkpoint.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from trainer.ranks import barrier, from_rank0, gather, rank

LATEST = "latest"


class Checkpointer:
    """Saves every `every` steps and after the last (never when `every` is 0), keeping `keep` tags."""

    def __init__(self, directory: str | Path, every: int, engine, loader, health, keep: int = 2):
        self.directory, self.every, self.keep = Path(directory), every, keep
        self.engine, self.loader, self.health = engine, loader, health

    def after_step(self, step: int, last: bool) -> None:
        if self.every and (step % self.every == 0 or last):
            self.save(step)

    def save(self, step: int) -> Path:
        tag = f"step-{step:08d}"
        folder = self.directory / tag
        folder.mkdir(parents=True, exist_ok=True)
        rank_file = folder / f"rank-{rank()}.pt"
        torch.save({"reader": self.loader.state_dict(), "torch_rng": torch.get_rng_state()},
                   rank_file.with_suffix(".tmp"))
        os.replace(rank_file.with_suffix(".tmp"), rank_file)
        self.engine.save_checkpoint(str(self.directory), tag=tag, save_latest=False,
                                    client_state={"step": step, "read_health": self.health.state_dict()})
        barrier()  # every rank's files are on disk before the pointer moves
        if rank() == 0:
            pointer = self.directory / LATEST
            pointer.with_suffix(".tmp").write_text(tag)
            os.replace(pointer.with_suffix(".tmp"), pointer)
            self._prune(keep_tag=tag)
        barrier()
        return folder

    def _prune(self, keep_tag: str) -> None:
        tags = sorted(p.name for p in self.directory.glob("step-*") if p.is_dir())
        for old in [t for t in tags if t != keep_tag][: max(0, len(tags) - self.keep)]:
            shutil.rmtree(self.directory / old, ignore_errors=True)

    def restore(self) -> int:
        """Load the checkpoint rank 0 finds newest, the same tag on every rank; returns the step it
        was taken at (0: none). A rank that cannot see its files of that tag stops every rank,
        named: no rank ever starts from step 0 while the others resume."""
        pointer = self.directory / LATEST
        tag = from_rank0(pointer.read_text().strip() if pointer.is_file() else None)
        if tag is None:
            return 0
        rank_file = self.directory / tag / f"rank-{rank()}.pt"
        blind = [r for r, missing in enumerate(gather(not rank_file.is_file())) if missing]
        if blind:
            raise ValueError(f"{self.directory / tag}: rank(s) {blind} cannot read their files of the checkpoint "
                             f"rank 0 resumes from; every rank must see the same checkpoint folder, and a "
                             f"checkpoint resumes on as many ranks as wrote it")
        path, client_state = self.engine.load_checkpoint(str(self.directory), tag=tag)
        if path is None:
            raise ValueError(f"{self.directory / tag}: DeepSpeed could not load this checkpoint")
        saved = torch.load(rank_file, weights_only=False)
        self.loader.load_state_dict(saved["reader"])
        torch.set_rng_state(saved["torch_rng"])
        self.health.load_state_dict(client_state["read_health"])
        return int(client_state["step"])
