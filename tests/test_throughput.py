"""The MFU numerator: the documented FLOP formula agrees with torch's FLOP counter on the
model's own forward passes, and the step factors follow what trains."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from data_shards.write.synth import vocabulary
from trainer.blueprint import blueprint_from_config, build_model, fill_weights
from trainer.config import ModelConfig
from trainer.throughput import FlopCounter

pytestmark = pytest.mark.unit


def measured(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_formula_matches_torch_flop_counter(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(vocabulary()))
    cfg = ModelConfig(vision={"tiny": {}}, llm={"tiny": {}}, word_vocab=str(tmp_path / "vocab.txt"), num_frames=2)
    blueprint = blueprint_from_config(cfg)
    model = build_model(blueprint, "eager")  # attention as plain matmuls, which the counter sees
    fill_weights(model, blueprint, 0.02, seed=0)
    counter = FlopCounter(model, ["projector"])
    ids = torch.randint(5, 50, (3, 40))
    with torch.no_grad():
        llm = measured(lambda: model.llm(input_ids=ids))
        pixels = torch.randn(5, 3, 32, 32)
        vision = measured(lambda: model.vision(pixel_values=pixels))
    formula_llm = counter._forward(*counter.language, torch.full((3,), 40))
    formula_vision = counter._forward(*counter.vision, torch.full((5,), counter.frame_tokens))
    assert abs(formula_llm - llm) / llm < 0.01, (formula_llm, llm)
    assert abs(formula_vision - vision) / vision < 0.01, (formula_vision, vision)

    batch = {"lengths": torch.full((3,), 40), "frame_mask": torch.ones(1, 5, dtype=torch.bool)}
    assert counter.batch_flops(batch) == formula_vision + 2 * formula_llm  # frozen vision, projector trains
    assert FlopCounter(model, ["vision", "llm"]).batch_flops(batch) == 3 * formula_vision + 3 * formula_llm


def test_a_contrastive_stage_counts_the_text_tower_in_the_llms_place(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(vocabulary()))
    cfg = ModelConfig(
        vision={"tiny": {}},
        llm={"tiny": {}},
        word_vocab=str(tmp_path / "vocab.txt"),
        num_frames=2,
        contrastive={"embed_dim": 16, "temporal_layers": 1},
    )
    blueprint = blueprint_from_config(cfg)
    model = build_model(blueprint, "eager")
    fill_weights(model, blueprint, 0.02, seed=0)
    counter = FlopCounter(model, ["vision", "temporal", "text"], contrastive=True)
    ids = torch.randint(5, 50, (3, 12))
    with torch.no_grad():
        text = measured(lambda: model.text.transformer(input_ids=ids))
    formula_text = counter._forward(*counter.language, torch.full((3,), 12))
    assert abs(formula_text - text) / text < 0.02, (formula_text, text)
    labels = torch.full((3, 20), -100)
    labels[:, 4:16] = 7  # 12 caption tokens per sample
    batch = {"labels": labels, "lengths": torch.full((3,), 20), "frame_mask": torch.ones(1, 5, dtype=torch.bool)}
    formula_vision = counter._forward(*counter.vision, torch.full((5,), counter.frame_tokens))
    assert counter.batch_flops(batch) == 3 * formula_vision + 3 * formula_text


def test_a_packed_batch_counts_its_samples_not_its_rows():
    from data_shards.media import VisualSpec
    from data_shards.read.batching import collate
    from trainer.throughput import StepMeter

    visual_id = 3
    samples = [
        {
            "key": str(i),
            "input_ids": [visual_id] * 4 + [9] * (i + 2),
            "labels": [-100] * 4 + [9] * (i + 2),
            "pixels": None,
        }
        for i in range(6)
    ]
    batch = collate(
        samples, 0, VisualSpec(num_frames=1, image_size=1, tokens_per_video=0, tokens_per_image=0), pack_length=64
    )
    assert batch["input_ids"].shape[0] == 1  # all six in one row

    class NoFlops:
        def batch_flops(self, batch):
            return 0.0

    meter = StepMeter(NoFlops(), visual_id, None)
    meter.add(batch, 1.0, 0.0)
    metrics = meter.metrics(meter.local(), loss_parts=1, world=1, elapsed=2.0)
    assert metrics["train/samples_per_s"] == 3.0
    assert metrics["train/visual_tokens_per_sample"] == 4.0
    assert metrics["train/tokens_per_s"] == sum(len(s["input_ids"]) for s in samples) / 2.0
