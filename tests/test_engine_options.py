"""Engine options change how, not what: gradient checkpointing gives the same loss and gradients;
ZeRO-3 with the optimizer state offloaded to CPU trains on 2 ranks."""
import json
from pathlib import Path

import torch

from data_shards.config import ReaderConfig
from data_shards.conversation import get_template
from data_shards.reader import Topology, build_loader
from trainer.build import build_model, fill_weights, plan_from_config
from trainer.config import EngineConfig, ModelConfig, StageConfig
from trainer.loop import _to
from trainer.stage import StageJob, prepare_stage
from two_ranks import fit_on_two_ranks, worker_topology


def test_gradient_checkpointing_keeps_loss_and_gradients(synth_data):
    plan = plan_from_config(ModelConfig(vision={"tiny": {}}, llm={"tiny": {}}, word_vocab=str(synth_data / "vocab.txt"),
                                        num_frames=2, vision_feature_layer=-1))
    cfg = ReaderConfig(micro_batch_size=6, num_workers=0, shuffle_buffer=1, max_length=256)
    results = []
    for checkpointing in (False, True):
        model = build_model(plan, "sdpa")
        fill_weights(model, plan, 0.02, seed=0)
        model.train()
        if checkpointing:
            for part in (model.llm, model.vision):
                part.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        batch = next(build_loader(str(synth_data / "instruct" / "train"), cfg, plan.tokenizer,
                                  get_template("vicuna_v1"), model.visual_spec(), Topology(), train=False))
        loss = model(**_to(batch, "cpu")).loss
        loss.backward()
        results.append((float(loss), {n: p.grad for n, p in model.named_parameters()}))
    (plain_loss, plain_grads), (ckpt_loss, ckpt_grads) = results
    assert abs(plain_loss - ckpt_loss) < 1e-6
    assert [n for n, g in plain_grads.items() if g is None] == [n for n, g in ckpt_grads.items() if g is None]
    for name, grad in plain_grads.items():
        if grad is not None:
            assert torch.allclose(grad, ckpt_grads[name], atol=1e-6), name


def offload_worker(config):
    from trainer.loop import train

    topology = worker_topology()
    rank = topology.rank
    stage = prepare_stage(config["job"], topology)
    losses = []
    train(stage.engine, stage.train_batches, 6, 1, lambda m, s: losses.append(m["train/loss"]), None, 0,
          stage.health, stage.meter)
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(losses))


def test_zero3_with_optimizer_offload_and_checkpointing_trains(ray_local, synth_data, tmp_path):
    job = StageJob(
        model=ModelConfig(vision={"tiny": {}}, llm={"tiny": {}}, word_vocab=str(synth_data / "vocab.txt"), num_frames=2),
        engine=EngineConfig(zero_stage=3, param_persistence_threshold=0, offload_optimizer=True,
                            gradient_checkpointing=["llm"]),
        data=ReaderConfig(micro_batch_size=4, num_workers=0, max_length=256, shuffle_buffer=1),
        stage=StageConfig(name="instruct", train_data=str(synth_data / "instruct" / "train"), template="vicuna_v1",
                          trainable=["projector", "llm"], steps=6, optimizer={"lr": 3e-3}),
        init_export=None, export_dir=str(tmp_path / "export"), checkpoint_dir=str(tmp_path / "ckpt"), seed=0)
    fit_on_two_ranks(offload_worker, {"job": job, "out": str(tmp_path)}, tmp_path / "ray")
    losses = json.loads((tmp_path / "rank0.json").read_text())
    assert len(losses) == 6 and losses[-1] < losses[0], losses
