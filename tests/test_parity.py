"""The distributed machinery changes nothing about the maths: the first steps of a ZeRO-3 run
on 2 ranks under Ray give the losses of a plain single-process PyTorch loop over the same global
batches (no DeepSpeed, no Ray), within fp32 tolerance."""
import json
from functools import partial
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR

from data_shards.config import ReaderConfig
from data_shards.conversation import get_template
from data_shards.reader import Topology, build_loader
from trainer.build import build_model, fill_weights, plan_from_config
from trainer.config import EngineConfig, ModelConfig, StageConfig
from trainer.loop import MODEL_INPUTS
from trainer.schedule import warmup_cosine
from trainer.stage import StageJob, prepare_stage
from trainer.trainable import apply_training_plan
from two_ranks import fit_on_two_ranks, worker_topology

STEPS = 6


def zero3_worker(config):
    from trainer.loop import train

    topology = worker_topology()
    rank = topology.rank
    stage = prepare_stage(config["job"], topology)
    losses = []
    train(stage.engine, stage.train_batches, STEPS, 1, lambda m, s: losses.append(m["train/loss"]), None, 0,
          stage.health, stage.meter)
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(losses))


def plain_losses(job: StageJob) -> list[float]:
    """The same model, data and optimizer in one process: each step averages the two ranks' losses."""
    torch.manual_seed(job.seed)
    plan = plan_from_config(job.model)
    model = build_model(plan, job.model.attn_implementation)
    fill_weights(model, plan, job.model.init_std, job.seed)
    groups = apply_training_plan(model, job.stage)
    params = [p for group in groups for p in group["params"]]
    opt = job.stage.optimizer
    optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
    scheduler = LambdaLR(optimizer, partial(warmup_cosine, total_steps=job.stage.steps,
                                            warmup_steps=job.stage.schedule.warmup_steps,
                                            min_lr_ratio=job.stage.schedule.min_lr_ratio))
    visual = model.visual_spec()
    loaders = [build_loader(job.stage.train_data, job.data, plan.tokenizer, get_template(job.stage.template), visual,
                            Topology(rank, 2), train=True) for rank in range(2)]
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        batches = [next(loader) for loader in loaders]
        rank_losses = [model(**{k: batch[k] for k in MODEL_INPUTS}).loss for batch in batches]
        loss = sum(rank_losses) / 2
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, job.stage.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss))
    return losses


def test_zero3_on_two_ranks_matches_a_plain_pytorch_loop(ray_local, synth_data, tmp_path):
    job = StageJob(
        model=ModelConfig(vision={"tiny": {}}, llm={"tiny": {}}, word_vocab=str(synth_data / "vocab.txt"),
                          num_frames=4, attn_implementation="sdpa"),
        engine=EngineConfig(zero_stage=3, param_persistence_threshold=0),
        data=ReaderConfig(micro_batch_size=4, num_workers=1, max_length=256, shuffle_buffer=16),
        stage=StageConfig(name="instruct", train_data=str(synth_data / "instruct" / "train"), template="vicuna_v1",
                          trainable=["projector", "llm"], steps=STEPS, optimizer={"lr": 3e-3},
                          schedule={"warmup_steps": 2}, max_grad_norm=0.5),
        init_export=None, export_dir=str(tmp_path / "export"), checkpoint_dir=str(tmp_path / "ckpt"), seed=0)
    fit_on_two_ranks(zero3_worker, {"job": job, "out": str(tmp_path)}, tmp_path / "ray")
    distributed = json.loads((tmp_path / "rank0.json").read_text())
    torch.set_num_threads(1)
    reference = plain_losses(job)
    assert len(distributed) == len(reference) == STEPS
    for step, (d, r) in enumerate(zip(distributed, reference), 1):
        assert abs(d - r) <= 1e-4 * max(1.0, abs(r)), (step, distributed, reference)
    assert reference[-1] < reference[0]  # it trained: the comparison is not between two constants
