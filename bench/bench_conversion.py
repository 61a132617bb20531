"""How long the universal conversion of a checkpoint takes, against its size (BENCHMARKS.md,
"Recovery from a lost worker").

2 ZeRO-3 CPU ranks (gloo, under Ray Train as the launcher runs them) train one step of a random
Llama of 8 layers at each `--widths` (fp32 weights and Adam moments: 12 bytes a parameter) and
checkpoint it in a local folder. This process then converts each checkpoint as a resume on
another number of ranks does (trainer/checkpoint_universal.py), `--runs` times each way:
  serial    one extract and one merge process (what the conversion did before, and does below
            PARALLEL_FROM_BYTES)
  parallel  the workers `conversion_workers` picks for this machine's CPUs and free memory above it

    python bench/bench_conversion.py --work /tmp/vf-conversion --widths 512 1024 --runs 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import ray  # noqa: E402
from two_ranks import fit_on_ranks, tiny_job, worker_topology  # noqa: E402

from data_shards.write.synth import write_synthetic_dataset  # noqa: E402
from trainer import checkpoint_universal  # noqa: E402
from trainer.checkpoint import resume_point  # noqa: E402
from trainer.config import ModelConfig  # noqa: E402
from trainer.storage import Storage  # noqa: E402

TAG = "step-00000001"


def llm(width: int) -> dict:
    return {
        "hidden_size": width,
        "intermediate_size": width * 11 // 4,
        "num_layers": 8,
        "num_heads": 16,
        "num_kv_heads": 16,
    }


def worker(config) -> None:
    from trainer.stage import StageRunner

    StageRunner(config["job"], worker_topology()).train(lambda metrics, step: None)


def write_checkpoint(width: int, data: Path, work: Path) -> Path:
    """A one-step checkpoint of 2 ranks of the model at `width`; its folder."""
    job = tiny_job(
        data,
        work / f"w{width}",
        stage={"name": "instruct", "trainable": ["projector", "llm"], "steps": 1, "checkpoint_every": 1},
        data={"micro_batch_size": 2, "num_workers": 0, "max_length": 128},
        num_frames=2,
    )
    job = dataclasses.replace(job, model=ModelConfig(**{**job.model.model_dump(), "llm": {"tiny": llm(width)}}))
    fit_on_ranks(worker, {"job": job}, work / "ray")
    return Path(job.checkpoint_dir)


def convert(checkpoints: Path, parallel: bool) -> float:
    """Seconds to convert the tag afresh, with one extract and one merge process or with the
    workers `conversion_workers` picks above its size threshold."""
    storage = Storage(str(checkpoints))
    shutil.rmtree(checkpoints / TAG / checkpoint_universal.UNIVERSAL, ignore_errors=True)
    point = resume_point(storage, TAG)
    threshold = checkpoint_universal.PARALLEL_FROM_BYTES
    checkpoint_universal.PARALLEL_FROM_BYTES = 0 if parallel else float("inf")
    try:
        started = time.perf_counter()
        checkpoint_universal.ensure_universal(storage, TAG, point.files)
        return time.perf_counter() - started
    finally:
        checkpoint_universal.PARALLEL_FROM_BYTES = threshold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / "data"
    if not data.exists():
        write_synthetic_dataset(data, train_samples=64, heldout_samples=8, samples_per_shard=8, progress=lambda _: None)
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}},
    )
    results = []
    for width in args.widths:
        checkpoints = write_checkpoint(width, data, args.work)
        zero_files = [
            p for p in (checkpoints / TAG).iterdir() if p.name.endswith(("_optim_states.pt", "_model_states.pt"))
        ]
        size = sum(p.stat().st_size for p in zero_files)
        for run in range(1, args.runs + 1):
            for parallel in (False, True):
                seconds = convert(checkpoints, parallel)
                row = {"width": width, "zero_files_gib": size / 2**30, "run": run, "parallel": parallel, "s": seconds}
                print(json.dumps(row), flush=True)
                results.append(row)
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main()
