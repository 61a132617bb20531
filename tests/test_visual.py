"""Reducers, projectors and the soft prompt: token counts agree with what the reader is told,
text-only samples stay finite, and every new part gets gradients."""

import pytest
import torch

from data_shards.conversation import IGNORE_INDEX
from data_shards.write.synth import vocabulary
from trainer.blueprint import blueprint_from_config, build_model, fill_weights
from trainer.config import ModelConfig, TokenReductionConfig
from trainer.token_reduction import token_reduction_for
from trainer.visual import KeepAllPatches, SpatialPool2x2, TemporalDifference, ValleyPooling

pytestmark = pytest.mark.unit


def tiny_model(tmp_path, **model_fields):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(vocabulary()))
    cfg = ModelConfig(
        vision={"tiny": {"image_size": 32, "patch_size": 8}},
        llm={"tiny": {}},
        word_vocab=str(vocab),
        num_frames=4,
        **model_fields,
    )
    blueprint = blueprint_from_config(cfg)
    model = build_model(blueprint, "sdpa")
    fill_weights(model, blueprint, 0.02, seed=0)
    return model, blueprint.tokenizer


def batch_for(model, tokenizer, kinds):
    """One sample per kind ("video", "image", "text"): visual slots, then a few labelled words."""
    spec = model.visual_spec()
    visual_id = tokenizer.convert_tokens_to_ids("<visual>")
    words = tokenizer("a red circle moving left .", add_special_tokens=False)["input_ids"]
    rows, frame_masks = [], []
    for kind in kinds:
        slots = {"video": spec.tokens_per_video, "image": spec.tokens_per_image, "text": 0}[kind]
        rows.append([visual_id] * slots + words)
        frame_masks.append(
            [kind == "video"] * spec.num_frames if kind != "image" else [True] + [False] * (spec.num_frames - 1)
        )
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    attention = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)], attention[i, : len(row)] = torch.tensor(row), 1
    labels = torch.where((input_ids != visual_id) & (attention == 1), input_ids, IGNORE_INDEX)
    size = spec.image_size
    frames = torch.randint(0, 256, (len(rows), spec.num_frames, 3, size, size), dtype=torch.uint8)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "frames": frames,
        "frame_mask": torch.tensor(frame_masks),
        "labels": labels,
    }


def test_reducer_token_counts():
    features = torch.randn(2, 4, 1 + 16, 8)  # 4 frames of a 4x4 patch grid
    mask = torch.tensor([[True] * 4, [True, False, False, False]])
    for reducer, per_video, per_image in (
        (KeepAllPatches(), 64, 16),
        (ValleyPooling(), 20, 17),
        (SpatialPool2x2(), 16, 4),
        (TemporalDifference(), 32, 32),
    ):
        tokens, valid = reducer(features, mask)
        assert tokens.shape[1] == valid.shape[1] and valid.sum(1).tolist() == [per_video, per_image]
        assert reducer.num_tokens(16, 4) == per_video and reducer.num_tokens(16, 1) == per_image
    tokens, _ = SpatialPool2x2()(features, mask)
    assert torch.allclose(tokens[0, 0], features[0, 0, 1:].reshape(4, 4, 8)[:2, :2].mean((0, 1)), atol=1e-6)
    tokens, _ = TemporalDifference()(features, mask)
    patches = features[:, :, 1:]
    assert torch.allclose(tokens[0, 16:], patches[0, 2:].mean(0) - patches[0, :2].mean(0), atol=1e-6)
    assert torch.allclose(tokens[1, :16], patches[1, 0], atol=1e-6) and tokens[1, 16:].abs().max() == 0


@pytest.mark.parametrize(
    "fields",
    [
        {"reducer": "none", "projector": "linear"},
        {"reducer": "spatial_pool2", "projector": "mlp2x_gelu"},
        {"reducer": "valley", "projector": "abstractor", "abstractor_queries": 6},
        {"reducer": "valley", "projector": "linear", "soft_prompt_tokens": 2},
        {"reducer": "temporal_diff", "projector": "linear"},
    ],
    ids=lambda f: "-".join(str(v) for v in f.values()),
)
def test_variants_train_on_mixed_batches(tmp_path, fields):
    model, tokenizer = tiny_model(tmp_path, **fields)
    batch = batch_for(model, tokenizer, ["video", "image", "text"])
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.projector.parameters())
    if model.soft_prompt is not None:
        assert model.soft_prompt.embeddings.grad.abs().sum() > 0
        assert out.logits.shape[1] == batch["input_ids"].shape[1] + fields["soft_prompt_tokens"]
    if fields["projector"] == "abstractor":
        assert model.visual_spec().tokens_per_video == model.visual_spec().tokens_per_image == 6


@pytest.mark.parametrize(
    "reduction, patches",
    [
        ({"mode": "random", "keep": 0.5}, 8),
        ({"mode": "grid", "keep": 0.25}, 4),
        ({"mode": "block", "keep": 0.25}, 4),
        ({"mode": "resize", "image_size": 16}, 4),
    ],
    ids=lambda r: r["mode"] if isinstance(r, dict) else str(r),
)
def test_clipa_token_reduction(tmp_path, reduction, patches):
    model, tokenizer = tiny_model(tmp_path, reducer="none")
    model.token_reduction = token_reduction_for(model, TokenReductionConfig(**reduction))
    spec = model.visual_spec()
    assert spec.tokens_per_video == 4 * patches and spec.tokens_per_image == patches
    assert spec.image_size == (16 if reduction["mode"] == "resize" else 32)
    out = model(**batch_for(model, tokenizer, ["video", "image", "text"]))
    assert torch.isfinite(out.loss)
    if model.token_reduction.masks:
        kept = model.token_reduction.kept_indices(64, "cpu")
        assert kept.shape == (64, patches) and (kept.diff(dim=1) > 0).all() and kept.max() < 16
        if reduction["mode"] != "random":  # a square: rows and columns evenly spread
            rows, cols = kept // 4, kept % 4
            assert (rows.view(64, 2, 2)[:, :, 0].diff(dim=1) >= 1).all() and (
                cols.view(64, 2, 2)[:, 0].diff(dim=1) >= 1
            ).all()
    model.token_reduction = None
    assert model.visual_spec().tokens_per_video == 4 * 16  # a later stage sees every patch again


def test_only_real_frames_go_through_the_vision_tower(tmp_path):
    """A video (4 frames), an image and a text-only sample: the tower sees 5 frames, not 12; a
    text-only batch still runs it on one frame (ZeRO-3's collectives), which joins the loss at
    weight zero; each sample's logits are those it gets alone."""
    model, tokenizer = tiny_model(tmp_path, reducer="valley")
    seen = []
    model.vision.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    mixed = batch_for(model, tokenizer, ["video", "image", "text"])
    with torch.no_grad():
        together = model(**mixed).logits
    assert seen == [5]
    for i in range(3):  # the video, the image, the text-only sample
        alone = {key: value[i : i + 1] for key, value in mixed.items()}
        length = int(alone["attention_mask"].sum())
        alone = {
            key: value[:, :length] if key in ("input_ids", "attention_mask", "labels") else value
            for key, value in alone.items()
        }
        with torch.no_grad():
            logits = model(**alone).logits
        torch.testing.assert_close(logits[0], together[i, :length], atol=1e-5, rtol=1e-5)
    model(**batch_for(model, tokenizer, ["video"])).loss.backward()
    used = {name for name, p in model.vision.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    seen.clear()
    model(**batch_for(model, tokenizer, ["text", "text"])).loss.backward()
    assert seen == [1]
    grads = {name: p.grad for name, p in model.vision.named_parameters()}
    assert used and {name for name, grad in grads.items() if grad is not None} == used  # in the graph...
    assert all(float(grads[name].abs().sum()) == 0.0 for name in used)  # ... at weight zero
