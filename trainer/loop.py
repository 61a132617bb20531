"""The step loop: the same for every stage and recipe."""
from __future__ import annotations

import time
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from data_shards.health import ReadHealth
from trainer.throughput import StepMeter

MODEL_INPUTS = ("input_ids", "attention_mask", "frames", "frame_mask", "labels")


def _to(batch: dict, device) -> dict:
    """The model's inputs on its device (position_ids only in packed batches)."""
    return {k: batch[k].to(device, non_blocking=True) for k in (*MODEL_INPUTS, "position_ids") if k in batch}


def _sum_across_ranks(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def _gather_read_stats(stats: tuple) -> list[tuple]:
    """Every rank's (seen, rejected by reason, rejected by shard) of this step."""
    if not dist.is_initialized():
        return [stats]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, stats)
    return gathered


def evaluate(engine, batches: Iterator[dict], num_batches: int) -> float:
    """Mean loss over `num_batches` held-out batches per rank, averaged over ranks."""
    engine.eval()
    total = 0.0
    with torch.no_grad():
        for _ in range(num_batches):
            total += float(engine(**_to(next(batches), engine.device)).loss)
    engine.train()
    summed, = _sum_across_ranks([total / num_batches])
    return summed / (dist.get_world_size() if dist.is_initialized() else 1)


def train(engine, batches: Iterator[dict], steps: int, grad_accum: int, log: Callable[[dict, int], None],
          evaluate_fn: Callable[[], float] | None, eval_every: int, health: ReadHealth, meter: StepMeter,
          start_step: int = 0, checkpoint: Callable[[int], None] | None = None, checkpoint_every: int = 0) -> dict:
    """Run optimizer steps `start_step + 1 .. steps`, each of `grad_accum` micro-batches;
    returns the last metrics. Every rank sees the same read health and stops together."""
    engine.train()
    metrics: dict = {}
    for step in range(start_step + 1, steps + 1):
        started = time.perf_counter()
        meter.begin()
        step_reads = ReadHealth(health.max_skip_fraction, health.min_samples)
        for _ in range(grad_accum):
            fetch = time.perf_counter()
            batch = next(batches)
            data_wait = time.perf_counter() - fetch
            step_reads.add_batch(batch)
            loss = engine(**_to(batch, engine.device)).loss
            engine.backward(loss)
            engine.step()
            meter.add(batch, float(loss), data_wait)
        elapsed = time.perf_counter() - started
        for stats in _gather_read_stats((step_reads.seen, dict(step_reads.by_reason), dict(step_reads.by_shard))):
            health.add(*stats)
        world = dist.get_world_size() if dist.is_initialized() else 1
        metrics = {
            **meter.metrics(_sum_across_ranks(meter.local()), grad_accum, world, elapsed),
            "train/lr": engine.get_lr()[0],
            "train/grad_norm": float(engine.get_global_grad_norm() or 0.0),
            **health.metrics(),
        }
        if evaluate_fn and ((eval_every and step % eval_every == 0) or step == steps):
            metrics["eval/loss"] = evaluate_fn()
        log(metrics, step)
        health.check()
        if checkpoint and checkpoint_every and (step % checkpoint_every == 0 or step == steps):
            checkpoint(step)
    return metrics
