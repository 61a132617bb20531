"""Training steps on a MultiModal-GPT-like mix of samples: half text-only, a fifth images, the rest
8-frame videos (BENCHMARKS.md, "Only real frames").

Each micro-batch holds 16 samples (8 text-only, 3 images, 5 videos: 43 real frames of 128 frame
slots). The model: a CLIP tower of width 256 (6 layers, 112 px, patch 16: 49 patches), frozen; Valley
pooling, a linear projector, a 4-layer Llama of width 256 trained with the projector; SDPA, one
process. Printed: the frames the tower ran on per step and the median step time.

    python bench/bench_media_mix.py [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_shards.conversation import IGNORE_INDEX  # noqa: E402
from data_shards.read.batching import collate  # noqa: E402
from data_shards.write.synth import vocabulary  # noqa: E402
from trainer.blueprint import blueprint_from_config, build_model, fill_weights  # noqa: E402
from trainer.config import ModelConfig  # noqa: E402
from trainer.model import MODEL_INPUTS  # noqa: E402

MIX = ["text"] * 8 + ["image"] * 3 + ["video"] * 5


def model_and_tokenizer(work: Path):
    (work / "vocab.txt").write_text("\n".join(vocabulary()))
    cfg = ModelConfig(
        vision={
            "tiny": {
                "image_size": 112,
                "patch_size": 16,
                "hidden_size": 256,
                "intermediate_size": 1024,
                "num_layers": 6,
                "num_heads": 8,
            }
        },
        llm={
            "tiny": {"hidden_size": 256, "intermediate_size": 688, "num_layers": 4, "num_heads": 8, "num_kv_heads": 8}
        },
        word_vocab=str(work / "vocab.txt"),
        num_frames=8,
        reducer="valley",
        projector="linear",
    )
    blueprint = blueprint_from_config(cfg)
    model = build_model(blueprint, "sdpa")
    fill_weights(model, blueprint, 0.02, seed=0)
    return model, blueprint.tokenizer


def mixed_batch(model, tokenizer) -> dict:
    """The MIX as the reader would batch it (data_shards' collate): placeholder slots, then words."""
    spec = model.visual_spec()
    visual_id = tokenizer.convert_tokens_to_ids("<visual>")
    words = tokenizer("what colour is the shape ? it is red .", add_special_tokens=False)["input_ids"] * 4
    samples = []
    for i, kind in enumerate(MIX):
        slots = {"video": spec.tokens_per_video, "image": spec.tokens_per_image, "text": 0}[kind]
        frames = {"video": spec.num_frames, "image": 1, "text": 0}[kind]
        ids = [visual_id] * slots + words
        pixels = (
            torch.randint(0, 256, (frames, 3, spec.image_size, spec.image_size), dtype=torch.uint8) if frames else None
        )
        samples.append({"key": str(i), "input_ids": ids, "labels": [IGNORE_INDEX] * slots + words, "pixels": pixels})
    batch = collate(samples, tokenizer.pad_token_id, spec)
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/vf-media-mix"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    model, tokenizer = model_and_tokenizer(args.work)
    model.vision.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    frames_seen = []
    model.vision.register_forward_pre_hook(
        lambda module, args, kwargs: frames_seen.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    batch = mixed_batch(model, tokenizer)
    times = []
    for step in range(args.steps + 1):  # the first is a warm-up
        started = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step:
            times.append(time.perf_counter() - started)
    real = int(batch["frame_mask"].sum())
    print(
        f"{len(MIX)} samples per step ({MIX.count('text')} text-only, {MIX.count('image')} images, "
        f"{MIX.count('video')} videos): {real} real frames of {batch['frame_mask'].numel()} slots"
    )
    print(f"frames through the vision tower per step: {frames_seen[-1]}")
    print(f"median step: {statistics.median(times) * 1000:.0f} ms over {args.steps} steps")


if __name__ == "__main__":
    main()
