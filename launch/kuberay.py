"""`valleyforge submit --kuberay`: a KubeRay RayJob (ray.io/v1) that runs a config on a Ray
cluster KubeRay creates for it and shuts down after. Two documents: a ConfigMap holding the
resolved config, mounted into the head pod, and the RayJob (head group, one worker group sized
from `cluster`, token authentication, tracking as environment, credentials from a Secret; worker
pods drain their Ray node when Kubernetes stops them)."""

from __future__ import annotations

import math
import re

import ray
import yaml

from data_shards.errors import ValleyForgeError
from launch.config import JobConfig

CONFIG_DIR = "/etc/valleyforge"
NAME_LIMIT = 47  # KubeRay derives cluster and pod names from the RayJob's


def resource_name(job_name: str) -> str:
    """A Kubernetes name (a lowercase DNS label KubeRay accepts) from the job's name."""
    name = re.sub(r"[^a-z0-9-]+", "-", job_name.lower()).strip("-")[:NAME_LIMIT].rstrip("-")
    return name or "valleyforge"


def _quantity(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{round(cpus * 1000)}m"


def _container(
    name: str, image: str, resources: dict, env: list[dict], secret: str | None, mounts_config: bool
) -> dict:
    container = {
        "name": name,
        "image": image,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "env": [dict(e) for e in env],
    }
    if secret:
        container["envFrom"] = [{"secretRef": {"name": secret}}]
    if mounts_config:
        container["volumeMounts"] = [{"name": "valleyforge-config", "mountPath": CONFIG_DIR, "readOnly": True}]
    return container


def drain_on_stop(grace_s: int) -> str:
    """A worker pod's preStop hook: drains the pod's Ray node as Ray's autoscaler does on a spot
    reclaim (reason PREEMPTION, deadline: what is left of the pod's grace period), so the ranks on
    it learn at their next step boundary, then waits out the grace period (the container's end,
    once the drained node is idle, ends the wait sooner). Kubernetes sends SIGTERM only after it."""
    node_id = (
        'python -c \'import ray; ray.init(address="auto", logging_level="ERROR"); '
        "print(ray.get_runtime_context().get_node_id())'"
    )
    return (
        f"end=$(( $(date +%s) + {grace_s} )); node=$({node_id}) && "
        f'ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --reason-message "pod $HOSTNAME is stopping" '
        f'--deadline-remaining-seconds $(( end - $(date +%s) )) --node-id "$node"; '
        f"sleep $(( end - $(date +%s) ))"
    )


def rayjob_manifest(
    cfg: JobConfig,
    tracking_uri: str,
    image: str,
    namespace: str | None = None,
    workers_per_pod: int = 1,
    secret: str | None = None,
) -> str:
    """The ConfigMap and RayJob for `cfg` (resolved as it will run), as one YAML stream.

    Pods share no disk and reach MLflow over the network: `cluster.storage` must be a URL and
    the tracking URI a server, else this says which field to set."""
    if cfg.cluster.storage is None or "://" not in cfg.cluster.storage:
        raise ValleyForgeError(
            f"cluster.storage: {cfg.cluster.storage or 'unset (the output directory)'} is a "
            f"path; KubeRay pods share no disk: set it to a URL, e.g. s3://bucket/runs/{{name}}"
        )
    if not tracking_uri.startswith(("http://", "https://", "databricks")):
        raise ValleyForgeError(
            f"tracking.tracking_uri: {tracking_uri} is on this machine; the job's driver runs in "
            f"a pod: set tracking.tracking_uri or MLFLOW_TRACKING_URI to an MLflow server the "
            f"pods reach"
        )
    if workers_per_pod < 1:
        raise ValleyForgeError(f"--workers-per-pod: {workers_per_pod} (at least 1)")
    name = resource_name(cfg.name)
    metadata = {
        "name": name,
        **({"namespace": namespace} if namespace else {}),
        "labels": {"app.kubernetes.io/name": "valleyforge", "valleyforge/job": name},
    }
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {**metadata, "name": f"{name}-config"},
        "data": {"config.yaml": cfg.to_yaml()},
    }

    cluster = cfg.cluster
    low, high = cluster.worker_range
    per_pod = min(workers_per_pod, high)
    worker_resources = {"cpu": _quantity(per_pod * cluster.cpus_per_worker)}
    if cluster.use_gpu:
        worker_resources["nvidia.com/gpu"] = per_pod
    env = [{"name": "MLFLOW_TRACKING_URI", "value": tracking_uri}]
    head = {
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},  # no training worker on the head
        "template": {
            "spec": {
                "containers": [_container("ray-head", image, {"cpu": "2", "memory": "8Gi"}, env, secret, True)],
                "volumes": [{"name": "valleyforge-config", "configMap": {"name": f"{name}-config"}}],
            }
        },
    }
    worker = _container("ray-worker", image, worker_resources, env, secret, False)
    worker["lifecycle"] = {
        "preStop": {"exec": {"command": ["/bin/sh", "-c", drain_on_stop(cluster.preemption_grace_s)]}}
    }
    replicas = math.ceil(high / per_pod)  # an elastic job may go on with fewer (as few as min's pods)
    workers = {
        "groupName": "workers",
        "replicas": replicas,
        "minReplicas": math.ceil(low / per_pod),
        "maxReplicas": replicas,
        "rayStartParams": {},
        "template": {"spec": {"terminationGracePeriodSeconds": cluster.preemption_grace_s, "containers": [worker]}},
    }
    rayjob = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": metadata,
        "spec": {
            "entrypoint": f"valleyforge run {CONFIG_DIR}/config.yaml",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 300,  # the cluster stays 5 minutes for a look at its logs
            "rayClusterSpec": {
                "rayVersion": ray.__version__,
                "authOptions": {"mode": "token"},
                "headGroupSpec": head,
                "workerGroupSpecs": [workers],
            },
        },
    }
    return yaml.safe_dump_all([config_map, rayjob], sort_keys=False)
