"""One real-shape training stage on one accelerator (BENCHMARKS.md, "On a GPU").

The model: a CLIP ViT-L/14-sized vision tower (224 px, patch 14, 8 frames per clip, frozen), Valley
pooling, a linear projector and a Llama-shaped LLM of about 1B parameters, random weights. The
stage: instruction tuning (projector and LLM train) under DeepSpeed ZeRO-3 on one rank, SDPA
attention, packing into rows of 2048 tokens, frames decoded from synthetic 224 px H.264 shards by
DataLoader workers. It is the worker-level entry point (trainer.stage.StageRunner) without Ray
or MLflow: the process group is made here, as Ray Train makes it in a worker.

The stage runs twice from the same seed on the same samples, in bf16 and in fp32, each in its own
process. Printed (and written to OUT/summary.json): median tokens/s (non-pad tokens), model
TFLOP/s and MFU (the vision tower's FLOPs counted, trainer/throughput.py), data-wait fraction,
peak accelerator memory, and the two runs' losses step by step.

    python bench/bench_gpu.py --out runs/gpu                          # on the GPU
    python bench/bench_gpu.py --out /tmp/gpu --sizes small --steps 3  # the same path on CPU, small
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# vision: CLIP ViT-L/14 at 224 px; llm: 16 layers of width 2048 (GQA 32/8 heads, MLP 8192), ~1.0B
SIZES = {
    "real": {
        "vision": {
            "image_size": 224,
            "patch_size": 14,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_layers": 24,
            "num_heads": 16,
        },
        "llm": {
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_layers": 16,
            "num_heads": 32,
            "num_kv_heads": 8,
            "max_position_embeddings": 4096,
        },
        "frame_size": 224,
        "max_length": 2048,
    },
    "small": {
        "vision": {
            "image_size": 56,
            "patch_size": 14,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_layers": 2,
            "num_heads": 4,
        },
        "llm": {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "max_position_embeddings": 1024,
        },
        "frame_size": 56,
        "max_length": 512,
    },
}
PRECISIONS = ("bf16", "fp32")


def make_data(out: Path, sizes: dict, samples: int, processes: int) -> Path:
    from data_shards.write.synth import SynthSpec, write_synthetic_dataset

    if not (out / "vocab.txt").is_file():
        started = time.perf_counter()
        write_synthetic_dataset(
            out,
            train_samples=samples,
            heldout_samples=8,
            samples_per_shard=16,
            spec=SynthSpec(frame_size=sizes["frame_size"], num_frames=16, fps=8),
            processes=processes,
        )
        print(f"synthetic shards: {samples} samples in {time.perf_counter() - started:.0f} s", flush=True)
    return out


def stage_job(args, precision: str):
    from data_shards.config import ReaderConfig
    from data_shards.read.reader import shard_lists
    from trainer.config import EngineConfig, ModelConfig, StageConfig
    from trainer.job import StageJob

    sizes = SIZES[args.sizes]
    stage = StageConfig(
        name="instruct",
        train_data=str(args.data / "instruct" / "train"),
        template="vicuna_v1",
        trainable=["projector", "llm"],
        steps=args.steps,
        optimizer={"lr": 2e-5, "module_lr": {"projector": 1e-4}},
        schedule={"warmup_steps": 0, "min_lr_ratio": 1.0},
    )
    return StageJob(
        model=ModelConfig(
            vision={"tiny": sizes["vision"]},
            llm={"tiny": sizes["llm"]},
            word_vocab=str(args.data / "vocab.txt"),
            reducer="valley",
            projector="linear",
            num_frames=8,
            attn_implementation=args.attn,
        ),
        engine=EngineConfig(zero_stage=args.zero_stage, precision=precision),
        data=ReaderConfig(
            micro_batch_size=args.micro_batch_size,
            num_workers=args.num_workers,
            max_length=sizes["max_length"],
            packing=True,
        ),
        stage=stage,
        train_shards=shard_lists(stage.train_data),
        eval_shards=None,
        init_export_url=None,
        export_dir=str(args.out / precision / "export"),
        checkpoint_dir=str(args.out / precision / "ckpt"),
        seed=0,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(args, precision: str) -> None:
    """Train the stage on one rank in this process; write each step's metrics to OUT/<precision>.json."""
    import torch
    import torch.distributed as dist

    from data_shards.read.reader import Topology
    from trainer.stage import StageRunner

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    started = time.perf_counter()
    runner = StageRunner(stage_job(args, precision), Topology(0, 1))
    built = time.perf_counter() - started
    steps = []
    profiler = Profiler(args.profile, args.out / f"profile-{precision}.txt") if args.profile else None

    def log(metrics: dict, step: int) -> None:
        steps.append({"step": step, **metrics})
        if profiler:
            profiler.after_step(step)
        print(
            f"{precision} step {step}: loss {metrics['train/loss']:.4f}, "
            f"{metrics['train/tokens_per_s']:,.0f} tokens/s, data wait {metrics['train/data_wait_fraction']:.2f}",
            flush=True,
        )

    runner.train(log)
    result = {
        "precision": precision,
        "build_s": built,
        "steps": steps,
        "attention": runner.model.llm.config._attn_implementation,
        "llm_params": sum(getattr(p, "ds_numel", p.numel()) for p in runner.model.llm.parameters()),
        "vision_params": sum(getattr(p, "ds_numel", p.numel()) for p in runner.model.vision.parameters()),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "deepspeed": __import__("deepspeed").__version__,
            "transformers": __import__("transformers").__version__,
        },
    }
    (args.out / f"{precision}.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


class Profiler:
    """torch.profiler over steps [first, last]; the kernels and operators taking the most time are
    written to `path` as two tables (by accelerator time, by CPU time)."""

    def __init__(self, steps: list[int], path: Path):
        import torch

        self.first, self.last = steps
        self.path = path
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profile = torch.profiler.profile(activities=activities)

    def after_step(self, step: int) -> None:
        if step == self.first - 1:
            self.profile.start()
        elif step == self.last:
            self.profile.stop()
            table = self.profile.key_averages()
            sort = "cuda_time_total" if len(self.profile.activities) > 1 else "cpu_time_total"
            self.path.write_text(
                f"steps {self.first}-{self.last}\n"
                + table.table(sort_by=sort, row_limit=40, max_name_column_width=70)
                + "\n"
                + table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70)
            )


def summarise(args, results: dict[str, dict]) -> dict:
    summary = {}
    for precision, result in results.items():
        timed = result["steps"][args.warmup :] or result["steps"]

        def median(key, timed=timed):
            values = [s[key] for s in timed if key in s]
            return statistics.median(values) if values else None

        summary[precision] = {
            "tokens_per_s": median("train/tokens_per_s"),
            "samples_per_s": median("train/samples_per_s"),
            "model_tflops_per_s": median("train/model_tflops_per_s_per_device"),
            "mfu": median("train/mfu"),
            "data_wait_fraction": median("train/data_wait_fraction"),
            "visual_tokens_per_sample": median("train/visual_tokens_per_sample"),
            "peak_gpu_memory_gb": result["steps"][-1].get("system/peak_gpu_memory_gb"),
            "peak_rss_gb": result["steps"][-1].get("system/peak_rss_gb"),
            "build_s": result["build_s"],
            "losses": [s["train/loss"] for s in result["steps"]],
            **{k: result[k] for k in ("attention", "llm_params", "vision_params", "device", "versions")},
        }
    if set(PRECISIONS) <= set(summary):
        bf16, fp32 = summary["bf16"]["losses"], summary["fp32"]["losses"]
        gaps = [abs(b - f) / f for b, f in zip(bf16, fp32)]
        half = len(fp32) // 2
        summary["loss_gap"] = {
            "first_step": gaps[0],
            "largest": max(gaps),
            "largest_at_step": gaps.index(max(gaps)) + 1,
            "mean_of_last_half": statistics.mean(bf16[half:]) / statistics.mean(fp32[half:]) - 1,
        }
    return summary


def report(summary: dict) -> None:
    for precision in PRECISIONS:
        if precision not in summary:
            continue
        s = summary[precision]
        mfu = f"{s['mfu']:.1%}" if s["mfu"] is not None else "n/a"
        memory = f"{s['peak_gpu_memory_gb']:.1f} GiB" if s["peak_gpu_memory_gb"] is not None else "n/a"
        print(
            f"{precision}: {s['tokens_per_s']:,.0f} tokens/s, {s['samples_per_s']:.1f} samples/s, "
            f"{s['model_tflops_per_s']:.1f} model TFLOP/s, MFU {mfu}, data wait {s['data_wait_fraction']:.1%}, "
            f"peak accelerator memory {memory}, engine built in {s['build_s']:.0f} s "
            f"({s['device']}, attention {s['attention']}, LLM {s['llm_params'] / 1e9:.2f}B, "
            f"vision {s['vision_params'] / 1e6:.0f}M parameters)"
        )
    if "loss_gap" in summary:
        print("step | bf16 loss | fp32 loss")
        for step, (b, f) in enumerate(zip(summary["bf16"]["losses"], summary["fp32"]["losses"]), 1):
            print(f"{step} | {b:.4f} | {f:.4f}")
        gap = summary["loss_gap"]
        print(
            f"bf16 vs fp32 loss: step 1 {gap['first_step']:.2%} apart, at most {gap['largest']:.1%} (step "
            f"{gap['largest_at_step']}), mean of the last half {gap['mean_of_last_half']:+.1%}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, help="synthetic shards (written here when missing); default OUT/data")
    parser.add_argument("--sizes", choices=sorted(SIZES), default="real")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the medians")
    parser.add_argument("--micro-batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=8, help="DataLoader workers decoding frames")
    parser.add_argument("--samples", type=int, default=1024, help="synthetic training samples")
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "flash_attention_2", "eager"))
    parser.add_argument("--zero-stage", type=int, default=3, choices=(0, 1, 2, 3))
    parser.add_argument(
        "--profile",
        type=int,
        nargs=2,
        metavar=("FIRST", "LAST"),
        help="profile these steps (torch.profiler) into OUT/profile-<precision>.txt",
    )
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--one", choices=PRECISIONS, help=argparse.SUPPRESS)  # the child process's run
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.data = args.data or args.out / "data"
    if args.one:
        run_one(args, args.one)
        return
    make_data(args.data, SIZES[args.sizes], args.samples, os.cpu_count() or 2)
    results = {}
    for precision in args.precisions:
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", precision, "--data", str(args.data)])
        if child.returncode != 0:
            print(f"{precision} run failed (exit {child.returncode})", flush=True)
            continue
        results[precision] = json.loads((args.out / f"{precision}.json").read_text())
    summary = summarise(args, results)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    report(summary)


if __name__ == "__main__":
    main()
