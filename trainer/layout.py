"""How a stage's global batch lies over its ranks, and how that changes when a checkpoint resumes
on another number of ranks.

The global batch is a fixed number of micro-batches per optimizer step, each from one of the
stage's data streams (data_shards/read/reader.py); both are fixed when the stage first starts
and saved with every checkpoint. On W ranks each step takes `micro_batches_per_step / W`
accumulation micro-batches per rank, so the samples of every step, and the mean loss over them,
do not depend on W.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from data_shards.errors import ValleyForgeError
from trainer.job import StageJob


@dataclass(frozen=True)
class BatchLayout:
    world_size: int
    streams: int
    micro_batches_per_step: int
    micro_batch_size: int

    @property
    def grad_accum(self) -> int:
        return self.micro_batches_per_step // self.world_size

    def to_json(self) -> str:
        return json.dumps(asdict(self)) + "\n"

    @classmethod
    def from_json(cls, text: str) -> BatchLayout:
        return cls(**json.loads(text))


def plan_layout(job: StageJob, world_size: int, saved: BatchLayout | None) -> BatchLayout:
    """This run's layout on `world_size` ranks: the streams and global batch of the checkpoint it
    resumes (`saved`), else the job's."""
    if saved is None:
        streams = job.data.streams or world_size * max(job.data.num_workers, 1)
        per_step = job.micro_batches_per_step or job.stage.grad_accum * world_size
    elif saved.micro_batch_size != job.data.micro_batch_size:
        raise ValleyForgeError(
            f"data.micro_batch_size {job.data.micro_batch_size} differs from the "
            f"{saved.micro_batch_size} of the checkpoint this stage resumes; resume with the same"
        )
    else:
        streams, per_step = saved.streams, saved.micro_batches_per_step
    if per_step % world_size or streams % world_size:
        raise ValleyForgeError(
            f"stages.{job.stage.name}: a global batch of {per_step} micro-batches from {streams} data "
            f"streams cannot be split over {world_size} ranks; the number of ranks must divide both "
            f"(they are fixed when the stage first starts: grad_accum x ranks, data.streams)"
        )
    return BatchLayout(world_size, streams, per_step, job.data.micro_batch_size)


def describe_change(saved: BatchLayout, now: BatchLayout) -> str:
    """One line on a resume across rank counts."""
    return (
        f"resuming a checkpoint of {saved.world_size} rank(s) on {now.world_size}: grad_accum "
        f"{saved.grad_accum} -> {now.grad_accum} keeps the global batch of {now.micro_batches_per_step} "
        f"micro-batches x {now.micro_batch_size} samples, {now.streams} data streams"
    )
