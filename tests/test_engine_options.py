"""Engine options change how, not what: gradient checkpointing gives the same loss and gradients;
ZeRO-3 with the optimizer state offloaded to CPU trains on 2 ranks."""

import json

import pytest
import torch
from two_ranks import fit_on_ranks, losses_worker, tiny_job

from data_shards.config import ReaderConfig
from data_shards.conversation import get_template
from data_shards.read.reader import Topology, build_loader
from trainer.blueprint import blueprint_from_config, build_model, fill_weights
from trainer.config import ModelConfig
from trainer.model import model_inputs


@pytest.mark.unit
def test_gradient_checkpointing_keeps_loss_and_gradients(synth_data):
    blueprint = blueprint_from_config(
        ModelConfig(
            vision={"tiny": {}},
            llm={"tiny": {}},
            word_vocab=str(synth_data / "vocab.txt"),
            num_frames=2,
            vision_feature_layer=-1,
        )
    )
    cfg = ReaderConfig(micro_batch_size=6, num_workers=0, shuffle_buffer=1, max_length=256)
    results = []
    for checkpointing in (False, True):
        model = build_model(blueprint, "sdpa")
        fill_weights(model, blueprint, 0.02, seed=0)
        model.train()
        if checkpointing:
            for part in (model.llm, model.vision):
                part.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        batch = next(
            build_loader(
                str(synth_data / "instruct" / "train"),
                cfg,
                blueprint.tokenizer,
                get_template("vicuna_v1"),
                model.visual_spec(),
                Topology(),
                train=False,
            )
        )
        loss = model(**model_inputs(batch)).loss
        loss.backward()
        results.append((float(loss), {n: p.grad for n, p in model.named_parameters()}))
    (plain_loss, plain_grads), (ckpt_loss, ckpt_grads) = results
    assert abs(plain_loss - ckpt_loss) < 1e-6
    assert [n for n, g in plain_grads.items() if g is None] == [n for n, g in ckpt_grads.items() if g is None]
    for name, grad in plain_grads.items():
        if grad is not None:
            assert torch.allclose(grad, ckpt_grads[name], atol=1e-6), name


@pytest.mark.ray
def test_zero3_with_optimizer_offload_and_checkpointing_trains(ray_local, synth_data, tmp_path):
    job = tiny_job(
        synth_data,
        tmp_path,
        num_frames=2,
        engine={"offload_optimizer": True, "gradient_checkpointing": ["llm"]},
        stage={"name": "instruct", "trainable": ["projector", "llm"], "steps": 6, "optimizer": {"lr": 3e-3}},
        data={"micro_batch_size": 4, "num_workers": 0, "max_length": 256, "shuffle_buffer": 1},
    )
    fit_on_ranks(losses_worker, {"job": job, "out": str(tmp_path)}, tmp_path / "ray")
    losses = json.loads((tmp_path / "rank0.json").read_text())
    assert len(losses) == 6 and losses[-1] < losses[0], losses
