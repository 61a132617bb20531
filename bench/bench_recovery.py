"""From a killed worker to training again (BENCHMARKS.md, "Recovery from a lost worker").

The demo's instruct stage (configs/demo.yaml: its model, batch and 2 ZeRO-3 CPU ranks, trained
from the model config) with a checkpoint every `--every` steps and `cluster.max_failures: 1`.
Once the stage run has `--kill-after` steps logged, rank 1's process is SIGKILLed. Measured from
the kill, on the driver's side (its logs and MLflow; the driver takes what the workers send
once a second, so each time is late by up to a second):
  restarted  a new rank-1 process has started (Ray Train noticed the loss, made a new group)
  restored   both ranks loaded the newest checkpoint
  new step   the first step after the one the kill interrupted is logged
and the work lost: the steps between that checkpoint and the kill, trained again.

    python bench/bench_recovery.py --work /tmp/vf-recovery --runs 2
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlflow import MlflowClient  # noqa: E402

from data_shards.build.synth import write_synthetic_dataset  # noqa: E402
from launch.config import load_config  # noqa: E402
from launch.pipeline import Pipeline  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def stage_config(data: Path, out: Path, name: str, steps: int, every: int):
    cfg = load_config(DEMO, [f"name={name}", f"output_dir={out}", f"model.word_vocab={data}/vocab.txt",
                             f"tracking.registered_model_prefix={name}", "evaluation=", "cluster.max_failures=1",
                             f"stages.instruct.train_data={data}/instruct/train", "stages.instruct.eval_data=",
                             "stages.instruct.init_from=config", f"stages.instruct.steps={steps}",
                             f"stages.instruct.checkpoint_every={every}"])
    return cfg.model_copy(update={"stages": cfg.stages[1:]})


def wait_for(condition, what: str, timeout_s: float = 600) -> float:
    """Polls `condition` until it holds; the time it was seen to."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout_s} s")
        time.sleep(0.1)
    return time.time()


def one_run(data: Path, out: Path, name: str, steps: int, every: int, kill_after: int) -> dict:
    uri = f"sqlite:///{out / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    client, outcome = MlflowClient(uri), {}
    cfg = stage_config(data, out, name, steps, every)
    thread = threading.Thread(target=lambda: outcome.update(result=Pipeline(cfg, console=lambda _: None).run()))
    thread.start()
    rank_log = {rank: out / "logs" / f"instruct-rank{rank}.log" for rank in (0, 1)}

    def history() -> list:
        experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'instruct'") if experiment else []
        return client.get_metric_history(runs[0].info.run_id, "train/loss") if runs else []

    def rank1_pids() -> list:
        return re.findall(r"rank 1: pid (\d+)", rank_log[1].read_text()) if rank_log[1].is_file() else []

    wait_for(lambda: len(history()) >= kill_after, f"step {kill_after}")
    os.kill(int(rank1_pids()[0]), signal.SIGKILL)
    killed_at = time.time()
    restarted = wait_for(lambda: len(rank1_pids()) == 2, "new rank-1 process")
    resumed = re.compile(r"resumed from \S+/step-(\d+) at step (\d+)")
    restored = wait_for(lambda: all(resumed.search(log.read_text()) for log in rank_log.values()), "restore")
    thread.join()
    if "result" not in outcome:
        raise RuntimeError("the stage did not complete")
    checkpoint_step = int(resumed.search(rank_log[0].read_text()).group(2))
    steps_logged = history()
    killed_step = max(m.step for m in steps_logged if m.timestamp / 1000 < killed_at)
    first_new = min((m for m in steps_logged if m.timestamp / 1000 > restored), key=lambda m: m.timestamp)
    return {"restarted_s": restarted - killed_at, "restored_s": restored - killed_at,
            "new_step_s": first_new.timestamp / 1000 - killed_at, "killed_step": killed_step,
            "checkpoint_step": checkpoint_step, "first_new_step": first_new.step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--kill-after", type=int, default=15, help="steps logged before the kill")
    parser.add_argument("--run", type=int, help=argparse.SUPPRESS)  # one measurement, in a process of its own
    args = parser.parse_args()
    data = args.work / "data"
    if args.run is not None:
        out = args.work / f"run{args.run}-{int(time.time())}"
        r = one_run(data, out, f"recovery{args.run}", args.steps, args.every, args.kill_after)
        print(f"| {args.run} | {r['killed_step']} | {r['checkpoint_step']} | "
              f"{r['first_new_step'] - 1 - r['checkpoint_step']} | {r['restarted_s']:.1f} s | {r['restored_s']:.1f} s | "
              f"{r['new_step_s']:.1f} s (step {r['first_new_step']}) |", flush=True)
        return
    if not (data / "instruct" / "train" / "manifest.json").is_file():
        write_synthetic_dataset(data, train_samples=1024, heldout_samples=32, progress=lambda m: print(f"[data] {m}"))
    print("| run | steps logged at the kill | resumed from step | steps trained again | restarted | restored | "
          "first new step logged |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for run in range(1, args.runs + 1):  # each in a fresh process: a fresh embedded Ray
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--run", str(run)], check=True,
                       stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
