"""One stage inside one worker: the engine (built from the blueprint), the stage's data streams,
the checkpointer and the step meter, and the step loop that trains them."""

from __future__ import annotations

import time
import zlib
from pathlib import Path
from typing import Callable, Iterator

import torch

from data_shards.conversation import get_template
from data_shards.errors import ValleyForgeError
from data_shards.read.health import ReadHealth
from data_shards.read.reader import Topology, build_loader, micro_batches_of
from trainer.blueprint import blueprint_from_config, blueprint_from_export
from trainer.checkpoint import (
    Checkpointer,
    CheckpointRecord,
    Part,
    best_tag,
    complete_tags,
    find_resume_point,
    tag_name,
)
from trainer.contrastive import retrieval_metrics
from trainer.engine import build_engine, uses_bf16
from trainer.evaluation import sharded_attribute_accuracy
from trainer.export import export_model, write_blueprint
from trainer.interruption import Action, InterruptionPolicy, Notice, wait_to_be_restarted
from trainer.job import StageJob
from trainer.layout import plan_layout
from trainer.metric_log import MetricLog, Send, as_metric_log
from trainer.model import model_inputs, supervised_tokens
from trainer.ranks import from_rank0, gather, rank, sum_across_ranks, world_size
from trainer.resumable import ReaderPosition, TorchRNG
from trainer.storage import Storage
from trainer.system_metrics import SystemSampler, system_metrics
from trainer.throughput import FlopCounter, StepMeter, peak_flops


class StageRunner:
    """Builds everything one worker needs for `job.stage` on creation; `train` runs the steps
    (from the newest checkpoint when the stage resumes), `export` writes the weights.

    `init_folder` is the local export folder the stage starts from (the job's `init_from`,
    fetched); None builds the model from `job.model`. `on_checkpoint` gets rank 0's record of
    each checkpoint saved.
    """

    def __init__(
        self,
        job: StageJob,
        topology: Topology,
        init_folder: str | Path | None = None,
        on_checkpoint: Callable[[CheckpointRecord], None] | None = None,
    ):
        self.job = job
        torch.manual_seed(job.seed)
        storage = Storage(job.checkpoint_dir)
        self.resume_point = find_resume_point(storage, job.resume_checkpoint_url) if job.stage.resume else None
        self.layout = plan_layout(
            job.stage.name,
            topology.world_size,
            job.data.streams,
            job.micro_batches_per_step or job.stage.grad_accum * topology.world_size,
            job.data.micro_batch_size,
            job.data.num_workers,
            self.resume_point and self.resume_point.layout,
        )
        blueprint = blueprint_from_export(init_folder) if init_folder else blueprint_from_config(job.model)
        self.engine, self.trainable_table = build_engine(job, blueprint, self.layout.grad_accum)
        self.model = self.engine.module
        self.tokenizer = blueprint.tokenizer
        self.contrastive = job.stage.objective == "contrastive"
        visual, template = self.model.visual_spec(self.contrastive), get_template(job.stage.template)
        self.train_batches = build_loader(
            job.train_shards,
            job.data,
            self.tokenizer,
            template,
            visual,
            topology,
            train=True,
            num_streams=self.layout.streams,
        )
        self.eval_batches = (
            iter(build_loader(job.eval_shards, job.data, self.tokenizer, template, visual, topology, train=False))
            if job.eval_shards
            else None
        )
        self.health = ReadHealth(job.data.max_skip_fraction, job.data.skip_check_min_samples)
        # what a checkpoint keeps besides the engine (train adds the metric log it is given)
        parts = {
            "reader": Part(ReaderPosition(self.train_batches)),
            "read_health": Part(self.health),
            "torch_rng": Part(TorchRNG()),
        }
        self.checkpointer = Checkpointer(
            storage,
            job.stage.checkpoint_every,
            self.engine,
            parts,
            self.layout,
            keep_best=job.stage.register == "best",
            on_saved=on_checkpoint,
            write_model_files=lambda folder: write_blueprint(self.model, self.tokenizer, folder, job.stage.template),
        )
        self.interruptions = InterruptionPolicy()
        self.stopped_at: int | None = None  # the step a stop request ended training at
        self.system = SystemSampler()
        self.meter = StepMeter(
            FlopCounter(self.model, job.stage.trainable, self.contrastive),
            self.model.arch.visual_token_id,
            peak_flops(job.peak_flops_per_device, uses_bf16(job.engine)),
        )

    def train(
        self, log: MetricLog | Send, batches: Iterator[dict] | None = None, notices: Callable[[], Notice] | None = None
    ) -> dict:
        """Optimizer steps up to `stage.steps`, from the checkpoint the stage resumes; returns the
        last step's metrics. Each step is this rank's share of the global batch (trainer/layout.py)
        from the stage's reader or `batches` (an iterator of this rank's micro-batches; with a
        `peek()` where a rank may have none in a step), and a pass at weight zero where the share is
        one short. Every rank sees the same read health and stops together.

        `notices`, called on every rank after each step, says whether the run is being stopped or
        a node preempted (trainer/interruption.py); a stop ends training early, at `stopped_at`."""
        stage = self.job.stage
        batches = batches if batches is not None else self.train_batches
        log = as_metric_log(log)
        self.checkpointer.parts["metric_log"] = Part(log, own_stage_only=True)
        start = self.checkpointer.restore(self.resume_point)
        self.engine.train()
        metrics: dict = {}
        scores: dict = {}  # what each checkpoint is recorded with: this step's train loss, the latest eval loss
        for step in range(start + 1, stage.steps + 1):
            started = time.perf_counter()
            self.meter.begin()
            indices = self._share(step)
            micro_batches = self._fetch(batches, len(indices))
            objective = self._objective([batch for batch, _ in micro_batches])
            for batch, data_wait in micro_batches:
                output = self.engine(**model_inputs(batch, self.engine.device), **objective)
                self.engine.backward(output.loss)
                self.engine.step()
                self.meter.add(batch, float(output.loss.detach()), data_wait)
            if len(micro_batches) < self.layout.grad_accum:  # one short: a pass at weight zero
                filler = micro_batches[0][0] if micro_batches else batches.peek()
                output = self.engine(**model_inputs(filler, self.engine.device), **objective)
                self.engine.backward(output.loss * 0.0)
                self.engine.step()
            metrics = self._step_metrics(micro_batches, indices, time.perf_counter() - started)
            if self.contrastive:
                metrics["train/logit_scale"] = float(output.logit_scale)
            last = step == stage.steps
            checkpoint = self.checkpointer.due(step, last)
            evaluate = bool(stage.eval_every and step % stage.eval_every == 0) or last
            if self.eval_batches and (evaluate or (checkpoint and stage.register == "best")):
                metrics.update(self.heldout_retrieval() if self.contrastive else {"eval/loss": self.heldout_loss()})
            if self.job.probe_shards and evaluate:
                metrics.update(self.probe_accuracy())
            log(metrics, step)
            self.health.check()
            scores = {**scores, **{k: metrics[k] for k in ("train/loss", "eval/loss") if k in metrics}}
            self.checkpointer.poll()  # a save whose uploads have all ended is marked complete
            action = self._interrupted(notices(), time.perf_counter() - started) if notices else Action()
            if checkpoint or action.save:  # the last step's and an interruption's: complete before going on
                self.checkpointer.save(step, scores, action.why if action.save else "", wait=last or action.save)
            if last:  # done: a stop or a preemption notice changes nothing now
                break
            if action.then == "stop":
                self.stopped_at = step
                break
            if action.then == "wait":
                print(f"step {step} saved ({action.why}): waiting for Ray Train to restart the workers", flush=True)
                wait_to_be_restarted(action.deadline)
        return metrics

    def _interrupted(self, notice: Notice, step_s: float) -> Action:
        """Rank 0's decision on the notice, on every rank."""
        decision = self.interruptions.decide(notice, step_s, self.checkpointer.save_s) if rank() == 0 else None
        return from_rank0(decision)

    def _share(self, step: int) -> list[int]:
        """Which of the stage's micro-batches this rank trains on in `step`."""
        per_step = self.layout.micro_batches_per_step
        return micro_batches_of(rank(), world_size(), self.layout.streams, (step - 1) * per_step, per_step)

    def _fetch(self, batches: Iterator[dict], count: int) -> list[tuple[dict, float]]:
        """This rank's `count` micro-batches of a step, each with the seconds waited for it."""
        fetched = []
        for _ in range(count):
            begin = time.perf_counter()
            batch = next(batches)
            fetched.append((batch, time.perf_counter() - begin))
        return fetched

    def _objective(self, micro_batches: list[dict]) -> dict:
        """What the model's forward is told besides the batch, for this step's micro-batches."""
        if self.contrastive:
            return {"contrastive": True}
        return {"num_items_in_batch": self._token_share(micro_batches)}

    def _token_share(self, micro_batches: list[dict]) -> float:
        """What each micro-batch's summed token losses are divided by, so that a step's gradient is
        that of the mean over every supervised token of the global batch, whichever rank and
        micro-batch holds it: DeepSpeed divides each micro-batch's loss by grad_accum and ZeRO
        averages gradients over the ranks, so the global count over ranks x grad_accum (a pass
        at weight zero adds nothing). The logged train/loss, the micro-batch losses summed over
        ranks x grad_accum, is then that token mean too."""
        (total,) = sum_across_ranks([sum(supervised_tokens(batch) for batch in micro_batches)])
        return total / (world_size() * self.layout.grad_accum)

    def _step_metrics(self, micro_batches: list[tuple[dict, float]], indices: list[int], elapsed: float) -> dict:
        step_reads = ReadHealth()
        for batch, _ in micro_batches:
            step_reads.add_batch(batch)
        step_keys = dict(zip(indices, (batch["keys"] for batch, _ in micro_batches)))
        keys_by_index, system_samples = {}, []
        for seen, by_reason, by_shard, keys, system in gather(
            (step_reads.seen, dict(step_reads.by_reason), dict(step_reads.by_shard), step_keys, self.system.sample())
        ):
            self.health.add(seen, by_reason, by_shard)
            keys_by_index.update(keys)
            system_samples.append(system)
        # what the logged loss is the mean of: the token mean's parts (_token_share), or the micro-batches' losses
        loss_parts = self.layout.micro_batches_per_step if self.contrastive else world_size() * self.layout.grad_accum
        return {
            **system_metrics(system_samples),
            **self.meter.metrics(sum_across_ranks(self.meter.local()), loss_parts, world_size(), elapsed),
            "train/lr": self.engine.get_lr()[0],
            "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            **self.health.metrics(),
            "data/batch_digest": batch_digest([keys_by_index[j] for j in sorted(keys_by_index)]),
        }

    def heldout_loss(self) -> float:
        """The mean loss over every supervised token of `eval_batches` held-out batches per rank."""
        self.engine.eval()
        summed, tokens = 0.0, 0
        with torch.no_grad():
            for _ in range(self.job.stage.eval_batches):
                batch = next(self.eval_batches)
                # num_items_in_batch 1: the batch's summed token losses
                summed += float(self.engine(**model_inputs(batch, self.engine.device), num_items_in_batch=1.0).loss)
                tokens += supervised_tokens(batch)
        self.engine.train()
        summed, tokens = sum_across_ranks([summed, tokens])
        return summed / tokens

    def heldout_retrieval(self) -> dict:
        """Retrieval metrics (and eval/loss) over every rank's `eval_batches` held-out batches."""
        self.engine.eval()
        videos, texts = [], []
        with torch.no_grad():
            for _ in range(self.job.stage.eval_batches):
                output = self.engine(**model_inputs(next(self.eval_batches), self.engine.device), contrastive=True)
                videos.append(output.video_embeds.float().cpu())
                texts.append(output.text_embeds.float().cpu())
        self.engine.train()
        video, text = zip(*gather((torch.cat(videos), torch.cat(texts))))
        return retrieval_metrics(torch.cat(video), torch.cat(text), float(output.logit_scale))

    def probe_accuracy(self) -> dict:
        """`eval/attribute_accuracy/*` by generation on the stage's probe clips, each rank asking
        about its share."""
        probe = self.job.stage.probe_eval
        metrics = sharded_attribute_accuracy(
            self.model,
            self.tokenizer,
            self.job.probe_shards.shards[0],
            self.job.stage.template,
            probe.max_new_tokens,
            probe.max_clips,
            rank(),
            world_size(),
        )
        self.engine.train()
        return metrics

    def export(self) -> tuple[Storage | None, dict]:
        """Gather the weights and write the export to `job.export_dir`: the last step's, or with
        `register: best` those of the checkpoint with the lowest eval/loss. Returns the export's
        storage on rank 0 (None elsewhere) and what was chosen."""
        chosen = {"step": self.job.stage.steps, "selected_by": "last step"}
        if self.checkpointer.every:  # saved after the last step too
            chosen["checkpoint"] = self.checkpointer.storage.child(tag_name(self.job.stage.steps)).url
        if self.job.stage.register == "best":
            marks = complete_tags(self.checkpointer.storage) if rank() == 0 else {}
            best = best_tag(marks)
            best, mark = from_rank0((best, marks[best] if best else None))
            if best is None:
                raise ValleyForgeError(
                    f"stages.{self.job.stage.name}.register: best, but no checkpoint in "
                    f"{self.job.checkpoint_dir} has an eval/loss"
                )
            self.checkpointer.load_weights(best)
            chosen = {
                **mark,
                "selected_by": "lowest eval/loss",
                "checkpoint": self.checkpointer.storage.child(best).url,
            }
        export = export_model(self.model, self.tokenizer, Storage(self.job.export_dir), self.job.stage.template)
        return export, chosen


def batch_digest(keys_in_order: list[list[str]]) -> float:
    """A 24-bit CRC of the step's sample keys, micro-batch by micro-batch in the stage's order: two
    runs that trained a step on the same micro-batches log the same number (exact as a float), on
    any number of ranks."""
    return float(zlib.crc32("\n".join("\t".join(keys) for keys in keys_in_order).encode()) & 0xFFFFFF)
