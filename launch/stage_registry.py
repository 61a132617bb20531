"""The model registry's side of a job's stages: a stage's version registered for the same
config, data and start is reused; a new stage's export is registered, then described and its
promoted alias decided (launch/versions.py). Each call waits out an unreachable tracking server
for up to `tracking.max_outage_s`."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from mlflow import MlflowClient

from data_shards.config import as_sources
from launch.checkpoint_registry import CheckpointRegistry
from launch.config import JobConfig
from launch.inputs import StageStart
from launch.tracking import register_export, registered_model_name, retried, reusable_version
from launch.versions import StageRecord, describe, promote
from trainer.config import StageConfig


@dataclass
class RegisteredStage:
    stage_name: str
    model_name: str  # <prefix>-<stage>
    version: str
    run_id: str
    record: StageRecord | None = None  # what its description says; None: a reused version, described already


class StageRegistry:
    def __init__(self, client: MlflowClient, cfg: JobConfig, console=print):
        self.client, self.cfg, self.console = client, cfg, console
        self.retry = partial(retried, patience_s=cfg.tracking.max_outage_s, say=console)

    def model_name(self, stage: StageConfig) -> str:
        return registered_model_name(self.cfg.tracking, stage.name)

    def reusable(self, stage: StageConfig, tags: dict, start: StageStart, data_hash: str) -> RegisteredStage | None:
        """The stage's version registered for the same config, data and start (`tags`), if any."""
        name = self.model_name(stage)
        done = reusable_version(self.client, name, tags)
        if done is None:
            return None
        self.console(
            f"[{stage.name}] reusing {name} version {done.version}: registered for the same config, data and start"
        )
        # a stop between its registration and its description left it undescribed: described now
        record = None if done.description else self._record(stage, data_hash, start, done.tags)
        return RegisteredStage(stage.name, name, str(done.version), done.run_id, record)

    def register(
        self,
        stage: StageConfig,
        run_id: str,
        artifact_path: str,
        tags: dict,
        chosen: dict,
        start: StageStart,
        data_hash: str,
    ) -> RegisteredStage:
        """A new version of the stage's model from its run's export artifact; `chosen`: the tags
        that say which weights it holds (registration_tags)."""
        name = self.model_name(stage)
        version = self.retry(
            lambda: register_export(self.client, name, run_id, artifact_path, {**tags, **chosen}), f"registering {name}"
        )
        self.console(
            f"[{stage.name}] registered {name} version {version.version} "
            f"(models:/{name}@latest): step {chosen['checkpoint_step']}, {chosen['selected_by']}; "
            f"started from {start.description}"
        )
        return RegisteredStage(
            stage.name, name, str(version.version), run_id, self._record(stage, data_hash, start, chosen)
        )

    def settle(self, stage: RegisteredStage) -> None:
        """The new version's description, from its stage run's figures, and the promoted alias."""
        metrics = self.retry(lambda: self.client.get_run(stage.run_id).data.metrics, "reading the stage run")
        self.retry(
            lambda: self.client.update_model_version(
                stage.model_name, stage.version, description=describe(stage.record, metrics)
            ),
            f"describing {stage.model_name} version {stage.version}",
        )
        alias = self.cfg.tracking.promote_alias
        if alias:
            decision = self.retry(
                lambda: promote(self.client, stage.model_name, stage.version, alias, metrics),
                f"deciding {stage.model_name}@{alias}",
            )
            self.console(f"[{stage.stage_name}] {stage.model_name}: {decision}")

    def _record(self, stage: StageConfig, data_hash: str, start: StageStart, chosen: dict) -> StageRecord:
        """What a stage's version is described with; `chosen`: its registration tags that say which
        weights it holds."""
        sources = ", ".join(f"{source.url} (weight {source.weight:g})" for source in as_sources(stage.train_data))
        return StageRecord(
            self.cfg.name,
            stage.name,
            stage.objective,
            sources,
            data_hash,
            stage.steps,
            f"step {chosen['checkpoint_step']} ({chosen['selected_by']})",
            start.description,
        )


def registration_tags(chosen: dict, checkpoints: CheckpointRegistry) -> dict:
    """The tags that say which weights an export holds, from rank 0's `chosen` (step, how chosen,
    scores, the checkpoint's URL): the step, how chosen, its eval loss and its checkpoint's logged
    model."""
    tags = {"checkpoint_step": str(chosen["step"]), "selected_by": chosen["selected_by"]}
    if "eval/loss" in chosen:
        tags["eval_loss"] = f"{chosen['eval/loss']:.6g}"
    if chosen.get("checkpoint") in checkpoints.model_ids:
        tags["checkpoint"] = f"models:/{checkpoints.model_ids[chosen['checkpoint']]}"
    return tags
