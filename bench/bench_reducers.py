"""Which visual token reducer keeps motion (BENCHMARKS.md, "Reducers").

For each reducer: the same tiny random model (frozen random CLIP 32x32 with 8x8 patches, 8
frames; a 2-layer Llama) trained from the same seed on the synthetic moving-shape
conversations for the same number of steps (projector + LLM, single process, plain PyTorch:
the same maths as the ZeRO-3 run, tests/test_parity.py), then asked each held-out clip's
colour, shape and direction by generation.

    python bench/bench_reducers.py --data runs/demo/data --steps 1200 [--reducers none valley ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_shards.config import ReaderConfig  # noqa: E402
from data_shards.conversation import get_template  # noqa: E402
from data_shards.manifest import read_manifest  # noqa: E402
from data_shards.read.reader import Topology, build_loader  # noqa: E402
from data_shards.write.synth import write_synthetic_dataset  # noqa: E402
from trainer.blueprint import blueprint_from_config, build_model, fill_weights  # noqa: E402
from trainer.config import ModelConfig  # noqa: E402
from trainer.contrastive import retrieval_metrics  # noqa: E402
from trainer.engine import warmup_cosine  # noqa: E402
from trainer.evaluation import attribute_accuracy  # noqa: E402
from trainer.model import model_inputs  # noqa: E402

REDUCERS = ("none", "valley", "spatial_pool2", "temporal_diff")
TOWERS = {"embed_dim": 64, "temporal_layers": 1}


def tiny_model(data: Path, reducer: str, seed: int, feature_layer: int):
    cfg = ModelConfig(
        vision={"tiny": {"image_size": 32, "patch_size": 8}},
        llm={"tiny": {}},
        word_vocab=str(data / "vocab.txt"),
        num_frames=8,
        reducer=reducer,
        vision_feature_layer=feature_layer,
        contrastive=TOWERS,
    )
    blueprint = blueprint_from_config(cfg)
    model = build_model(blueprint, "sdpa")
    fill_weights(model, blueprint, cfg.init_std, seed)
    return model, blueprint.tokenizer


def train(model, params: list, batches, steps: int, lr: float, what: str, **objective) -> None:
    """AdamW with warmup and cosine decay, gradients clipped at 1, on `steps` batches."""
    optimizer = torch.optim.AdamW(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps=steps, warmup_steps=20, min_lr_ratio=0.1)
    )
    started = time.perf_counter()
    for step in range(1, steps + 1):
        loss = model(**model_inputs(next(batches)), **objective).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 200 == 0:
            print(
                f"  {what} step {step}/{steps} loss {float(loss):.3f} ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )


def contrastive_tower(data: Path, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    """The vision tower's weights after `steps` contrastive steps on the captions (vision, temporal
    module and text tower trained), and its held-out retrieval."""
    torch.manual_seed(seed)
    model, tokenizer = tiny_model(data, "valley", seed, -2)
    model.requires_grad_(False)
    params = [p for part in (model.vision, model.temporal, model.text) for p in part.parameters()]
    for param in params:
        param.requires_grad_(True)

    def captions(split: str, train_mode: bool):
        reader = ReaderConfig(micro_batch_size=batch_size, num_workers=1, shuffle_buffer=256, max_length=64, seed=seed)
        return build_loader(
            str(data / "captions" / split),
            reader,
            tokenizer,
            get_template("plain"),
            model.visual_spec(contrastive=True),
            Topology(),
            train=train_mode,
        )

    train(model, params, captions("train", True), steps, lr, "contrastive", contrastive=True)
    model.eval()
    heldout, count = captions("heldout", False), read_manifest(data / "captions" / "heldout").num_samples
    with torch.no_grad():  # the held-out reader repeats: its first `count` pairs, each once
        outputs = [model(**model_inputs(next(heldout)), contrastive=True) for _ in range(-(-count // batch_size))]
    retrieval = retrieval_metrics(
        torch.cat([o.video_embeds for o in outputs])[:count],
        torch.cat([o.text_embeds for o in outputs])[:count],
        float(outputs[-1].logit_scale),
    )
    print(f"  contrastive tower after {steps} steps: {retrieval}", flush=True)
    return {k: v.detach().clone() for k, v in model.vision.state_dict().items()}


def run(
    reducer: str, data: Path, steps: int, batch_size: int, lr: float, seed: int, feature_layer: int, vision: dict | None
) -> dict:
    torch.manual_seed(seed)
    model, tokenizer = tiny_model(data, reducer, seed, feature_layer)
    if vision is not None:
        model.vision.load_state_dict(vision)
    model.vision.requires_grad_(False)
    model.temporal.requires_grad_(False)
    model.text.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    reader = ReaderConfig(micro_batch_size=batch_size, num_workers=1, shuffle_buffer=256, max_length=256, seed=seed)
    batches = build_loader(
        str(data / "instruct" / "train"),
        reader,
        tokenizer,
        get_template("vicuna_v1"),
        model.visual_spec(),
        Topology(),
        train=True,
    )
    started = time.perf_counter()
    train(model, params, batches, steps, lr, reducer)
    accuracy = attribute_accuracy(model.eval(), tokenizer, str(data / "instruct" / "heldout"), "vicuna_v1")
    return {
        "reducer": reducer,
        "tokens": model.visual_spec().tokens_per_video,
        "minutes": (time.perf_counter() - started) / 60,
        **{k.rsplit("/", 1)[1]: v for k, v in accuracy.items() if k.startswith("eval/attribute_accuracy/")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("runs/demo/data"))
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reducers", nargs="+", default=list(REDUCERS), choices=REDUCERS)
    parser.add_argument("--feature-layer", type=int, default=-2, help="the vision layer the reducer reads")
    parser.add_argument("--contrastive-steps", type=int, default=0, help="0: a random vision tower")
    parser.add_argument("--contrastive-lr", type=float, default=1e-3)
    parser.add_argument("--contrastive-batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.data / "instruct" / "heldout" / "manifest.json").is_file():
        write_synthetic_dataset(args.data, train_samples=2048, heldout_samples=96)
    vision = (
        contrastive_tower(
            args.data, args.contrastive_steps, args.contrastive_batch_size, args.contrastive_lr, args.seed
        )
        if args.contrastive_steps
        else None
    )
    rows = []
    for reducer in args.reducers:
        rows.append(
            run(reducer, args.data, args.steps, args.batch_size, args.lr, args.seed, args.feature_layer, vision)
        )
        print(rows[-1], flush=True)
    tower = f"contrastive tower ({args.contrastive_steps} steps)" if vision is not None else "random tower"
    print(
        f"\n{args.steps} steps, batch {args.batch_size}, lr {args.lr}, seed {args.seed}, {tower}, features of layer "
        f"{args.feature_layer}; chance: colour 0.25, shape 0.33, direction 0.25"
    )
    print("| reducer | visual tokens per clip | colour | shape | direction | minutes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['reducer']} | {r['tokens']} | {r['colour']:.2f} | {r['shape']:.2f} | {r['direction']:.2f} "
            f"| {r['minutes']:.1f} |"
        )


if __name__ == "__main__":
    main()
