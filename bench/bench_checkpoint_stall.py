"""How long a checkpoint stops training (BENCHMARKS.md, "Checkpoint stall").

2 ZeRO-3 CPU ranks (gloo, under Ray Train as the launcher runs them) train a model whose
checkpoint is over 1 GB (a random Llama of 8 layers at width 1024: about 100M parameters, whose
fp32 weights and Adam moments are 12 bytes each) with `cluster.storage` an S3 bucket on moto's
server (tests/cluster_parts.py), checkpointing every `--every` steps. Rank 0 notes when each
step's metrics are logged; the stall of a checkpoint is the time from the log of its step to the
log of the next one, minus the median of the plain steps' (no checkpoint in them); beside it,
how long rank 0's `save()` call took (the local write, for async). Measured both
ways in turn:
  sync       each save waits for its upload (what a save did before uploads went to the background)
  async      each save writes locally and trains on while its files go up
  async-ram  the same with the local copy in RAM (TMPDIR=/dev/shm for the workers)
and, for async, the time the later steps lost while the upload ran beside them (on 2 cores the
upload, moto's server and both ranks share the CPUs).

    python bench/bench_checkpoint_stall.py --work /tmp/vf-stall [--modes sync async async-ram]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import ray  # noqa: E402
from cluster_parts import start_object_store, stop_group  # noqa: E402
from two_ranks import fit_on_ranks, tiny_job, worker_topology  # noqa: E402

from data_shards.write.synth import write_synthetic_dataset  # noqa: E402
from trainer.config import ModelConfig  # noqa: E402

MODES = ("sync", "async", "async-ram")
LLM = {"hidden_size": 1024, "intermediate_size": 2816, "num_layers": 8, "num_heads": 16, "num_kv_heads": 16}


def worker(config) -> None:
    import os
    import tempfile

    from trainer.stage import StageRunner

    os.environ.update(config["env"])
    tempfile.tempdir = None  # TMPDIR again, whatever this process looked up before
    topology = worker_topology()
    runner = StageRunner(config["job"], topology)
    save, returned = runner.checkpointer.save, {}

    def timed_save(step, *args, **kwargs):  # sync: every save waits for its upload
        started = time.perf_counter()
        tag = save(step, *args, **{**kwargs, "wait": kwargs.get("wait") or config["mode"] == "sync"})
        returned[step] = time.perf_counter() - started
        return tag

    runner.checkpointer.save = timed_save
    logged, committed = {}, {}
    runner.checkpointer.on_saved = lambda record: committed.__setitem__(record.step, time.perf_counter())
    runner.train(lambda metrics, step: logged.__setitem__(step, time.perf_counter()))
    if topology.rank == 0:
        Path(config["out"]).write_text(json.dumps({"logged": logged, "committed": committed, "returned": returned}))


def measure(mode: str, args, data: Path, store, bucket_path: str) -> dict:
    job = tiny_job(
        data,
        args.work / mode,
        stage={
            "name": "instruct",
            "trainable": ["projector", "llm"],
            "steps": args.steps,
            "checkpoint_every": args.every,
        },
        data={"micro_batch_size": 2, "num_workers": 1, "max_length": 128},
        num_frames=2,
    )
    job = dataclasses.replace(
        job,
        model=ModelConfig(**{**job.model.model_dump(), "llm": {"tiny": LLM}}),
        checkpoint_dir=f"s3://{store.bucket}/{bucket_path}/{mode}",
    )
    out = args.work / f"{mode}.json"
    env = {**store.env, **({"TMPDIR": "/dev/shm"} if mode == "async-ram" else {})}
    fit_on_ranks(worker, {"job": job, "mode": mode, "env": env, "out": str(out)}, args.work / "ray")
    record = json.loads(out.read_text())
    logged = {int(k): v for k, v in record["logged"].items()}
    committed = {int(k): v for k, v in record["committed"].items()}
    returned = {int(k): v for k, v in record["returned"].items()}
    saves = list(range(args.every, args.steps, args.every))  # not the last step's (always waited for)
    intervals = {s: logged[s + 1] - logged[s] for s in range(1, args.steps)}
    near_save = {s + d for s in saves for d in range(0, args.every)}
    plain = statistics.median(v for s, v in intervals.items() if s not in near_save and s > 2)
    rows = []
    for s in saves:
        uploading = [t for t in range(s + 1, args.steps) if logged[t] < committed[s]]
        rows.append(
            {
                "step": s,
                "stall_s": intervals[s] - plain,
                "save_returned_after_s": returned[s],
                "upload_done_after_s": committed[s] - logged[s],
                "later_steps_lost_s": sum(intervals[t] - plain for t in uploading),
            }
        )
    return {"plain_step_s": plain, "saves": rows}


def checkpoint_bytes(store, bucket_path: str, mode: str) -> int:
    """The size of the newest checkpoint a run wrote."""
    fs = store.filesystem()
    tags = sorted(p for p in fs.ls(f"{store.bucket}/{bucket_path}/{mode}") if "step-" in p)
    return fs.du(tags[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / "data"
    if not (data / "vocab.txt").is_file():
        write_synthetic_dataset(data, train_samples=256, heldout_samples=8)
    store = start_object_store(args.work)
    try:
        env = {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env}
        )
        results = {mode: measure(mode, args, data, store, "stall") for mode in args.modes}
        size = checkpoint_bytes(store, "stall", args.modes[0])
    finally:
        ray.shutdown()
        stop_group(store.process)
    print(f"checkpoint size: {size / 2**30:.2f} GiB")
    for mode, result in results.items():
        print(f"{mode}: plain step {result['plain_step_s']:.2f} s")
        for row in result["saves"]:
            print(
                f"  step {row['step']}: stall {row['stall_s']:.2f} s (save() returned after "
                f"{row['save_returned_after_s']:.2f} s), complete {row['upload_done_after_s']:.1f} s "
                f"after its step, later steps slower by {row['later_steps_lost_s']:.2f} s in all"
            )
    for mode, result in results.items():
        print(f"mean stall, {mode}: {statistics.mean(r['stall_s'] for r in result['saves']):.2f} s")


if __name__ == "__main__":
    main()
