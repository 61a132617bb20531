"""The parts of a stage a checkpoint keeps besides the engine, as objects with `state_dict` /
`load_state_dict` (trainer/checkpoint.py `Part`): adapters for those that are not one already.
Each `state_dict()` is called on every rank at once and may gather across ranks."""

from __future__ import annotations

import zlib

import torch

from data_shards.read.reader import ShardLoader, merge_states
from trainer.ranks import gather, rank


class ReaderPosition:
    """Every data stream's position: each rank's streams, merged into the stage's reader state,
    which resumes on any number of ranks."""

    def __init__(self, loader: ShardLoader):
        self.loader = loader

    def state_dict(self) -> dict:
        return merge_states(gather(self.loader.state_dict()))

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


class TorchRNG:
    """Every rank's torch RNG state; a rank the checkpoint did not have (it saved on fewer ranks)
    takes a seed of its own, derived from the saved states and its rank."""

    def state_dict(self) -> dict:
        return {"by_rank": gather(torch.get_rng_state())}

    def load_state_dict(self, state: dict) -> None:
        saved = state["by_rank"]
        if rank() < len(saved):
            torch.set_rng_state(saved[rank()])
        else:
            torch.manual_seed(zlib.crc32(saved[0].numpy().tobytes() + rank().to_bytes(4, "little")))
