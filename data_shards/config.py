"""The data section of a job config: how shards are read into batches, and the sources a
stage trains on."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from data_shards.frames import SAMPLERS
from data_shards.read.stream import MIXING


class Strict(BaseModel):
    """A config section: unknown keys are errors (every section of the job config is one)."""
    model_config = ConfigDict(extra="forbid")


class ReaderConfig(Strict):

    micro_batch_size: int = Field(8, ge=1, description="samples per rank per forward pass")
    num_workers: int = Field(1, ge=0, description="DataLoader worker processes per rank (decode + tokenize)")
    streams: int | None = Field(
        None, ge=1, description="streams a stage's training data is split into, fixed when the stage first starts: "
                                "the sample order depends on them, the seed and the data, not on the ranks and "
                                "workers reading them; every rank count the stage runs on must divide it. Default: "
                                "data.num_workers x the least common multiple of the rank counts cluster.num_workers "
                                "allows")
    shuffle_buffer: int = Field(256, ge=1, description="samples held for shuffling; 1 disables")
    max_length: int = Field(512, ge=8, description="tokens per sample after placeholder expansion")
    packing: bool = Field(False, description="pack each micro-batch's samples into rows of max_length tokens")
    seed: int = 0
    frame_sampling: Literal[tuple(SAMPLERS)] = Field(
        "uniform", description="training frame choice; evaluation always samples uniformly")
    sample_fps: float = Field(1.0, gt=0, description="fps sampling: frames per second, capped at num_frames")
    mixing: Literal[tuple(MIXING)] = Field(
        "epoch", description="epoch: each source read once per epoch; resampled: sources drawn by weight without end")
    max_skip_fraction: float = Field(0.01, ge=0, le=1, description="stop when more read-time samples are skipped")
    skip_check_min_samples: int = Field(200, ge=1, description="samples read before the skip rate is judged")


class DataSource(Strict):
    """One source of a mixture: a split directory, or shard URLs (globs, brace ranges, s3://, pipe:)."""

    url: str
    weight: float = Field(1.0, gt=0)


def as_sources(data: str | list[DataSource]) -> list[DataSource]:
    return [DataSource(url=data)] if isinstance(data, str) else list(data)
