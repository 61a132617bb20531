"""How a stage's global batch lies over its ranks, on any number of them, and the one rule the
driver (config check) and the workers (a resumed layout) both apply to it.

The global batch is a fixed number P of micro-batches per optimizer step, and the stage's data a
fixed number S of streams; both are fixed when the stage first starts and saved with every
checkpoint. Micro-batch j of the stage comes from stream j mod S, and on W ranks rank r reads
the streams v with v mod W == r (data_shards/read/reader.py). A step's P micro-batches then fall
on the ranks one apart at most, whenever S is a multiple of P (each step reads a run of P
consecutive streams) or of W: some ranks take ceil(P/W) of them, the others one fewer and one
pass at weight zero (ZeRO-3 needs every rank in every collective). The samples of every step,
and the token mean of their loss, do not depend on W.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass

from data_shards.errors import ValleyForgeError


@dataclass(frozen=True)
class BatchLayout:
    world_size: int
    streams: int
    micro_batches_per_step: int
    micro_batch_size: int

    @property
    def grad_accum(self) -> int:
        """Forward and backward passes per rank and step (DeepSpeed's gradient accumulation)."""
        return -(-self.micro_batches_per_step // self.world_size)

    @property
    def uneven(self) -> bool:
        return self.micro_batches_per_step % self.world_size != 0

    def to_json(self) -> str:
        return json.dumps(asdict(self)) + "\n"

    @classmethod
    def from_json(cls, text: str) -> BatchLayout:
        return cls(**json.loads(text))


def splits_step_by_step(streams: int, per_step: int, world: int) -> bool:
    """Whether every step's micro-batches fall on `world` ranks one apart at most."""
    return streams % world == 0 or streams % per_step == 0


def default_streams(per_step: int, counts: range, loader_workers: int) -> int:
    """The fewest streams that give each of the most ranks one per loader worker and split step by
    step over every rank count in `counts` (at most the next multiple of `per_step`)."""
    least = counts[-1] * max(loader_workers, 1)
    return next(s for s in itertools.count(least) if all(splits_step_by_step(s, per_step, w) for w in counts))


def check_layout(stage: str, streams: int, per_step: int, world: int, loader_workers: int) -> None:
    """Refuses, naming the field and the fix, a layout that cannot run on `world` ranks."""
    readers = max(loader_workers, 1)
    if streams < world * readers:
        raise ValleyForgeError(
            f"stages.{stage}: {streams} data streams cannot feed {world} ranks of {readers} loader worker(s) "
            f"each (data.num_workers): set data.streams to at least {world * readers} or unset it, or run on "
            f"fewer ranks (cluster.num_workers); data.streams is fixed when a stage first starts"
        )
    if not splits_step_by_step(streams, per_step, world):
        raise ValleyForgeError(
            f"stages.{stage}: a global batch of {per_step} micro-batches from {streams} data streams does not "
            f"split step by step over {world} ranks: data.streams must be a multiple of {per_step} (the global "
            f"batch, grad_accum x the most ranks) or of the rank count; unset it to get the fewest that work "
            f"(both are fixed when a stage first starts: resume on a rank count that divides {streams})"
        )


def plan_layout(
    stage: str,
    world_size: int,
    streams: int | None,
    per_step: int,
    micro_batch_size: int,
    loader_workers: int,
    saved: BatchLayout | None,
) -> BatchLayout:
    """This run's layout on `world_size` ranks: the streams and global batch of the checkpoint it
    resumes (`saved`), else those given (`streams` None: the fewest for this rank count)."""
    if saved is None:
        streams = streams or default_streams(per_step, range(world_size, world_size + 1), loader_workers)
    elif saved.micro_batch_size != micro_batch_size:
        raise ValleyForgeError(
            f"data.micro_batch_size {micro_batch_size} differs from the {saved.micro_batch_size} of the "
            f"checkpoint stage {stage!r} resumes; resume with the same"
        )
    else:
        streams, per_step = saved.streams, saved.micro_batches_per_step
    check_layout(stage, streams, per_step, world_size, loader_workers)
    return BatchLayout(world_size, streams, per_step, micro_batch_size)


def describe_change(saved: BatchLayout, now: BatchLayout) -> str:
    """One line on a resume across rank counts."""
    uneven = (
        f" (a rank takes {now.grad_accum - 1} or {now.grad_accum} a step, and a pass at weight zero for a missing one)"
        if now.uneven
        else ""
    )
    return (
        f"resuming a checkpoint of {saved.world_size} rank(s) on {now.world_size}: grad_accum "
        f"{saved.grad_accum} -> {now.grad_accum} keeps the global batch of {now.micro_batches_per_step} "
        f"micro-batches x {now.micro_batch_size} samples{uneven}, {now.streams} data streams"
    )
