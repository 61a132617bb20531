"""One stage on Ray: starting or joining Ray, the TorchTrainer (scaling, failure and storage
config) over the stage's workers, the inbox they post to, and the loop that hands their mail to
the stage's relay until the stage ends."""

from __future__ import annotations

import os
import threading
import time

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from data_shards.errors import ValleyForgeError
from launch.config import JobConfig
from launch.inbox import DriverInbox, Mail
from launch.stage_relay import StageRelay
from launch.stop_request import Stopped, StopRequest
from launch.worker import StageWorker, StorageMarker
from trainer.checkpoint import tag_name
from trainer.job import StageJob
from trainer.storage import Storage


def ray_address(cfg: JobConfig) -> str | None:
    """`cluster.address`, else RAY_ADDRESS; None: an embedded Ray. The config first, as for tracking."""
    return cfg.cluster.address or os.environ.get("RAY_ADDRESS")


def start_ray(cfg: JobConfig) -> None:
    env = {
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(cfg.cluster.torch_threads),
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(cfg.cluster.worker_start_timeout_s),
    }
    env["DS_ACCELERATOR"] = "cuda" if cfg.cluster.use_gpu else "cpu"
    address = ray_address(cfg)
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False, configure_logging=False)
    else:
        needed = int(cfg.cluster.max_workers * cfg.cluster.cpus_per_worker + 0.999)
        # "local": a new embedded Ray, even where a `ray start` cluster runs on this machine
        ray.init(
            address="local",
            num_cpus=cfg.cluster.num_cpus or max(os.cpu_count() or 1, needed),
            include_dashboard=False,
            runtime_env={"env_vars": env},
            log_to_driver=False,
            configure_logging=False,
        )


def train_on_ray(
    cfg: JobConfig, job: StageJob, run_id: str, storage: Storage, relay: StageRelay, stop: StopRequest
) -> Mail:
    """Trains the stage on Ray workers, relaying their mail meanwhile; returns the last mail, which
    says where rank 0 wrote the export and which weights it holds. A `stop` requested meanwhile
    is passed on to the workers; a stage they stop early raises Stopped once its mail is stored."""
    cluster = cfg.cluster
    # On the driver's node: the inbox must outlive any lost worker node (as Ray Train's controller does).
    inbox = DriverInbox.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    ).remote()
    marker = None
    if storage.is_local:  # every worker must see it; a node that does not stops the run
        marker = StorageMarker(storage.url, f".node-check-{run_id}")
        storage.write_text(marker.name, "written by the driver; workers check they see it\n")
    ray_storage = storage.child("ray")
    trainer = TorchTrainer(
        StageWorker(job, run_id, inbox, marker, cluster.torch_threads),
        torch_config=TorchConfig(backend="nccl" if cluster.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cluster.num_workers,
            use_gpu=cluster.use_gpu,
            resources_per_worker={"CPU": cluster.cpus_per_worker},
            elastic_resize_monitor_interval_s=cluster.resize_check_s,
        ),
        run_config=RunConfig(
            name=f"{cfg.name}-{job.stage.name}-{int(time.time())}",
            storage_path=ray_storage.root,
            storage_filesystem=None if ray_storage.is_local else ray_storage.pyarrow_fs(),
            failure_config=FailureConfig(max_failures=cluster.max_failures),
            # a worker's print goes to its log file once, not through Train's logger too
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )
    outcome: dict = {}
    stop_passed_on = False
    fit = threading.Thread(target=lambda: outcome.update(result=_capture(trainer.fit)), daemon=True)
    fit.start()
    while fit.is_alive():
        if stop.requested and not stop_passed_on:
            inbox.request_stop.remote()
            stop_passed_on = True
        relay.receive(ray.get(inbox.take.remote()))
        if relay.tracking.error is not None:  # the checkpoints keep the metrics it could not store
            raise relay.tracking.error
        inbox.stored_through.remote(relay.tracking.stored_through)  # what rank 0 no longer keeps
        fit.join(timeout=1.0)
    mail = ray.get(inbox.take.remote())
    relay.receive(mail)
    if marker:
        storage.remove(marker.name)
    relay.store_logs()
    _, error = outcome["result"]
    if error is not None:
        relay.line.finish("failed")
        raise StageFailed(job.stage.name, error, relay)
    if relay.tracking.error is not None:
        raise relay.tracking.error
    if mail.stopped_at is not None:
        relay.line.finish(f"stopped at step {mail.stopped_at}")
        saved = Storage(job.checkpoint_dir).child(tag_name(mail.stopped_at)).url
        raise Stopped(f"stage {job.stage.name!r} stopped at step {mail.stopped_at}, saved in {saved}", stop.signal)
    relay.finish()
    if mail.export is None:
        raise StageFailed(job.stage.name, RuntimeError("rank 0 reported no export"), relay)
    return mail


class StageFailed(ValleyForgeError):
    """A stage's workers failed: names the failing rank(s) and quotes the end of their logs (the
    workers' tracebacks are in those logs)."""

    exit_code = 1

    def __init__(self, stage_name: str, error: BaseException, relay: StageRelay):
        failures = getattr(error, "worker_failures", None) or {}
        ranks = sorted(failures)
        cause = _root_message(failures[ranks[0]]) if ranks else _root_message(error)
        where = f" on {relay.where(ranks) or 'rank(s) ' + str(ranks)}" if ranks else ""
        lines = [f"stage {stage_name!r} failed{where}: {cause}"]
        for rank in ranks[:2]:
            tail = relay.logs.tail(rank)
            if tail:
                lines.append(f"  last lines of {relay.logs.path(rank)}:")
                lines += [f"    {line}" for line in tail]
        super().__init__("\n".join(lines))


def _root_message(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


def _capture(fn):
    try:
        return fn(), None
    except BaseException as err:  # noqa: BLE001 - reported on the driver thread
        return None, err
