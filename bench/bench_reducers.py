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
from data_shards.read.reader import Topology, build_loader  # noqa: E402
from data_shards.build.synth import write_synthetic_dataset  # noqa: E402
from trainer.blueprint import build_model, fill_weights, blueprint_from_config  # noqa: E402
from trainer.config import ModelConfig  # noqa: E402
from trainer.evaluation import attribute_accuracy  # noqa: E402
from trainer.engine import warmup_cosine  # noqa: E402
from trainer.model import model_inputs  # noqa: E402

REDUCERS = ("none", "valley", "spatial_pool2", "temporal_diff")


def run(reducer: str, data: Path, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    cfg = ModelConfig(vision={"tiny": {"image_size": 32, "patch_size": 8}}, llm={"tiny": {}},
                      word_vocab=str(data / "vocab.txt"), num_frames=8, reducer=reducer)
    blueprint = blueprint_from_config(cfg)
    model = build_model(blueprint, "sdpa")
    fill_weights(model, blueprint, cfg.init_std, seed)
    model.vision.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps=steps, warmup_steps=20, min_lr_ratio=0.1))
    reader = ReaderConfig(micro_batch_size=batch_size, num_workers=1, shuffle_buffer=256, max_length=256, seed=seed)
    batches = build_loader(str(data / "instruct" / "train"), reader, blueprint.tokenizer, get_template("vicuna_v1"),
                           model.visual_spec(), Topology(), train=True)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        batch = next(batches)
        loss = model(**model_inputs(batch)).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 200 == 0:
            print(f"  {reducer} step {step}/{steps} loss {float(loss):.3f} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    accuracy = attribute_accuracy(model.eval(), blueprint.tokenizer, str(data / "instruct" / "heldout"), "vicuna_v1")
    return {"reducer": reducer, "tokens": model.visual_spec().tokens_per_video, "minutes": (time.perf_counter() - started) / 60,
            **{k.rsplit("/", 1)[1]: v for k, v in accuracy.items() if k.startswith("eval/attribute_accuracy/")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("runs/demo/data"))
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reducers", nargs="+", default=list(REDUCERS), choices=REDUCERS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.data / "instruct" / "heldout" / "manifest.json").is_file():
        write_synthetic_dataset(args.data, train_samples=2048, heldout_samples=96)
    rows = []
    for reducer in args.reducers:
        rows.append(run(reducer, args.data, args.steps, args.batch_size, args.lr, args.seed))
        print(rows[-1], flush=True)
    print(f"\n{args.steps} steps, batch {args.batch_size}, lr {args.lr}, seed {args.seed}; chance: colour 0.25, "
          f"shape 0.33, direction 0.25")
    print("| reducer | visual tokens per clip | colour | shape | direction | minutes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['reducer']} | {r['tokens']} | {r['colour']:.2f} | {r['shape']:.2f} | {r['direction']:.2f} "
              f"| {r['minutes']:.1f} |")


if __name__ == "__main__":
    main()
