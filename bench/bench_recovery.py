"""From a lost worker to training again (BENCHMARKS.md, "Recovery from a lost worker").

The demo's instruct stage (configs/demo.yaml: its model, batch and 2 ZeRO-3 CPU ranks, trained
from the model config) with a checkpoint every `--every` steps and `cluster.max_failures: 1`.
Once the stage run has `--kill-after` steps logged:
  default    rank 1's process is SIGKILLed (an embedded Ray); Ray Train starts a new group of 2
  --elastic  on a Ray cluster of two 1-CPU nodes (tests/cluster_parts.py: the second in a mount
             namespace of its own, so this needs root) with `cluster.num_workers: [1, 2]`, every
             process of the second node is SIGKILLed; Ray Train goes on with 1 worker, which
             resumes the 2-rank checkpoint through its universal form with grad_accum 2;
             with --grow-back the node is then started again and Ray Train (cluster.resize_check_s
             10) restarts the group on 2 ranks from the one rank's newest checkpoint
Measured from the kill, on the driver's side (its logs and MLflow; the driver takes what the
workers send once a second, so each time is late by up to a second):
  restarted  a new worker process has started (Ray Train noticed the loss, made a new group)
  restored   the new group loaded the newest checkpoint
  new step   the first step after the one the kill interrupted is logged
and the work lost: the steps between that checkpoint and the kill, trained again.

    python bench/bench_recovery.py --work /tmp/vf-recovery --runs 2
    python bench/bench_recovery.py --work /tmp/vf-recovery --runs 2 --elastic
    python bench/bench_recovery.py --work /tmp/vf-recovery --runs 2 --elastic --grow-back --steps 200
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

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from mlflow import MlflowClient  # noqa: E402

from data_shards.write.synth import write_synthetic_dataset  # noqa: E402
from launch.config import load_config  # noqa: E402
from launch.pipeline import Pipeline  # noqa: E402

DEMO = ROOT / "configs" / "demo.yaml"
RESUMED = re.compile(r"resumed from \S+/step-(\d+) at step (\d+)")


def overrides(data: Path, out: Path, name: str, steps: int, every: int) -> list[str]:
    return [
        f"name={name}",
        f"output_dir={out}",
        f"model.word_vocab={data}/vocab.txt",
        f"tracking.registered_model_prefix={name}",
        "evaluation=",
        "cluster.max_failures=1",
        f"stages.instruct.train_data={data}/instruct/train",
        "stages.instruct.eval_data=",
        "stages.instruct.init_from=config",
        f"stages.instruct.steps={steps}",
        f"stages.instruct.checkpoint_every={every}",
    ]


def wait_for(condition, what: str, timeout_s: float = 600) -> float:
    """Polls `condition` until it holds; the time it was seen to."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout_s} s")
        time.sleep(0.1)
    return time.time()


class StageWatch:
    """What the driver shows of the instruct stage: its MLflow history and its rank logs."""

    def __init__(self, out: Path, uri: str):
        self.client, self.logs = MlflowClient(uri), out / "logs"

    def history(self) -> list:
        experiment = self.client.get_experiment_by_name("valleyforge-demo")
        runs = (
            self.client.search_runs([experiment.experiment_id], "attributes.run_name = 'instruct'")
            if experiment
            else []
        )
        return self.client.get_metric_history(runs[0].info.run_id, "train/loss") if runs else []

    def log(self, rank: int) -> str:
        path = self.logs / f"instruct-rank{rank}.log"
        return path.read_text() if path.is_file() else ""

    def pids(self, rank: int) -> list[str]:
        return re.findall(rf"rank {rank}: pid (\d+)", self.log(rank))

    def result(self, killed_at: float, restarted: float, restored: float) -> dict:
        checkpoint_step = int(RESUMED.search(self.log(0)).group(2))
        steps_logged = self.history()
        killed_step = max(m.step for m in steps_logged if m.timestamp / 1000 < killed_at)
        first_new = min((m for m in steps_logged if m.timestamp / 1000 > restored), key=lambda m: m.timestamp)
        return {
            "restarted_s": restarted - killed_at,
            "restored_s": restored - killed_at,
            "new_step_s": first_new.timestamp / 1000 - killed_at,
            "killed_step": killed_step,
            "checkpoint_step": checkpoint_step,
            "first_new_step": first_new.step,
        }


def worker_kill_run(data: Path, out: Path, name: str, steps: int, every: int, kill_after: int) -> dict:
    uri = f"sqlite:///{out / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    watch, outcome = StageWatch(out, uri), {}
    cfg = load_config(DEMO, overrides(data, out, name, steps, every))
    cfg = cfg.model_copy(update={"stages": [stage for stage in cfg.stages if stage.name == "instruct"]})
    thread = threading.Thread(target=lambda: outcome.update(result=Pipeline(cfg, console=lambda _: None).run()))
    thread.start()
    wait_for(lambda: len(watch.history()) >= kill_after, f"step {kill_after}")
    os.kill(int(watch.pids(1)[0]), signal.SIGKILL)
    killed_at = time.time()
    restarted = wait_for(lambda: len(watch.pids(1)) == 2, "new rank-1 process")
    restored = wait_for(lambda: all(RESUMED.search(watch.log(rank)) for rank in (0, 1)), "restore")
    thread.join()
    if "result" not in outcome:
        raise RuntimeError("the stage did not complete")
    return watch.result(killed_at, restarted, restored)


def node_loss_run(data: Path, out: Path, name: str, steps: int, every: int, kill_after: int, grow_back: bool) -> dict:
    import yaml
    from cluster_parts import start_two_node_cluster

    uri = f"sqlite:///{out / 'mlflow.db'}"
    watch = StageWatch(out, uri)
    config = yaml.safe_load(DEMO.read_text())
    config["stages"] = [stage for stage in config["stages"] if stage["name"] == "instruct"]
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    sets = [*overrides(data, out, name, steps, every), "cluster.num_workers=[1, 2]", f"cluster.storage={out}/storage"]
    sets.append("cluster.resize_check_s=10")
    for folder in ("unseen", "cluster-logs"):
        (out / folder).mkdir()
    cluster = start_two_node_cluster(
        out / "unseen", out / "cluster-logs", {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    )
    try:
        sets.append(f"cluster.address={cluster.address}")
        driver = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "launch.cli",
                "run",
                str(out / "config.yaml"),
                *[arg for s in sets for arg in ("--set", s)],
            ],
            cwd=ROOT,
            env={**os.environ, **cluster.env, "MLFLOW_TRACKING_URI": uri},
            stdout=subprocess.DEVNULL,
            stderr=open(out / "driver.err", "w"),
        )
        wait_for(lambda: len(watch.history()) >= kill_after, f"step {kill_after}")
        cluster.lose_second_node()
        killed_at = time.time()
        restarted = wait_for(lambda: len(watch.pids(0)) == 2, "a new group's rank 0")
        restored = wait_for(lambda: RESUMED.search(watch.log(0).rsplit("rank 0: pid", 1)[-1]), "restore")
        grown = {}
        if grow_back:
            cluster.start_second_node()
            joined = time.time()
            wait_for(lambda: len(watch.pids(0)) == 3, "a grown group's rank 0")
            regrown = wait_for(lambda: RESUMED.search(watch.log(0).rsplit("rank 0: pid", 1)[-1]), "restore on 2")
            grown = {
                "grown_s": regrown - joined,
                "grown_from": int(RESUMED.search(watch.log(0).rsplit("rank 0: pid", 1)[-1]).group(2)),
            }
        if driver.wait() != 0:
            raise RuntimeError(f"the stage did not complete: {(out / 'driver.err').read_text()[-2000:]}")
    finally:
        cluster.stop()
    if "resuming a checkpoint of 2 rank(s) on 1" not in watch.log(0):
        raise RuntimeError("the stage did not go on with 1 rank")
    return {**watch.result(killed_at, restarted, restored), **grown}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--kill-after", type=int, default=15, help="steps logged before the kill")
    parser.add_argument("--elastic", action="store_true", help="lose a node of an elastic [1, 2] job")
    parser.add_argument("--grow-back", action="store_true", help="--elastic: start the node again once 1 rank trains")
    parser.add_argument("--run", type=int, help=argparse.SUPPRESS)  # one measurement, in a process of its own
    args = parser.parse_args()
    data = args.work / "data"
    if args.run is not None:
        out = args.work / f"run{args.run}-{int(time.time())}"
        out.mkdir(parents=True)
        run = (data, out, f"recovery{args.run}", args.steps, args.every, args.kill_after)
        r = node_loss_run(*run, args.grow_back) if args.elastic else worker_kill_run(*run)
        grown = f" {r['grown_s']:.1f} s (from step {r['grown_from']}) |" if "grown_s" in r else ""
        print(
            f"| {args.run} | {r['killed_step']} | {r['checkpoint_step']} | "
            f"{r['first_new_step'] - 1 - r['checkpoint_step']} | {r['restarted_s']:.1f} s | {r['restored_s']:.1f} s | "
            f"{r['new_step_s']:.1f} s (step {r['first_new_step']}) |{grown}",
            flush=True,
        )
        return
    if not (data / "instruct" / "train" / "manifest.json").is_file():
        write_synthetic_dataset(data, train_samples=1024, heldout_samples=32, progress=lambda m: print(f"[data] {m}"))
    grown = " grown back on 2, from the node's start |" if args.grow_back else ""
    print(
        "| run | steps logged at the kill | resumed from step | steps trained again | restarted | restored | "
        f"first new step logged |{grown}"
    )
    print("|---|---|---|---|---|---|---|" + ("---|" if grown else ""), flush=True)
    for run in range(1, args.runs + 1):  # each in a fresh process: a fresh Ray
        subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--run", str(run)], check=True, stderr=subprocess.DEVNULL
        )


if __name__ == "__main__":
    main()
