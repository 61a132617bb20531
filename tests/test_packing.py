"""Sequence packing: several samples per row, positions restarting per sample, attention kept
inside each sample; the loss and every gradient equal those of the padded batch."""

import pytest
import torch

from data_shards.config import ReaderConfig
from data_shards.conversation import get_template
from data_shards.read.batching import collate, pack_rows
from data_shards.read.reader import Topology, build_loader
from trainer.blueprint import blueprint_from_config, build_model, fill_weights
from trainer.config import ModelConfig
from trainer.model import model_inputs

pytestmark = pytest.mark.unit


def test_rows_as_few_as_first_fit_decreasing_and_even():
    # first-fit decreasing needs 3 rows (400+100, 300+200, 50): filled evenly, the longest holds 400, not 500
    assert pack_rows([100, 300, 200, 50, 400], 512) == [[4], [1, 3], [2, 0]]
    assert pack_rows([600, 10], 512) == [[1], [0]]  # too long for a row: a row of its own


def test_packed_loss_and_gradients_equal_padded(synth_data):
    blueprint = blueprint_from_config(
        ModelConfig(vision={"tiny": {}}, llm={"tiny": {}}, word_vocab=str(synth_data / "vocab.txt"), num_frames=4)
    )
    model = build_model(blueprint, "sdpa")
    fill_weights(model, blueprint, 0.02, seed=0)
    model.vision.requires_grad_(False)
    results = []
    for packing in (False, True):
        cfg = ReaderConfig(micro_batch_size=12, num_workers=0, shuffle_buffer=32, max_length=256, packing=packing)
        batch = next(
            build_loader(
                str(synth_data / "instruct" / "train"),
                cfg,
                blueprint.tokenizer,
                get_template("vicuna_v1"),
                model.visual_spec(),
                Topology(),
                train=True,
            )
        )
        model.zero_grad()
        loss = model(**model_inputs(batch)).loss
        loss.backward()
        results.append(
            (batch, float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    (padded, padded_loss, padded_grads), (packed, packed_loss, packed_grads) = results
    assert sorted(padded["keys"]) == sorted(packed["keys"])
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # fewer rows: samples share them
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())
    assert abs(packed_loss - padded_loss) < 1e-5, (packed_loss, padded_loss)
    assert packed_grads.keys() == padded_grads.keys() and packed_grads
    for name, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-6, rtol=1e-4), name


def test_each_sample_of_a_packed_row_is_attended_alone(synth_data):
    """The LLM's SDPA runs over each sample's span of a packed row, not over the whole row under
    a block-diagonal mask; a padded batch keeps transformers' masked SDPA."""
    blueprint = blueprint_from_config(
        ModelConfig(vision={"tiny": {}}, llm={"tiny": {}}, word_vocab=str(synth_data / "vocab.txt"), num_frames=4)
    )
    model = build_model(blueprint, "sdpa")
    fill_weights(model, blueprint, 0.02, seed=0)
    samples = [
        {"key": str(n), "input_ids": list(range(4, 4 + n)), "labels": list(range(4, 4 + n)), "pixels": None}
        for n in (5, 9, 3)
    ]
    layers = model.llm.config.num_hidden_layers

    def attended_lengths(batch: dict) -> list[int]:
        inputs = {k: batch[k] for k in ("input_ids", "position_ids") if k in batch}
        if "position_ids" not in batch:
            inputs["attention_mask"] = batch["attention_mask"]
        with torch.profiler.profile(record_shapes=True) as profile, torch.no_grad():
            model.llm(**inputs)
        return sorted(
            event.input_shapes[0][2] for event in profile.events() if event.name == "aten::scaled_dot_product_attention"
        )

    packed = collate(samples, blueprint.tokenizer.pad_token_id, model.visual_spec(), pack_length=20)
    assert packed["input_ids"].shape == (1, 17)  # one row holds all three
    assert attended_lengths(packed) == sorted([5, 9, 3] * layers)
    padded = collate(samples, blueprint.tokenizer.pad_token_id, model.visual_spec())
    assert attended_lengths(padded) == [9] * layers
