"""The data section of a job config: how shards are read into batches."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ReaderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    micro_batch_size: int = Field(8, ge=1, description="samples per rank per forward pass")
    num_workers: int = Field(1, ge=0, description="DataLoader worker processes per rank (decode + tokenize)")
    shuffle_buffer: int = Field(256, ge=1, description="samples held for shuffling; 1 disables")
    max_length: int = Field(512, ge=8, description="tokens per sample after placeholder expansion")
    seed: int = 0
