"""The distributed machinery changes nothing about the maths: the first steps of a ZeRO-3 run
on 2 ranks under Ray give the losses of a plain single-process PyTorch loop over the same global
batches (no DeepSpeed, no Ray), within fp32 tolerance."""
import json
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

from data_shards.conversation import get_template
from data_shards.read.reader import Topology, build_loader
from trainer.blueprint import blueprint_from_config, build_model, fill_weights
from trainer.config import StageJob
from trainer.engine import warmup_cosine
from trainer.model import model_inputs
from trainer.trainable import set_trainable
from two_ranks import fit_on_ranks, losses_worker, tiny_job

STEPS = 6


def plain_losses(job: StageJob) -> list[float]:
    """The same model, data and optimizer in one process: each step averages the two ranks' losses."""
    torch.manual_seed(job.seed)
    blueprint = blueprint_from_config(job.model)
    model = build_model(blueprint, job.model.attn_implementation)
    fill_weights(model, blueprint, job.model.init_std, job.seed)
    groups = set_trainable(model, job.stage)
    params = [p for group in groups for p in group["params"]]
    opt = job.stage.optimizer
    optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
    scheduler = LambdaLR(optimizer, partial(warmup_cosine, total_steps=job.stage.steps,
                                            warmup_steps=job.stage.schedule.warmup_steps,
                                            min_lr_ratio=job.stage.schedule.min_lr_ratio))
    visual = model.visual_spec()
    loaders = [build_loader(job.stage.train_data, job.data, blueprint.tokenizer, get_template(job.stage.template), visual,
                            Topology(rank, 2), train=True) for rank in range(2)]
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        batches = [next(loader) for loader in loaders]
        rank_losses = [model(**model_inputs(batch)).loss for batch in batches]
        loss = sum(rank_losses) / 2
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, job.stage.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss))
    return losses


def test_zero3_on_two_ranks_matches_a_plain_pytorch_loop(ray_local, synth_data, tmp_path):
    job = tiny_job(synth_data, tmp_path, num_frames=4, attn_implementation="sdpa",
                   stage={"name": "instruct", "trainable": ["projector", "llm"], "steps": STEPS, "optimizer": {"lr": 3e-3},
                          "schedule": {"warmup_steps": 2}, "max_grad_norm": 0.5},
                   data={"micro_batch_size": 4, "num_workers": 1, "max_length": 256, "shuffle_buffer": 16})
    fit_on_ranks(losses_worker, {"job": job, "out": str(tmp_path)}, tmp_path / "ray")
    distributed = json.loads((tmp_path / "rank0.json").read_text())
    torch.set_num_threads(1)
    reference = plain_losses(job)
    assert len(distributed) == len(reference) == STEPS
    for step, (d, r) in enumerate(zip(distributed, reference), 1):
        assert abs(d - r) <= 1e-4 * max(1.0, abs(r)), (step, distributed, reference)
    assert reference[-1] < reference[0]  # it trained: the comparison is not between two constants
