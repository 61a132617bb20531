"""`valleyforge submit --kuberay`: the RayJob and its ConfigMap, sized from `cluster`, carrying
the resolved config; a config pods could not run is refused naming the field. Where the
development setup has KubeRay v1.7.0's CRD beside the project, the manifest is checked against it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_shards.errors import ValleyForgeError
from launch.config import load_config
from launch.kuberay import rayjob_manifest, resource_name
from launch.submit import cluster_job_config

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
VALLEY = ROOT / "configs" / "valley.yaml"
VALIDATOR = ROOT.parent / "shared" / "tools" / "validate_rayjob.py"  # not part of the project
READY = ["cluster.storage=s3://bucket/runs/{name}"]


def manifest(overrides=(), **options) -> tuple[str, dict, dict]:
    cfg = cluster_job_config(load_config(VALLEY, [*READY, *overrides]))
    text = rayjob_manifest(cfg, "http://mlflow:5000", "registry.example/valleyforge:1", **options)
    config_map, rayjob = yaml.safe_load_all(text)
    return text, config_map, rayjob


def test_the_rayjob_is_sized_from_the_cluster_section_and_carries_the_config(tmp_path):
    _, config_map, rayjob = manifest(namespace="ml", workers_per_pod=4, secret="s3-credentials")
    assert config_map["kind"] == "ConfigMap" and rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"] == "valley" and rayjob["metadata"]["namespace"] == "ml"
    (tmp_path / "config.yaml").write_text(config_map["data"]["config.yaml"])
    assert load_config(tmp_path / "config.yaml") == cluster_job_config(load_config(VALLEY, READY))

    spec = rayjob["spec"]
    assert spec["entrypoint"] == "valleyforge run /etc/valleyforge/config.yaml"
    assert spec["shutdownAfterJobFinishes"] is True and spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]
    assert head["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] == "/etc/valleyforge"
    (workers,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 2  # 8 workers, 4 per pod
    (container,) = workers["template"]["spec"]["containers"]
    assert container["resources"]["limits"] == {"cpu": "32", "nvidia.com/gpu": 4}  # 4 x 8 CPUs, 4 GPUs
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"} in container["env"]
    assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]


def test_uneven_workers_fractional_cpus_and_names_kubernetes_accepts():
    _, _, rayjob = manifest(
        ["name=My_Valley.v2", "cluster.num_workers=3", "cluster.use_gpu=false", "cluster.cpus_per_worker=1.5"],
        workers_per_pod=2,
    )
    assert rayjob["metadata"]["name"] == "my-valley-v2"
    (workers,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == 2
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "3"}
    assert resource_name("x" * 60 + "-") == "x" * 47 and resource_name("___") == "valleyforge"


def test_worker_pods_drain_their_ray_node_within_the_preemption_grace_period():
    """Kubernetes stops a pod by running its preStop hook, then SIGTERM, then SIGKILL once
    terminationGracePeriodSeconds have passed since the hook began: the hook drains the pod's Ray
    node as Ray's autoscaler does on a spot reclaim, with what is left of that period as the
    deadline, and waits it out."""
    _, _, rayjob = manifest(["cluster.preemption_grace_s=90"])
    (workers,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["template"]["spec"]["terminationGracePeriodSeconds"] == 90
    (container,) = workers["template"]["spec"]["containers"]
    shell, flag, hook = container["lifecycle"]["preStop"]["exec"]["command"]
    assert (shell, flag) == ("/bin/sh", "-c") and hook.startswith("end=$(( $(date +%s) + 90 ))")
    assert "ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION" in hook
    assert '--deadline-remaining-seconds $(( end - $(date +%s) )) --node-id "$node"' in hook
    assert hook.endswith("sleep $(( end - $(date +%s) ))")
    syntax = subprocess.run(["/bin/sh", "-n", "-c", hook], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert "lifecycle" not in head["containers"][0]  # the head holds no training worker


@pytest.mark.parametrize(
    "overrides,tracking,field",
    [
        (["cluster.storage=/mnt/runs"], "http://mlflow:5000", "cluster.storage: /mnt/runs is a path"),
        ([], "sqlite:///mlflow.db", "tracking.tracking_uri: sqlite:///mlflow.db is on this machine"),
    ],
)
def test_what_pods_cannot_reach_is_refused_naming_the_field(overrides, tracking, field):
    cfg = cluster_job_config(load_config(VALLEY, [*READY, *overrides]))
    with pytest.raises(ValleyForgeError, match=field.replace(".", r"\.")):
        rayjob_manifest(cfg, tracking, "image")


@pytest.mark.skipif(not VALIDATOR.is_file(), reason="KubeRay's CRD is in the development setup only")
def test_the_manifest_fits_kuberay_v1_7_crd(tmp_path):
    text, _, _ = manifest(workers_per_pod=4, secret="s3-credentials", namespace="ml")
    (tmp_path / "rayjob.yaml").write_text(text)
    out = subprocess.run(
        [sys.executable, str(VALIDATOR), str(tmp_path / "rayjob.yaml")], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.startswith("valid:"), out.stdout + out.stderr
