"""The driver's stage sequence: the job's MLflow parent run, then for each stage its child run,
its inputs (launch/inputs.py), its training on Ray (launch/stage_on_ray.py) and its registered
version (launch/stage_registry.py), each stage starting from the one before through the
registry; then the held-out evaluation."""

from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow import MlflowClient

from data_shards.config import as_sources
from data_shards.read.sources import data_digest
from launch.checkpoint_registry import CheckpointRegistry
from launch.config import JobConfig, save_resolved
from launch.inputs import checkpoint_to_load, put_start_in_storage, resolve_inputs, stage_job, stage_start
from launch.progress import ProgressLine
from launch.stage_on_ray import start_ray, train_on_ray
from launch.stage_registry import RegisteredStage, StageRegistry, registration_tags
from launch.stage_relay import StageRelay
from launch.stop_request import Stopped, StopRequest
from launch.tracking import RunWriter, fetch_model, git_commit, resolve_tracking_uri, ui_link, unfinished_run
from launch.tracking_queue import TrackingQueue
from launch.worker_logs import StageLogs
from trainer.config import StageConfig
from trainer.job import StageJob
from trainer.storage import Storage

EXPORT_ARTIFACT = "export"


# The experiment's kind, which MLflow UIs without 3.17's view switch follow (that one needs the
# link to ask for the model-training view: launch/tracking.ui_path).
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


class Pipeline:
    def __init__(self, cfg: JobConfig, console=print, stop: StopRequest | None = None):
        self.cfg = cfg.with_absolute_paths()
        self.console = console
        self.stop = stop or StopRequest()  # set by the driver's signals (launch/stop_request.py)
        self.out = cfg.resolved_output_dir()
        self.storage = Storage(cfg.resolved_storage())
        self.tracking_uri = resolve_tracking_uri(cfg.tracking)
        self.client = MlflowClient(self.tracking_uri)
        self.registry = StageRegistry(self.client, self.cfg, console)

    def run(self, restart: bool = False) -> list[RegisteredStage]:
        """Runs the job's stages. Run again after a stop: the unfinished MLflow run of the same
        config is continued, stages registered for the same config, data and start are reused, and
        the interrupted one resumes from its checkpoint under its own stage run. `restart`:
        everything anew, in new runs, checkpoints ignored."""
        self.shards = resolve_inputs(self.cfg)
        cfg_path = save_resolved(self.cfg, self.out / "config.resolved.yaml")
        mlflow.set_tracking_uri(self.tracking_uri)
        self.experiment_id = mlflow.set_experiment(self.cfg.tracking.experiment).experiment_id
        if EXPERIMENT_KIND not in self.client.get_experiment(self.experiment_id).tags:  # a kind set by hand stays
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        start_ray(self.cfg)
        self.stop.listen()  # SIGTERM back from ray.init
        registered: list[RegisteredStage] = []
        tags = {"config_hash": self.cfg.digest(), "git_commit": git_commit()}
        continued = (
            None if restart else unfinished_run(self.client, self.experiment_id, self.cfg.name, tags["config_hash"])
        )
        with mlflow.start_run(run_id=continued, run_name=self.cfg.name, tags=tags) as parent, _killed_when_stopped():
            mlflow.log_artifact(str(cfg_path))
            if not continued:
                mlflow.log_params(_flatten(self.cfg.model_dump(mode="json", exclude={"stages"})))
            self.console(
                f"MLflow run {parent.info.run_id}{' (continued)' if continued else ''} "
                f"({self.tracking_uri}); storage {self.storage.url}; logs in {self.out / 'logs'}"
            )
            self.console(f"UI: {ui_link(self.tracking_uri, self.experiment_id, parent.info.run_id)}")
            for index, stage in enumerate(self.cfg.stages):
                if self.stop.requested:
                    raise Stopped(f"stopped before stage {stage.name!r}", self.stop.signal)
                if restart:
                    stage = stage.model_copy(update={"resume": False})
                previous = registered[-1].model_name if registered else None
                registered.append(self.run_stage(index, stage, previous, tags, parent.info.run_id, reuse=not restart))
                last = index == len(self.cfg.stages) - 1
                if registered[-1].record and not (last and self.cfg.evaluation):  # else once evaluated
                    self.registry.settle(registered[-1])
            if self.cfg.evaluation:
                self.run_evaluation(registered[-1], parent.info.run_id)
                if registered[-1].record:
                    self.registry.settle(registered[-1])
        return registered

    def run_stage(
        self, index: int, stage: StageConfig, previous_model: str | None, tags: dict, parent_run_id: str, reuse: bool
    ) -> RegisteredStage:
        """The stage's registered version: reused when one was registered for the same config, data
        and start, else trained under the stage's (continued) child run and registered."""
        start = stage_start(self.client, stage, previous_model)
        data_hash = data_digest(as_sources(stage.train_data))
        stage_tags = {
            **tags,
            "stage": stage.name,
            "data_manifest_hash": data_hash,
            "init_from": start.source or "config",
        }
        done = self.registry.reusable(stage, stage_tags, start, data_hash) if reuse else None
        if done:
            return done
        continued = (
            unfinished_run(self.client, self.experiment_id, stage.name, tags["config_hash"], parent_run_id)
            if reuse
            else None
        )
        resume_url = checkpoint_to_load(self.client, self.cfg, stage.resume_from).url if stage.resume_from else None
        with (
            mlflow.start_run(run_id=continued, run_name=stage.name, nested=True, tags=stage_tags) as run,
            _killed_when_stopped(),
        ):
            if continued:
                self.console(f"[{stage.name}] continuing stage run {continued}")
            else:
                mlflow.log_params({**_flatten(stage.model_dump(mode="json"), "stage"), "init_from": start.description})
            init = (
                put_start_in_storage(self.client, self.cfg, self.tracking_uri, self.storage, stage.name, start.source)
                if start.source
                else None
            )
            job = stage_job(self.cfg, index, stage, self.shards[stage.name], self.storage, init, resume_url)
            export_url, chosen = self.train(job, run.info.run_id)
            with Storage(export_url).fetched() as folder:
                self.registry.retry(
                    lambda: mlflow.log_artifacts(str(folder), EXPORT_ARTIFACT), f"storing {stage.name}'s export"
                )
            if init:
                init.remove()
            return self.registry.register(stage, run.info.run_id, EXPORT_ARTIFACT, stage_tags, chosen, start, data_hash)

    def train(self, job: StageJob, run_id: str) -> tuple[str, dict]:
        """Trains the stage on Ray; where rank 0 wrote the export, and the registration tags that
        say which weights it holds."""
        writer = RunWriter(self.tracking_uri, run_id)
        logged = self.registry.retry(lambda: writer.last_step("train/loss"), "reading the stage run's logged steps")
        checkpoints = CheckpointRegistry(self.client, self.experiment_id, run_id, job.stage.name)
        self.registry.retry(checkpoints.load, "reading the stage run's recorded checkpoints")
        relay = StageRelay(
            job.stage.name,
            job.stage.steps,
            run_id,
            writer,
            StageLogs(self.out / "logs", job.stage.name),
            self.cfg.cluster.max_workers,
            TrackingQueue(self.cfg.tracking.max_outage_s, logged),
            checkpoints,
            Storage(job.checkpoint_dir),
        )
        mail = train_on_ray(self.cfg, job, run_id, self.storage, relay, self.stop)
        return mail.export, registration_tags(mail.chosen, checkpoints)

    def run_evaluation(self, stage: RegisteredStage, parent_run_id: str) -> dict:
        """Attribute accuracy by generation of the last stage's registered model, on the driver."""
        from trainer.blueprint import load_export
        from trainer.evaluation import attribute_accuracy

        uri = f"models:/{stage.model_name}@latest"
        with tempfile.TemporaryDirectory(prefix="valleyforge-eval-") as tmp:
            model, tokenizer = load_export(fetch_model(uri, self.tracking_uri, Path(tmp) / "export"))
        ev = self.cfg.evaluation
        line = ProgressLine("evaluate", 1)
        metrics = attribute_accuracy(
            model,
            tokenizer,
            ev.data,
            ev.template,
            ev.max_new_tokens,
            progress=lambda done, total: line.status(f"[evaluate] {done}/{total} clips"),
        )
        for run_id in (stage.run_id, parent_run_id):
            self.client.log_batch(
                run_id, metrics=[mlflow.entities.Metric(k, v, int(time.time() * 1000), 0) for k, v in metrics.items()]
            )
        per_attribute = ", ".join(
            f"{k.rsplit('/', 1)[1]} {v:.2f}" for k, v in metrics.items() if k.startswith("eval/attribute_accuracy/")
        )
        line.finish(
            f"{uri}: attribute accuracy {metrics['eval/attribute_accuracy']:.2f} "
            f"({per_attribute}; chance {metrics['eval/attribute_chance']:.2f})"
        )
        return metrics


@contextmanager
def _killed_when_stopped() -> Iterator[None]:
    """The active MLflow run ends KILLED, not FAILED, when the block is stopped on request."""
    try:
        yield
    except Stopped:
        mlflow.end_run("KILLED")
        raise


def _flatten(doc, prefix: str = "") -> dict:
    flat = {}
    for key, value in doc.items() if isinstance(doc, dict) else enumerate(doc):
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, (dict, list)) and value:
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat
