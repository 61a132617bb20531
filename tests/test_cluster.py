"""Two stages on a Ray cluster of two nodes that share no disk: data, checkpoints and exports in
an S3-compatible store, tracking on an `mlflow server` (artifacts in the store), one rank per
node. The job is stopped with Ctrl-C after a checkpoint (the step in progress is saved and
recorded, the MLflow runs end KILLED) and rerun: both ranks resume at that step, under the same
MLflow runs, every step's metrics logged once; the stages register; `valleyforge generate`
answers from the registered model. An elastic job whose node is drained for preemption saves,
waits and goes on with the worker left, and grows back to 2 ranks when the node returns."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from trainer.generate import generate_from_export
from trainer.storage import Storage

pytestmark = pytest.mark.cluster

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
PROMPT = "what colour is the shape ?"


def cluster_overrides(cluster, synth_data, store_data, name: str) -> list[str]:
    return [
        f"name={name}",
        f"output_dir={cluster.run_dir}/{{name}}",
        f"cluster.address={cluster.address}",
        f"model.word_vocab={synth_data}/vocab.txt",
        "model.num_frames=4",
        "data.micro_batch_size=4",
        f"tracking.registered_model_prefix={name}",
        "evaluation=",
        f"stages.pretrain.train_data={store_data['captions']}",
        "stages.pretrain.eval_data=",
        "stages.pretrain.steps=30",
        "stages.pretrain.checkpoint_every=3",
        f"stages.instruct.train_data={store_data['instruct']}",
        "stages.instruct.eval_data=",
        "stages.instruct.steps=3",
        "stages.instruct.checkpoint_every=2",
    ]


def demo_stages(folder: Path, *names: str) -> Path:
    """The demo config with only the named stages (the cluster tests need its language-modelling
    ones), written into `folder`."""
    config = yaml.safe_load(DEMO.read_text())
    config["stages"] = [stage for stage in config["stages"] if stage["name"] in names]
    path = folder / f"demo-{'-'.join(names)}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# A foreground command, which Ctrl-C (SIGINT) interrupts, also when these tests run as a background
# job of a non-interactive shell: its children inherit SIGINT ignored, and Python then installs no
# KeyboardInterrupt handler.
FOREGROUND = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'valleyforge'; runpy.run_module('launch.cli', run_name='__main__')"
)


def valleyforge(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", FOREGROUND, *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_a_checkpoint(job: subprocess.Popen, timeout_s: float = 300) -> str:
    """Until the running job's driver reports the first checkpoint on its console (it goes on
    with the stage after that); returns what the driver printed until then."""
    deadline, printed, fd = time.monotonic() + timeout_s, b"", job.stdout.fileno()
    while not re.search(rb"\] checkpoint at step \d+: ", printed):
        assert time.monotonic() < deadline, f"no checkpoint within {timeout_s} s: {printed.decode()}"
        if select.select([fd], [], [], 1.0)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"the job ended before a checkpoint: {printed.decode()}{job.communicate()[1]}"
            printed += chunk
    return printed.decode()


# Seconds between the drain notice and the node's end: room for a few steps and saves on these
# CPUs, with Ray Train's preemption watcher polling every 5 s.
DRAIN_DEADLINE_S = 15
DRAINED_STEPS = 260  # steps of about 0.2 s: the deadline passes, and the node returns, mid-stage


def wait_for_text(log: Path, text: str, job: subprocess.Popen, timeout_s: float = 300) -> None:
    """Until the driver-side rank log `log` of the running `job` holds `text`."""
    deadline = time.monotonic() + timeout_s
    while not (log.is_file() and text in log.read_text()):
        assert job.poll() is None, f"the job ended before {log.name} said {text!r}"
        assert time.monotonic() < deadline, f"{log.name} did not say {text!r} within {timeout_s} s"
        time.sleep(1)


def last_section(log: Path) -> str:
    """The part of a driver-side rank log written by the newest run (each run adds a header)."""
    return log.read_text().rsplit("=====\n", 1)[-1]


def test_two_nodes_resume_from_the_store_register_and_generate(
    two_node_cluster, object_store, mlflow_server, synth_data, store_data, monkeypatch, tmp_path
):
    for key, value in object_store.env.items():  # this process reads the store too
        monkeypatch.setenv(key, value)
    cluster, name = two_node_cluster, "cluster"
    storage = Storage(f"s3://{object_store.bucket}/runs/{name}")
    overrides = cluster_overrides(cluster, synth_data, store_data, name)
    overrides.append(f"cluster.storage=s3://{object_store.bucket}/runs/{{name}}")
    env = {**cluster.env, **object_store.env, "MLFLOW_TRACKING_URI": mlflow_server}
    command = [
        "run",
        str(demo_stages(tmp_path, "pretrain", "instruct")),
        *[arg for o in overrides for arg in ("--set", o)],
    ]

    # First run: stopped once stage 1 has a checkpoint in the store.
    first = valleyforge(*command, env=env)
    printed = wait_for_a_checkpoint(first)
    assert (
        f"[pretrain] checkpoint at step 3: {storage.child('checkpoints', 'pretrain', 'step-00000003').url}" in printed
    ), printed
    first.send_signal(signal.SIGINT)  # Ctrl-C: the workers save the step in progress and stop
    out, err = first.communicate(timeout=180)
    assert first.returncode == 130, err
    stopped = re.search(
        r"valleyforge: stage 'pretrain' stopped at step (\d+), saved in (\S+); the same command resumes there", err
    )
    assert stopped, err
    stopped_at, saved = int(stopped.group(1)), stopped.group(2)
    assert saved == storage.child("checkpoints", "pretrain", f"step-{stopped_at:08d}").url
    assert f"[pretrain] checkpoint at step {stopped_at} (stop requested): {saved}" in printed + out
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("valleyforge-demo").experiment_id
    (parent,) = client.search_runs([experiment], f"attributes.run_name = '{name}'")
    (stage_run,) = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.info.status == stage_run.info.status == "KILLED"
    history = client.get_metric_history(stage_run.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, stopped_at + 1))  # no step trained past the one saved
    recorded = [m for m in client.search_logged_models([experiment]) if m.source_run_id == stage_run.info.run_id]
    assert [m.params["saved_for"] for m in recorded if m.params["step"] == str(stopped_at)] == ["stop requested"]

    rerun = valleyforge(*command, env=env)
    out, err = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, out + err
    assert "(continued)" in out and "[pretrain] continuing stage run" in out, out

    logs = cluster.run_dir / name / "logs"
    resumed = {
        rank: re.findall(r"resumed from (\S+) at step (\d+)", last_section(logs / f"pretrain-rank{rank}.log"))
        for rank in (0, 1)
    }
    assert resumed[0] and resumed[0] == resumed[1], resumed
    ((tag_url, step),) = resumed[0]
    assert tag_url == saved and int(step) == stopped_at  # resumed at the step the stop saved: none trained twice

    parents = client.search_runs([experiment], f"attributes.run_name = '{name}'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the rerun continued the job's run
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    stage_runs = {run.info.run_name: run for run in children}
    assert len(children) == 2 and sorted(stage_runs) == ["instruct", "pretrain"]
    for stage, run in stage_runs.items():
        nodes = re.findall(r"rank (\d): node (\w+)", run.data.tags["placement"])
        assert [rank for rank, _ in nodes] == ["0", "1"] and nodes[0][1] != nodes[1][1], run.data.tags["placement"]
        assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "logs")) == [
            f"logs/{stage}-rank0.log",
            f"logs/{stage}-rank1.log",
        ]
        # both nodes run on this one machine (one host name): its load under MLflow's names, once
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    history = client.get_metric_history(stage_runs["pretrain"].info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, 31))  # each step once, before and after the stop
    assert storage.child("checkpoints", "instruct").read_text("latest") == "step-00000003"
    assert sorted(storage.child("checkpoints", "pretrain").folders()) == ["step-00000027", "step-00000030"]
    assert not storage.child("inits", "instruct").exists()  # removed once the stage is done

    # The registered model's files are in the store; generate answers from the registry.
    version = client.get_model_version_by_alias(f"{name}-instruct", "latest")
    assert object_store.filesystem().glob(f"{object_store.bucket}/mlflow-artifacts/**/valleyforge_model.json")
    with storage.child("exports", "instruct").fetched() as export:
        expected = generate_from_export(export, PROMPT, None, None, 4)
    answer = valleyforge(
        "generate",
        "--model",
        f"models:/{name}-instruct@latest",
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "4",
        env={"MLFLOW_TRACKING_URI": mlflow_server},
    )
    out, err = answer.communicate(timeout=300)
    assert answer.returncode == 0, err
    assert out.strip() == expected and version.version == "1"


def test_a_local_storage_path_that_a_node_cannot_see_stops_the_run(
    two_node_cluster, object_store, synth_data, store_data, tmp_path
):
    cluster, name = two_node_cluster, "cluster-local"
    overrides = cluster_overrides(cluster, synth_data, store_data, name)  # storage: the output dir
    run = valleyforge(
        "run",
        str(demo_stages(tmp_path, "pretrain", "instruct")),
        *[arg for o in overrides for arg in ("--set", o)],
        env={**cluster.env, **object_store.env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"},
    )
    out, err = run.communicate(timeout=600)
    assert run.returncode == 1, out + err
    # Ray Train may give either rank to the second node: exactly that one rank is named
    first = err.splitlines()[0]
    assert re.fullmatch(
        rf"valleyforge: error: stage 'pretrain' failed on rank [01]: node \w{{8}} \([^)]*\): "
        rf"cluster\.storage {re.escape(str(cluster.run_dir / name))} is a local path that node .*",
        first,
    ), err
    assert "last lines of" in err  # the failing rank's log, quoted from the driver's copy


def test_a_drained_node_loses_no_step_and_the_elastic_stage_goes_on_and_grows_back_when_it_returns(
    two_node_cluster, object_store, mlflow_server, synth_data, store_data, monkeypatch, tmp_path
):
    """cluster.num_workers [1, 2]: after the first checkpoint the second node is drained for
    preemption with a deadline (as Ray's autoscaler does on a spot reclaim) and killed once the
    deadline has passed. Every rank learns it at a step boundary: a checkpoint of that step at
    once, training on while the deadline leaves room, then a checkpoint of the last step that
    fits and a wait; Ray Train restarts the stage on the one worker the cluster has room for,
    which resumes that last checkpoint on 1 rank (grad_accum doubled): no step is trained twice.
    Then the node comes back: Ray Train finds room for 2 workers again (cluster.resize_check_s)
    and restarts the group larger, which resumes the newest checkpoint the 1 rank wrote; the
    stage completes on 2 ranks, every step logged once."""
    for key, value in object_store.env.items():
        monkeypatch.setenv(key, value)
    cluster, name = two_node_cluster, "elastic"
    config = demo_stages(tmp_path, "pretrain")
    storage = Storage(f"s3://{object_store.bucket}/runs/{name}")
    overrides = [o for o in cluster_overrides(cluster, synth_data, store_data, name) if not o.startswith("stages.inst")]
    overrides += [f"cluster.storage={storage.url}", "cluster.num_workers=[1, 2]", "cluster.resize_check_s=5"]
    overrides += [f"stages.pretrain.steps={DRAINED_STEPS}", "stages.pretrain.checkpoint_every=10"]
    job = valleyforge(
        "run",
        str(config),
        *[arg for o in overrides for arg in ("--set", o)],
        env={**cluster.env, **object_store.env, "MLFLOW_TRACKING_URI": mlflow_server},
    )
    checkpoints = storage.child("checkpoints", "pretrain")
    logs = cluster.run_dir / name / "logs"
    rest: dict = {}  # the job's output after the first checkpoint, read meanwhile: a full pipe stalls its driver
    try:
        printed = wait_for_a_checkpoint(job)
        reader = threading.Thread(target=lambda: rest.update(zip(("out", "err"), job.communicate(timeout=900))))
        reader.start()
        node = cluster.drain_second_node(DRAIN_DEADLINE_S)
        time.sleep(DRAIN_DEADLINE_S + 2)
        cluster.lose_second_node()
        wait_for_text(logs / "pretrain-rank0.log", "resuming a checkpoint of 2 rank(s) on 1", job)
        cluster.start_second_node()
        reader.join(timeout=900)
    finally:
        if job.poll() is None:
            job.kill()
        if len(cluster.nodes) < 2:
            cluster.start_second_node()  # for the tests after this one
    out, err = printed + rest["out"], rest["err"]
    assert job.returncode == 0, out + err
    # at the notice, and (unless that was already too late for another step) at the last step that fits
    for_preemption = re.findall(rf"\[pretrain\] checkpoint at step (\d+) \(node {node[:8]} preempted in [^)]*\): ", out)
    assert 1 <= len(for_preemption) <= 2, out
    saved_and_waited = r"step (\d+) saved \(node \w+ preempted in -?\d+ s, too soon for another step\): waiting"
    waited = {rank: re.findall(saved_and_waited, (logs / f"pretrain-rank{rank}.log").read_text()) for rank in (0, 1)}
    assert waited[0] and waited[0] == waited[1], waited  # every rank saved the same last step, then waited
    (last_saved,) = waited[0]
    assert for_preemption[-1] == last_saved
    rank0 = (logs / "pretrain-rank0.log").read_text()
    shrunk = rank0.index("resuming a checkpoint of 2 rank(s) on 1: grad_accum 1 -> 2")
    grew = rank0.index("resuming a checkpoint of 1 rank(s) on 2: grad_accum 2 -> 1", shrunk)
    alone, grown = rank0[shrunk:grew], rank0[grew:]  # the one rank's log, and the grown group's
    ((tag_url, step),) = re.findall(r"resumed from (\S+) at step (\d+)", alone)
    assert tag_url == checkpoints.child(f"step-{int(last_saved):08d}").url and step == last_saved  # none trained twice
    ((tag_url, step),) = re.findall(r"resumed from (\S+) at step (\d+)", grown)
    assert int(step) > int(last_saved) and int(step) % 10 == 0  # a checkpoint the one rank wrote
    resumed_by_rank1 = re.findall(r"resumed from \S+ at step \d+", (logs / "pretrain-rank1.log").read_text())
    assert resumed_by_rank1[-1] == f"resumed from {tag_url} at step {step}"
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("valleyforge-demo").experiment_id
    (parent,) = client.search_runs([experiment], f"attributes.run_name = '{name}'")
    (run,) = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, DRAINED_STEPS + 1))
    recorded = [m for m in client.search_logged_models([experiment]) if m.source_run_id == run.info.run_id]
    assert sorted(m.params["step"] for m in recorded if "preempted" in m.params.get("saved_for", "")) == sorted(
        for_preemption
    )
