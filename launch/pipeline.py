"""The driver: run a job's stages on Ray, one MLflow child run per stage under a parent run,
register each stage's export and start the next stage from the registry."""
from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import mlflow
import ray
from mlflow import MlflowClient
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from data_shards.config import as_sources
from data_shards.manifest import read_manifest
from data_shards.read.reader import check_enough_shards, shard_lists
from data_shards.read.stream import ShardLists
from data_shards.read.sources import data_digest
from launch.checkpoint_registry import CheckpointRegistry, checkpoint_location
from launch.config import JobConfig, save_resolved
from launch.inbox import DriverInbox, Mail
from launch.progress import ProgressLine
from launch.tracking import (RunWriter, fetch_model, git_commit, register_export, registered_model_name,
                             resolve_model_uri, resolve_tracking_uri, retried, reusable_version, ui_link,
                             unfinished_run)
from launch.tracking_queue import TrackingQueue
from launch.versions import StageRecord, describe, promote
from launch.worker import StageWorker, StorageMarker
from launch.worker_logs import StageLogs
from trainer.checkpoint_export import export_checkpoint
from trainer.config import is_checkpoint_uri
from trainer.job import StageJob
from trainer.storage import Storage

EXPORT_ARTIFACT = "export"


# The experiment's kind, which MLflow UIs without 3.17's view switch follow (that one needs the
# link to ask for the model-training view: launch/tracking.ui_path).
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


@dataclass
class RegisteredStage:
    stage: str
    name: str
    version: str
    run_id: str
    record: StageRecord | None = None  # what its description says; None: a reused version, described already


def resolve_inputs(cfg: JobConfig) -> dict[str, tuple[ShardLists, ShardLists | None, ShardLists | None]]:
    """Each stage's train, eval and probe shard lists, expanded once here for every worker; fails
    before any worker starts when a data split or init source is unusable."""
    lists = {}
    for stage in cfg.stages:
        try:
            train, evaluation, probes = stage.train_data, stage.eval_data, stage.probe_eval
            lists[stage.name] = (shard_lists(train), shard_lists(evaluation) if evaluation else None,
                                 shard_lists(probes.data) if probes else None)
            check_enough_shards(lists[stage.name][0], cfg.data_streams())
            if evaluation:  # read by each rank's DataLoader workers, on as many ranks as there may be
                check_enough_shards(lists[stage.name][1], cfg.cluster.max_workers * max(cfg.data.num_workers, 1))
        except ValueError as err:
            raise ValueError(f"stages.{stage.name}: {err}") from None
        source = stage.init_from
        if source not in ("auto", "config") and not source.startswith("models:/") and not Path(source).is_dir():
            raise ValueError(f"stages.{stage.name}.init_from: {source!r} is not auto, config, "
                             f"a models:/ URI or an export folder")
    if cfg.evaluation:
        read_manifest(cfg.evaluation.data)
    return lists


def ray_address(cfg: JobConfig) -> str | None:
    """`cluster.address`, else RAY_ADDRESS; None: an embedded Ray. The config first, as for tracking."""
    return cfg.cluster.address or os.environ.get("RAY_ADDRESS")


def start_ray(cfg: JobConfig) -> None:
    env = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(cfg.cluster.torch_threads),
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(cfg.cluster.worker_start_timeout_s)}
    env["DS_ACCELERATOR"] = "cuda" if cfg.cluster.use_gpu else "cpu"
    address = ray_address(cfg)
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False, configure_logging=False)
    else:
        needed = int(cfg.cluster.max_workers * cfg.cluster.cpus_per_worker + 0.999)
        # "local": a new embedded Ray, even where a `ray start` cluster runs on this machine
        ray.init(address="local", num_cpus=cfg.cluster.num_cpus or max(os.cpu_count() or 1, needed),
                 include_dashboard=False,
                 runtime_env={"env_vars": env}, log_to_driver=False, configure_logging=False)


class Pipeline:
    def __init__(self, cfg: JobConfig, console=print):
        self.cfg = cfg.with_absolute_paths()
        self.console = console
        self.out = cfg.resolved_output_dir()
        self.storage = Storage(cfg.resolved_storage())
        self.tracking_uri = resolve_tracking_uri(cfg.tracking)
        self.client = MlflowClient(self.tracking_uri)

    def run(self, restart: bool = False) -> list[RegisteredStage]:
        """Runs the job's stages. Run again after a stop: the unfinished MLflow run of the same
        config is continued, stages registered for the same config, data and start are reused, and
        the interrupted one resumes from its checkpoint under its own stage run. `restart`:
        everything anew, in new runs, checkpoints ignored."""
        self.shard_lists = resolve_inputs(self.cfg)
        cfg_path = save_resolved(self.cfg, self.out / "config.resolved.yaml")
        mlflow.set_tracking_uri(self.tracking_uri)
        self.experiment_id = mlflow.set_experiment(self.cfg.tracking.experiment).experiment_id
        if EXPERIMENT_KIND not in self.client.get_experiment(self.experiment_id).tags:  # a kind set by hand stays
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        start_ray(self.cfg)
        registered: list[RegisteredStage] = []
        tags = {"config_hash": self.cfg.digest(), "git_commit": git_commit()}
        continued = None if restart else unfinished_run(self.client, self.experiment_id, self.cfg.name,
                                                        tags["config_hash"])
        with mlflow.start_run(run_id=continued, run_name=self.cfg.name, tags=tags) as parent:
            mlflow.log_artifact(str(cfg_path))
            if not continued:
                mlflow.log_params(_flatten(self.cfg.model_dump(mode="json", exclude={"stages"})))
            self.console(f"MLflow run {parent.info.run_id}{' (continued)' if continued else ''} "
                         f"({self.tracking_uri}); storage {self.storage.url}; logs in {self.out / 'logs'}")
            self.console(f"UI: {ui_link(self.tracking_uri, self.experiment_id, parent.info.run_id)}")
            for index, stage in enumerate(self.cfg.stages):
                if restart:
                    stage = stage.model_copy(update={"resume": False})
                registered.append(self.run_stage(index, stage, registered[-1] if registered else None, tags,
                                                 parent.info.run_id, reuse=not restart))
                last = index == len(self.cfg.stages) - 1
                if registered[-1].record and not (last and self.cfg.evaluation):  # else once evaluated
                    self.settle(registered[-1])
            if self.cfg.evaluation:
                self.run_evaluation(registered[-1], parent.info.run_id)
                if registered[-1].record:
                    self.settle(registered[-1])
        return registered

    def settle(self, stage: RegisteredStage) -> None:
        """The new version's description, from its stage run's figures, and the promoted alias."""
        metrics = self.retried(lambda: self.client.get_run(stage.run_id).data.metrics, "reading the stage run")
        self.retried(lambda: self.client.update_model_version(stage.name, stage.version,
                                                              description=describe(stage.record, metrics)),
                     f"describing {stage.name} version {stage.version}")
        alias = self.cfg.tracking.promote_alias
        if alias:
            decision = self.retried(lambda: promote(self.client, stage.name, stage.version, alias, metrics),
                                    f"deciding {stage.name}@{alias}")
            self.console(f"[{stage.stage}] {stage.name}: {decision}")

    def init_source(self, stage, previous: RegisteredStage | None) -> tuple[str | None, str]:
        """(the stage's start: a models:/ URI pinned to a version or an export folder, None to build
        from the model config; how to describe it)."""
        source = stage.init_from
        if source == "auto":
            source = "config" if previous is None else f"models:/{previous.name}@latest"
        if source == "config":
            return None, "model config"
        if is_checkpoint_uri(source):
            return source, f"checkpoint {source}"
        if source.startswith("models:/"):
            return resolve_model_uri(self.client, source)
        return str(Path(source).absolute()), source

    def stage_init(self, stage_name: str, source: str) -> Storage:
        """The stage's starting export, put into storage once for every worker: from the registry
        (downloaded here, the only MLflow client), a recorded checkpoint (made into an export
        here) or a folder on this machine."""
        target = self.storage.child("inits", stage_name)
        if is_checkpoint_uri(source):
            with Storage(checkpoint_location(self.client, source)).fetched() as folder:
                export_checkpoint(folder, target)
            return target
        with tempfile.TemporaryDirectory(prefix="valleyforge-init-") as tmp:
            target.upload(fetch_model(source, self.tracking_uri, Path(tmp) / "export"))
        return target

    def run_stage(self, index: int, stage, previous: RegisteredStage | None, tags: dict, parent_run_id: str,
                  reuse: bool) -> RegisteredStage:
        source, init_desc = self.init_source(stage, previous)
        data_hash = data_digest(as_sources(stage.train_data))
        stage_tags = {**tags, "stage": stage.name, "data_manifest_hash": data_hash, "init_from": source or "config"}
        name = registered_model_name(self.cfg.tracking, stage.name)
        done = reusable_version(self.client, name, stage_tags) if reuse else None
        if done:
            self.console(f"[{stage.name}] reusing {name} version {done.version}: registered for the same config, "
                         f"data and start")
            # a stop between its registration and its description left it undescribed: described now
            record = None if done.description else self._record(stage, data_hash, init_desc, done.tags)
            return RegisteredStage(stage.name, name, str(done.version), done.run_id, record)
        continued = unfinished_run(self.client, self.experiment_id, stage.name, tags["config_hash"],
                                   parent_run_id) if reuse else None
        with mlflow.start_run(run_id=continued, run_name=stage.name, nested=True, tags=stage_tags) as run:
            if continued:
                self.console(f"[{stage.name}] continuing stage run {continued}")
            else:
                mlflow.log_params({**_flatten(stage.model_dump(mode="json"), "stage"), "init_from": init_desc})
            init = self.stage_init(stage.name, source) if source else None
            resume_from = checkpoint_location(self.client, stage.resume_from) if stage.resume_from else None
            job = StageJob(model=self.cfg.model, engine=self.cfg.engine,
                           data=self.cfg.data.model_copy(update={"streams": self.cfg.data_streams()}), stage=stage,
                           train_shards=self.shard_lists[stage.name][0], eval_shards=self.shard_lists[stage.name][1],
                           probe_shards=self.shard_lists[stage.name][2],
                           init_export_url=init.url if init else None,
                           export_dir=self.storage.child("exports", stage.name).url,
                           checkpoint_dir=self.storage.child("checkpoints", stage.name).url,
                           seed=self.cfg.seed + index, peak_flops_per_device=self.cfg.cluster.peak_flops_per_device,
                           resume_checkpoint_url=resume_from, micro_batches_per_step=self.cfg.micro_batches_per_step(stage))
            export_url, chosen = self._train_on_ray(job, run.info.run_id)
            export = Storage(export_url)
            with export.fetched() as folder:
                self.retried(lambda: mlflow.log_artifacts(str(folder), EXPORT_ARTIFACT), f"storing {stage.name}'s export")
            if init:
                init.remove()
            version = self.retried(lambda: register_export(self.client, name, run.info.run_id, EXPORT_ARTIFACT,
                                                           {**stage_tags, **chosen}), f"registering {name}")
            self.console(f"[{stage.name}] registered {name} version {version.version} "
                         f"(models:/{name}@latest): step {chosen['checkpoint_step']}, {chosen['selected_by']}; "
                         f"started from {init_desc}")
            return RegisteredStage(stage.name, name, str(version.version), run.info.run_id,
                                   self._record(stage, data_hash, init_desc, chosen))

    def _record(self, stage, data_hash: str, init_desc: str, chosen: dict) -> StageRecord:
        """What a stage's version is described with; `chosen`: its registration tags that say which
        weights it holds."""
        sources = ", ".join(f"{source.url} (weight {source.weight:g})" for source in as_sources(stage.train_data))
        return StageRecord(self.cfg.name, stage.name, stage.objective, sources, data_hash, stage.steps,
                           f"step {chosen['checkpoint_step']} ({chosen['selected_by']})", init_desc)

    def retried(self, call, what: str):
        """`call()` through an outage of the tracking server of up to `tracking.max_outage_s`."""
        return retried(call, what, self.cfg.tracking.max_outage_s, self.console)

    def _train_on_ray(self, job: StageJob, run_id: str) -> tuple[str, dict]:
        """Trains the stage on the Ray workers; where rank 0 wrote the export, and the tags that
        say which weights it holds (step, how chosen, the checkpoint's logged model)."""
        cluster = self.cfg.cluster
        # On the driver's node: the inbox must outlive any lost worker node (as Ray Train's controller does).
        inbox = DriverInbox.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)).remote()
        marker = None
        if self.storage.is_local:  # every worker must see it; a node that does not stops the run
            marker = StorageMarker(self.storage.url, f".node-check-{run_id}")
            self.storage.write_text(marker.name, "written by the driver; workers check they see it\n")
        ray_storage = self.storage.child("ray")
        trainer = TorchTrainer(
            StageWorker(job, run_id, inbox, marker, cluster.torch_threads),
            torch_config=TorchConfig(backend="nccl" if cluster.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cluster.num_workers, use_gpu=cluster.use_gpu,
                                         resources_per_worker={"CPU": cluster.cpus_per_worker}),
            run_config=RunConfig(name=f"{self.cfg.name}-{job.stage.name}-{int(time.time())}",
                                 storage_path=ray_storage.root,
                                 storage_filesystem=None if ray_storage.is_local else ray_storage.pyarrow_fs(),
                                 failure_config=FailureConfig(max_failures=cluster.max_failures),
                                 # a worker's print goes to its log file once, not through Train's logger too
                                 worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}),
        )
        writer = RunWriter(self.tracking_uri, run_id)
        logged = self.retried(lambda: writer.last_step("train/loss"), "reading the stage run's logged steps")
        registry = CheckpointRegistry(self.client, self.experiment_id, run_id, job.stage.name)
        self.retried(registry.load, "reading the stage run's recorded checkpoints")
        stage = StageRun(job.stage.name, job.stage.steps, run_id, writer, StageLogs(self.out / "logs", job.stage.name),
                         cluster.max_workers, TrackingQueue(self.cfg.tracking.max_outage_s, logged),
                         registry, Storage(job.checkpoint_dir))
        outcome: dict = {}
        fit = threading.Thread(target=lambda: outcome.update(result=_capture(trainer.fit)), daemon=True)
        fit.start()
        while fit.is_alive():
            stage.receive(ray.get(inbox.take.remote()))
            if stage.tracking.error is not None:  # the checkpoints keep the metrics it could not store
                raise stage.tracking.error
            inbox.stored_through.remote(stage.tracking.stored_through)  # what rank 0 no longer keeps
            fit.join(timeout=1.0)
        mail = ray.get(inbox.take.remote())
        stage.receive(mail)
        if marker:
            self.storage.remove(marker.name)
        stage.store_logs()
        _, error = outcome["result"]
        if error is not None:
            stage.line.finish("failed")
            raise StageFailed(job.stage.name, error, stage)
        if stage.tracking.error is not None:
            raise stage.tracking.error
        stage.finish()
        if mail.export is None:
            raise StageFailed(job.stage.name, RuntimeError("rank 0 reported no export"), stage)
        chosen = {"checkpoint_step": str(mail.chosen["step"]), "selected_by": mail.chosen["selected_by"]}
        if "eval/loss" in mail.chosen:
            chosen["eval_loss"] = f"{mail.chosen['eval/loss']:.6g}"
        if mail.chosen.get("checkpoint") in registry.model_ids:
            chosen["checkpoint"] = f"models:/{registry.model_ids[mail.chosen['checkpoint']]}"
        return mail.export, chosen

    def run_evaluation(self, stage: RegisteredStage, parent_run_id: str) -> dict:
        """Attribute accuracy by generation of the last stage's registered model, on the driver."""
        from trainer.blueprint import load_export
        from trainer.evaluation import attribute_accuracy

        uri = f"models:/{stage.name}@latest"
        with tempfile.TemporaryDirectory(prefix="valleyforge-eval-") as tmp:
            model, tokenizer = load_export(fetch_model(uri, self.tracking_uri, Path(tmp) / "export"))
        ev = self.cfg.evaluation
        line = ProgressLine("evaluate", 1)
        metrics = attribute_accuracy(model, tokenizer, ev.data, ev.template, ev.max_new_tokens,
                                     progress=lambda done, total: line.status(f"[evaluate] {done}/{total} clips"))
        for run_id in (stage.run_id, parent_run_id):
            self.client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, v, int(time.time() * 1000), 0)
                                                   for k, v in metrics.items()])
        per_attribute = ", ".join(f"{k.rsplit('/', 1)[1]} {v:.2f}" for k, v in metrics.items()
                                  if k.startswith("eval/attribute_accuracy/"))
        line.finish(f"{uri}: attribute accuracy {metrics['eval/attribute_accuracy']:.2f} "
                    f"({per_attribute}; chance {metrics['eval/attribute_chance']:.2f})")
        return metrics


class StageRun:
    """The driver's side of one running stage: what the workers send it goes to the console, the
    stage's MLflow run and the log folder."""

    def __init__(self, name: str, steps: int, run_id: str, run: RunWriter, logs: StageLogs, ranks: int,
                 tracking: TrackingQueue, registry: CheckpointRegistry, checkpoints: Storage):
        self.name, self.run, self.logs, self.tracking = name, run, logs, tracking
        self.registry, self.checkpoints = registry, checkpoints
        self.line = ProgressLine(name, steps)
        tracking.say = self.line.print_above
        self.latest: dict = {}
        self.placement: dict[int, tuple[str, str, int]] = {}
        self.queued_through = tracking.stored_through  # the newest step whose metrics are stored or on their way
        self.notes_seen: set[str] = set()
        logs.begin(run_id, ranks)
        tracking.put("recording the stage's checkpoints", partial(registry.sync, checkpoints))

    def receive(self, mail: Mail) -> None:
        """Takes the workers' mail: logs and notes to their files, metrics and notes to the
        tracking queue, rank 0's latest metrics to the progress line."""
        for rank, text in mail.logs:
            self.logs.append(rank, text)
        for text, artifact_file in mail.notes:
            if text in self.notes_seen:  # said again by a restarted worker group
                continue
            self.notes_seen.add(text)
            self.line.print_above(text)
            if artifact_file:
                self.tracking.put(f"storing {artifact_file}", partial(self.run.text, text + "\n", artifact_file))
        for step, metrics in mail.metrics:
            self.latest = {"step": step, **metrics}
            if step <= self.queued_through:  # sent again after a restart: logged once
                continue
            self.tracking.put(f"logging step {step}",
                              partial(self.run.metrics, metrics, step, int(time.time() * 1000)), step)
            self.queued_through = step
        for record in mail.checkpoints:
            self.line.print_above(f"[{self.name}] checkpoint at step {record.step}: {record.url}")
            self.tracking.put(f"recording checkpoint step {record.step}", partial(self.registry.record, record))
        if mail.placement != self.placement:
            self.placement = mail.placement
            self.tracking.put("tagging the placement", partial(self.run.tag, "placement", self.where()))
        waiting, waited_s = self.tracking.backlog()
        self.line.update(self.latest, f"  ({waiting} writes wait for the tracking server)" if waited_s > 10 else "")

    def where(self, ranks=None) -> str:
        """`rank 0: node 1a2b3c (host, pid 123), ...`: where the ranks ran, as far as they said."""
        return ", ".join(f"rank {r}: node {node[:8]} ({host}, pid {pid})"
                         for r, (node, host, pid) in sorted(self.placement.items())
                         if ranks is None or r in ranks)

    def store_logs(self) -> None:
        """Queues the logs after everything else, then waits until the tracking store has it all."""
        self.tracking.put("recording the stage's checkpoints", partial(self.registry.sync, self.checkpoints))
        for file in self.logs.files():
            self.tracking.put(f"storing {file.name}", partial(self.run.artifact, file, "logs"))
        self.tracking.close()

    def finish(self) -> None:
        self.line.finish(f"{self.latest.get('step', 0)} steps, final loss "
                         f"{self.latest.get('train/loss', float('nan')):.3f}")


class StageFailed(RuntimeError):
    """A stage's workers failed: names the failing rank(s) and quotes the end of their logs."""

    def __init__(self, stage_name: str, error: BaseException, stage: StageRun):
        failures = getattr(error, "worker_failures", None) or {}
        ranks = sorted(failures)
        cause = _root_message(failures[ranks[0]]) if ranks else _root_message(error)
        where = f" on {stage.where(ranks) or 'rank(s) ' + str(ranks)}" if ranks else ""
        lines = [f"stage {stage_name!r} failed{where}: {cause}"]
        for rank in ranks[:2]:
            tail = stage.logs.tail(rank)
            if tail:
                lines.append(f"  last lines of {stage.logs.path(rank)}:")
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


def _flatten(doc, prefix: str = "") -> dict:
    flat = {}
    for key, value in (doc.items() if isinstance(doc, dict) else enumerate(doc)):
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, (dict, list)) and value:
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat
