"""`valleyforge submit` and `valleyforge jobs` against the two-node cluster's job server (its
head runs the dashboard): a tiny recipe submitted with --follow runs to SUCCEEDED and registers
its stages; a bad config submits nothing; a wrong token is refused by name; `jobs stop` stops a
running job and a follower then exits non-zero. The cluster's image is this environment, so the
jobs go with --no-install; the requirements that would be installed are checked on their own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from mlflow import MlflowClient

from launch.config import load_config
from launch.submit import JOB_CONFIG, JobServer, cluster_job_config, job_package, pinned_requirements, runtime_env

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny" / "valley.yaml"


def tiny_overrides(synth_data, store_data, object_store, name: str, steps: int) -> list[str]:
    return [
        f"name={name}",
        f"tracking.registered_model_prefix={name}",
        f"model.word_vocab={synth_data}/vocab.txt",
        f"cluster.storage=s3://{object_store.bucket}/runs/{{name}}",
        f"stages.pretrain.train_data={store_data['captions']}",
        f"stages.pretrain.steps={steps}",
        f"stages.instruct.train_data={store_data['instruct']}",
        f"stages.instruct.steps={steps}",
    ]


def valleyforge(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "launch.cli", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def job_server(two_node_cluster, monkeypatch) -> JobServer:
    """A client in this process, with the cluster's token."""
    monkeypatch.setenv("RAY_AUTH_TOKEN", two_node_cluster.env["RAY_AUTH_TOKEN"])
    return JobServer(two_node_cluster.dashboard)


def submitted_ids(server: JobServer) -> set[str]:
    return {job.submission_id for job in server.call("list_jobs") if job.submission_id}


@pytest.mark.cluster
def test_submit_follow_runs_a_tiny_recipe_to_success_and_registers_its_stages(
    two_node_cluster, object_store, mlflow_server, synth_data, store_data
):
    cluster, name = two_node_cluster, "submitted"
    overrides = tiny_overrides(synth_data, store_data, object_store, name, steps=3)
    job = valleyforge(
        "submit",
        str(TINY),
        *[a for o in overrides for a in ("--set", o)],
        "--address",
        cluster.dashboard,
        "--no-install",
        "--follow",
        env={**cluster.env, "MLFLOW_TRACKING_URI": mlflow_server},
    )
    out, err = job.communicate(timeout=900)
    assert job.returncode == 0, out + err
    assert out.startswith(f"submitted valleyforge-{name}-") and f"{cluster.dashboard}/#/jobs/" in out, out
    assert "Registered models:" in out and out.rstrip().endswith("SUCCEEDED"), out  # the job's own log, streamed
    client = MlflowClient(mlflow_server)
    for stage in ("pretrain", "instruct"):
        version = client.get_model_version_by_alias(f"{name}-{stage}", "latest")
        assert version.tags["stage"] == stage


@pytest.mark.cluster
def test_a_bad_config_submits_nothing_and_a_wrong_token_is_refused(two_node_cluster, job_server):
    cluster = two_node_cluster
    before = submitted_ids(job_server)
    bad = valleyforge(
        "submit", str(TINY), "--set", "cluster.workerz=2", "--address", cluster.dashboard, env=cluster.env
    )
    _, err = bad.communicate(timeout=120)
    assert bad.returncode == 2 and err.splitlines() == [
        f"valleyforge: error: {TINY}: cluster.workerz: unknown key (allowed here: address, storage, num_workers, "
        f"max_failures, worker_start_timeout_s, resize_check_s, use_gpu, cpus_per_worker, num_cpus, torch_threads, "
        f"peak_flops_per_device, preemption_grace_s, checkpoint_sources)"
    ], err
    assert submitted_ids(job_server) == before

    refused = valleyforge(
        "jobs", "--address", cluster.dashboard, "list", env={**cluster.env, "RAY_AUTH_TOKEN": "not-the-token"}
    )
    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 1 and f"the Ray job server at {cluster.dashboard} refused the request" in err, err


@pytest.mark.unit
def test_the_job_carries_the_project_the_config_and_the_pinned_requirements(tmp_path, synth_data):
    cfg = cluster_job_config(
        load_config(TINY, [f"model.word_vocab={synth_data}/vocab.txt", "cluster.address=elsewhere:6379"])
    )
    package = job_package(ROOT, cfg, tmp_path)
    with zipfile.ZipFile(package) as archive:
        names = set(archive.namelist())
        (tmp_path / "job.yaml").write_bytes(archive.read(JOB_CONFIG))
    assert {"launch/cli.py", "trainer/stage.py", "configs/tiny/valley.yaml", "requirements.lock", JOB_CONFIG} <= names
    assert not [n for n in names if n.startswith(("runs/", ".venv/", ".git/", "mlruns/")) or "__pycache__" in n]
    assert load_config(tmp_path / "job.yaml") == cfg and cfg.cluster.address is None  # the job's own cluster
    assert cfg.model.word_vocab == str(synth_data / "vocab.txt") and Path(cfg.stages[0].train_data).is_absolute()
    assert cfg.output_dir == "~/valleyforge/runs/{name}"  # on the head node, outside Ray's working directory

    env = runtime_env(package, ROOT, "http://mlflow:5000", install=True, stop_wait_s=90)
    assert env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "90"  # `jobs stop` leaves the driver time to save
    packages = env["pip"]["packages"]
    assert not [p for p in packages if p.split("==")[0].lower() in ("torch", "ray")]
    assert "deepspeed==0.19.8" in packages and "mlflow==3.17.2" in packages
    assert "py_modules" not in env  # this project is ValleyForge's own tree
    assert runtime_env(package, tmp_path, "http://mlflow:5000", True, 60)["py_modules"] == [
        str(ROOT / p) for p in ("data_shards", "trainer", "launch")
    ]
    assert "pip" not in runtime_env(package, ROOT, "http://mlflow:5000", False, 60)
    assert len(packages) == len(pinned_requirements())


@pytest.mark.cluster
def test_jobs_stop_stops_a_running_job_and_its_follower_exits_non_zero(
    two_node_cluster, job_server, object_store, mlflow_server, synth_data, store_data
):
    cluster, name = two_node_cluster, "stopped"
    overrides = tiny_overrides(synth_data, store_data, object_store, name, steps=2000)
    env = {**cluster.env, "MLFLOW_TRACKING_URI": mlflow_server}
    submit = valleyforge(
        "submit",
        str(TINY),
        *[a for o in overrides for a in ("--set", o)],
        "--address",
        cluster.dashboard,
        "--no-install",
        env=env,
    )
    out, err = submit.communicate(timeout=300)
    assert submit.returncode == 0, out + err
    job_id = out.split()[1]
    follower = valleyforge("jobs", "--address", cluster.dashboard, "logs", "--follow", job_id, env=env)
    server, deadline = job_server, time.monotonic() + 300
    while "[pretrain]" not in server.call("get_job_logs", job_id):  # training has started
        assert server.status(job_id) in ("PENDING", "RUNNING") and time.monotonic() < deadline
        time.sleep(1)

    stop = valleyforge("jobs", "--address", cluster.dashboard, "stop", job_id, env=env)
    out, err = stop.communicate(timeout=120)
    assert stop.returncode == 0 and out.strip() == f"{job_id}: STOPPED", out + err
    out, err = follower.communicate(timeout=120)
    assert follower.returncode == 3 and f"job {job_id}: STOPPED" in err, out + err
    # the driver had the time to save the step in progress and say so (SIGTERM, then Ray's wait)
    assert re.search(r"stage 'pretrain' stopped at step \d+, saved in \S+; the same command resumes there", out), out
    for command, expected in ((["status", job_id], f"{job_id}: STOPPED"), (["list"], job_id)):
        listing = valleyforge("jobs", "--address", cluster.dashboard, *command, env=env)
        out, err = listing.communicate(timeout=120)
        assert listing.returncode == 0 and expected in out, out + err
