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
import torch.distributed as dist

LATEST = "latest"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


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
        rank_file = folder / f"rank-{_rank()}.pt"
        torch.save({"reader": self.loader.state_dict(), "torch_rng": torch.get_rng_state()},
                   rank_file.with_suffix(".tmp"))
        os.replace(rank_file.with_suffix(".tmp"), rank_file)
        self.engine.save_checkpoint(str(self.directory), tag=tag, save_latest=False,
                                    client_state={"step": step, "read_health": self.health.state_dict()})
        _barrier()  # every rank's files are on disk before the pointer moves
        if _rank() == 0:
            pointer = self.directory / LATEST
            pointer.with_suffix(".tmp").write_text(tag)
            os.replace(pointer.with_suffix(".tmp"), pointer)
            self._prune(keep_tag=tag)
        _barrier()
        return folder

    def _prune(self, keep_tag: str) -> None:
        tags = sorted(p.name for p in self.directory.glob("step-*") if p.is_dir())
        for old in [t for t in tags if t != keep_tag][: max(0, len(tags) - self.keep)]:
            shutil.rmtree(self.directory / old, ignore_errors=True)

    def restore(self) -> int:
        """Load the newest checkpoint, if there is one; returns the step it was taken at (0: none)."""
        pointer = self.directory / LATEST
        if not pointer.is_file():
            return 0
        tag = pointer.read_text().strip()
        rank_file = self.directory / tag / f"rank-{_rank()}.pt"
        if not rank_file.is_file():
            raise ValueError(f"{rank_file}: missing; the checkpoint was written by fewer ranks than this run has")
        path, client_state = self.engine.load_checkpoint(str(self.directory), tag=tag)
        if path is None:
            raise ValueError(f"{self.directory / tag}: DeepSpeed could not load this checkpoint")
        saved = torch.load(rank_file, weights_only=False)
        self.loader.load_state_dict(saved["reader"])
        torch.set_rng_state(saved["torch_rng"])
        self.health.load_state_dict(client_state["read_health"])
        return int(client_state["step"])
