"""The data section of a job config: how shards are read into batches, the sources a stage
trains on, and the names of the data side's choices. A leaf: it imports no implementation (the
registries those names select from are checked against them in tests/test_config.py), so
loading a config imports neither torch nor PyAV."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

# data.frame_sampling: data_shards/frames.py SAMPLERS
FrameSampling = Literal["uniform", "random_segment", "fps"]
# data.mixing: data_shards/read/stream.py MIXING
Mixing = Literal["epoch", "resampled"]
# a stage's conversation template: data_shards/conversation.py TEMPLATES
TEMPLATE_NAMES = ("plain", "vicuna_v1", "mplug_owl", "llama3", "chatml")


def _known_template(name: str) -> str:
    if name not in TEMPLATE_NAMES:
        raise ValueError(f"unknown template {name!r}; choose one of {sorted(TEMPLATE_NAMES)}")
    return name


TemplateName = Annotated[str, AfterValidator(_known_template)]


class Strict(BaseModel):
    """A config section: unknown keys are errors (every section of the job config is one)."""

    model_config = ConfigDict(extra="forbid")


class ReaderConfig(Strict):
    micro_batch_size: int = Field(8, ge=1, description="samples per rank per forward pass")
    num_workers: int = Field(1, ge=0, description="DataLoader worker processes per rank (decode + tokenize)")
    streams: int | None = Field(
        None,
        ge=1,
        description="streams a stage's training data is split into, fixed when the stage first starts: "
        "the sample order depends on them, the seed and the data, not on the ranks and "
        "workers reading them; at least one per loader worker of each of the most ranks, and a multiple of "
        "the stage's global batch (grad_accum x the most ranks) or of each rank count. Each keeps its own "
        "shuffle buffer. Default: the fewest that do",
    )
    shuffle_buffer: int = Field(256, ge=1, description="samples held for shuffling; 1 disables")
    max_length: int = Field(512, ge=8, description="tokens per sample after placeholder expansion")
    packing: bool = Field(False, description="pack each micro-batch's samples into rows of max_length tokens")
    seed: int = 0
    frame_sampling: FrameSampling = Field(
        "uniform", description="training frame choice; evaluation always samples uniformly"
    )
    sample_fps: float = Field(1.0, gt=0, description="fps sampling: frames per second, capped at num_frames")
    mixing: Mixing = Field(
        "epoch", description="epoch: each source read once per epoch; resampled: sources drawn by weight without end"
    )
    max_skip_fraction: float = Field(0.01, ge=0, le=1, description="stop when more read-time samples are skipped")
    skip_check_min_samples: int = Field(200, ge=1, description="samples read before the skip rate is judged")


class DataSource(Strict):
    """One source of a mixture: a split directory, or shard URLs (globs, brace ranges, s3://, pipe:)."""

    url: str
    weight: float = Field(1.0, gt=0)


def as_sources(data: str | list[DataSource]) -> list[DataSource]:
    return [DataSource(url=data)] if isinstance(data, str) else list(data)
