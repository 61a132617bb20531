"""The load of the nodes a stage trains on, under MLflow's own system-metric names (its UI's
System metrics tab charts them): each node's CPU and memory use, and each rank's GPU utilisation
and memory where the ranks have GPUs. With ranks on several nodes the names carry the node, as
MLflow's do: `system/node_1/cpu_utilization_percentage`."""

from __future__ import annotations

import socket
import time

import psutil
import torch


class SystemSampler:
    """One rank's sample of its node every `every_s` seconds (None in between)."""

    def __init__(self, every_s: float = 10.0):
        self.every_s, self.due = every_s, time.monotonic()
        psutil.cpu_percent(None)  # starts the interval the first reading covers

    def sample(self) -> dict | None:
        now = time.monotonic()
        if now < self.due:
            return None
        self.due = now + self.every_s
        memory = psutil.virtual_memory()
        gpus = []
        if torch.cuda.is_available():
            device = torch.cuda.current_device()
            free, total = torch.cuda.mem_get_info(device)
            try:
                utilization = float(torch.cuda.utilization(device))
            except (ModuleNotFoundError, RuntimeError):  # no NVML (nvidia-ml-py) to ask
                utilization = None
            gpus.append(
                {
                    "memory_usage_megabytes": (total - free) / 1e6,
                    "memory_usage_percentage": 100 * (total - free) / total,
                    "utilization_percentage": utilization,
                }
            )
        return {
            "host": socket.gethostname(),
            "cpu_utilization_percentage": psutil.cpu_percent(None),
            "system_memory_usage_megabytes": memory.used / 1e6,
            "system_memory_usage_percentage": memory.percent,
            "gpus": gpus,
        }


def system_metrics(samples: list[dict | None]) -> dict[str, float]:
    """The ranks' samples (rank order; None: not due) as metrics: a node's CPU and memory once,
    each of its ranks' GPUs as gpu_0, gpu_1, ... in rank order."""
    samples = [s for s in samples if s]
    hosts = list(dict.fromkeys(s["host"] for s in samples))
    metrics: dict[str, float] = {}
    gpu_count = dict.fromkeys(hosts, 0)
    for sample in samples:
        host = sample["host"]
        prefix = "system/" if len(hosts) == 1 else f"system/node_{hosts.index(host)}/"
        for key in ("cpu_utilization_percentage", "system_memory_usage_megabytes", "system_memory_usage_percentage"):
            metrics.setdefault(prefix + key, sample[key])
        for gpu in sample["gpus"]:
            for key, value in gpu.items():
                if value is not None:
                    metrics[f"{prefix}gpu_{gpu_count[host]}_{key}"] = value
            gpu_count[host] += 1
    return metrics
