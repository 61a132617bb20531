"""Sequence packing: several samples per row, positions restarting per sample, attention kept
inside each sample; the loss and every gradient equal those of the padded batch."""
import torch

from data_shards.read.batching import pack_rows
from data_shards.config import ReaderConfig
from data_shards.conversation import get_template
from data_shards.read.reader import Topology, build_loader
from trainer.blueprint import build_model, fill_weights, blueprint_from_config
from trainer.config import ModelConfig
from trainer.model import model_inputs


def test_rows_as_few_as_first_fit_decreasing_and_even():
    # first-fit decreasing needs 3 rows (400+100, 300+200, 50): filled evenly, the longest holds 400, not 500
    assert pack_rows([100, 300, 200, 50, 400], 512) == [[4], [1, 3], [2, 0]]
    assert pack_rows([600, 10], 512) == [[1], [0]]  # too long for a row: a row of its own


def test_packed_loss_and_gradients_equal_padded(synth_data):
    blueprint = blueprint_from_config(ModelConfig(vision={"tiny": {}}, llm={"tiny": {}},
                                        word_vocab=str(synth_data / "vocab.txt"), num_frames=4))
    model = build_model(blueprint, "sdpa")
    fill_weights(model, blueprint, 0.02, seed=0)
    model.vision.requires_grad_(False)
    results = []
    for packing in (False, True):
        cfg = ReaderConfig(micro_batch_size=12, num_workers=0, shuffle_buffer=32, max_length=256, packing=packing)
        batch = next(build_loader(str(synth_data / "instruct" / "train"), cfg, blueprint.tokenizer,
                                  get_template("vicuna_v1"), model.visual_spec(), Topology(), train=True))
        model.zero_grad()
        loss = model(**model_inputs(batch)).loss
        loss.backward()
        results.append((batch, float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (padded, padded_loss, padded_grads), (packed, packed_loss, packed_grads) = results
    assert sorted(padded["keys"]) == sorted(packed["keys"])
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # fewer rows: samples share them
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())
    assert abs(packed_loss - padded_loss) < 1e-5, (packed_loss, padded_loss)
    assert packed_grads.keys() == padded_grads.keys() and packed_grads
    for name, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-6, rtol=1e-4), name
