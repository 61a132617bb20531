"""The distributed machinery changes nothing about the maths: ZeRO-3 on 2 ranks under Ray, each
rank accumulating 2 micro-batches per step, gives the losses of a plain single-process PyTorch loop
over the same global batches concatenated into one (no DeepSpeed, no Ray), within fp32 tolerance:
a global batch's loss is the mean over all its supervised tokens, whichever rank and micro-batch
holds them. The ranks' batches are made as unequal as the data allows (rank 0 gets the samples
with the fewest supervised tokens, rank 1 those with the most), where a mean of each rank's or
micro-batch's own token mean would weigh a one-word answer like a whole description.

A contrastive stage likewise: its loss is the InfoNCE of each accumulation round's micro-batches of
every rank concatenated (the ranks' embeddings gathered with their gradients), averaged over the
rounds; without the gradients through the gather the first step's loss would still agree and
every later one would not."""

import json
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from two_ranks import fit_on_ranks, tiny_job, worker_topology

from data_shards.conversation import IGNORE_INDEX, get_template
from data_shards.read.reader import Topology, build_loader
from trainer.blueprint import blueprint_from_config, build_model, fill_weights
from trainer.engine import warmup_cosine
from trainer.job import StageJob
from trainer.model import model_inputs, supervised_tokens
from trainer.stage import StageRunner
from trainer.trainable import set_trainable

pytestmark = pytest.mark.ray
STEPS, ACCUM, MICRO = 4, 2, 4
POOL = 256  # the synthetic instruct split


def concatenated(batches: list[dict], pad_id: int) -> dict:
    """One batch of the rows of `batches`, right-padded to the longest."""
    length = max(batch["input_ids"].shape[1] for batch in batches)

    def rows(name: str, fill: int) -> torch.Tensor:
        return torch.cat([F.pad(batch[name], (0, length - batch[name].shape[1]), value=fill) for batch in batches])

    return {
        "input_ids": rows("input_ids", pad_id),
        "labels": rows("labels", IGNORE_INDEX),
        "attention_mask": rows("attention_mask", 0),
        "frames": torch.cat([b["frames"] for b in batches]),
        "frame_mask": torch.cat([b["frame_mask"] for b in batches]),
        "lengths": torch.cat([b["lengths"] for b in batches]),
        "keys": [k for b in batches for k in b["keys"]],
        "seen": sum(b["seen"] for b in batches),
        "rejected": {},
        "rejected_by_shard": {},
    }


def unequal_micro_batches(job: StageJob, tokenizer, visual) -> list[list[dict]]:
    """Per rank, its micro-batches in training order: of the split's samples sorted by their
    supervised tokens, rank 0 gets the fewest, rank 1 the most."""
    single = build_loader(
        job.train_shards,
        job.data.model_copy(update={"micro_batch_size": 1}),
        tokenizer,
        get_template(job.stage.template),
        visual,
        Topology(),
        train=True,
    )
    samples = sorted((next(single) for _ in range(POOL)), key=supervised_tokens)
    needed = STEPS * ACCUM * MICRO
    return [
        [concatenated(share[start : start + MICRO], tokenizer.pad_token_id) for start in range(0, needed, MICRO)]
        for share in (samples[:needed], samples[-needed:])
    ]


def parity_worker(config) -> None:
    """Trains `config["job"]` on this rank's micro-batches; rank 0 writes the losses logged."""
    topology, losses = worker_topology(), []
    runner = StageRunner(config["job"], topology)
    runner.train(lambda metrics, step: losses.append(metrics["train/loss"]), iter(config["batches"][topology.rank]))
    if topology.rank == 0:
        Path(config["out"], "losses.json").write_text(json.dumps(losses))


def global_batch_loss(model, job: StageJob, per_rank: list[list[dict]], step: int, pad_id: int) -> torch.Tensor:
    """Step `step`'s loss in one process: the language-modelling loss of its micro-batches all in
    one batch; the contrastive loss of each accumulation round's micro-batches in one, averaged."""

    def rows(micro_batches):
        return model_inputs(concatenated(micro_batches, pad_id))

    rounds = [[rank[step * ACCUM + a] for rank in per_rank] for a in range(ACCUM)]
    if job.stage.objective == "contrastive":
        return sum(model(**rows(in_round), contrastive=True).loss for in_round in rounds) / ACCUM
    return model(**rows([micro for in_round in rounds for micro in in_round])).loss


def plain_losses(job: StageJob, per_rank: list[list[dict]]) -> tuple[list[float], float]:
    """The same model, data and optimizer in one process, each step on the global batch; and the
    untrained model's loss on the last step's batch."""
    torch.manual_seed(job.seed)
    blueprint = blueprint_from_config(job.model)
    model = build_model(blueprint, job.model.attn_implementation)
    fill_weights(model, blueprint, job.model.init_std, job.seed)
    groups = set_trainable(model, job.stage)
    params = [p for group in groups for p in group["params"]]
    opt = job.stage.optimizer
    optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
    scheduler = LambdaLR(
        optimizer,
        partial(
            warmup_cosine,
            total_steps=job.stage.steps,
            warmup_steps=job.stage.schedule.warmup_steps,
            min_lr_ratio=job.stage.schedule.min_lr_ratio,
        ),
    )
    with torch.no_grad():
        untrained = float(global_batch_loss(model, job, per_rank, STEPS - 1, blueprint.tokenizer.pad_token_id))
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = global_batch_loss(model, job, per_rank, step, blueprint.tokenizer.pad_token_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, job.stage.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss))
    return losses, untrained


OBJECTIVES = {
    "language_modeling": {"name": "instruct", "trainable": ["projector", "llm"], "optimizer": {"lr": 3e-3}},
    "contrastive": {
        "name": "contrastive",
        "objective": "contrastive",
        "trainable": ["vision", "temporal", "text"],
        "train_data": "captions",
        "template": "plain",
        "optimizer": {"lr": 3e-4},
    },
}


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_zero3_on_two_ranks_with_accumulation_matches_one_process_on_the_global_batch(
    ray_local, synth_data, tmp_path, objective
):
    stage = {
        **OBJECTIVES[objective],
        "steps": STEPS,
        "grad_accum": ACCUM,
        "schedule": {"warmup_steps": 2},
        "max_grad_norm": 0.5,
    }
    if "train_data" in stage:
        stage["train_data"] = str(synth_data / stage["train_data"] / "train")
    job = tiny_job(
        synth_data,
        tmp_path,
        num_frames=4,
        attn_implementation="sdpa",
        stage=stage,
        data={"micro_batch_size": MICRO, "num_workers": 1, "max_length": 256, "shuffle_buffer": 16},
        contrastive={"embed_dim": 32, "temporal_layers": 1} if objective == "contrastive" else None,
    )
    torch.set_num_threads(1)
    blueprint = blueprint_from_config(job.model)
    per_rank = unequal_micro_batches(
        job,
        blueprint.tokenizer,
        build_model(blueprint, job.model.attn_implementation).visual_spec(contrastive=objective == "contrastive"),
    )
    if objective == "language_modeling":  # the ranks' shares of the supervised tokens are far apart
        counts = [sum(supervised_tokens(batch) for batch in batches) for batches in per_rank]
        assert counts[1] > 3 * counts[0], counts
    fit_on_ranks(parity_worker, {"job": job, "batches": per_rank, "out": str(tmp_path)}, tmp_path / "ray")
    distributed = json.loads((tmp_path / "losses.json").read_text())
    reference, untrained = plain_losses(job, per_rank)
    assert len(distributed) == len(reference) == STEPS
    for step, (d, r) in enumerate(zip(distributed, reference), 1):
        assert abs(d - r) <= 1e-4 * max(1.0, abs(r)), (step, distributed, reference)
    assert reference[-1] < untrained  # it trained: the comparison is not between two constants
