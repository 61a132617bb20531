"""MLflow: where runs go, the driver's metric logging, and the model registry."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric

from launch.config import TrackingConfig


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """The config's `tracking_uri` when set, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in
    the working directory (what `mlflow ui` opens by default), made absolute so workers elsewhere
    agree. The same rule as `cluster.address` over RAY_ADDRESS: the config first."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunWriter:
    """Writes into one MLflow run: `writer(metrics, step)`, text, files, tags."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def __call__(self, metrics: dict, step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def artifact(self, path: Path, folder: str) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)


def registered_model_name(cfg: TrackingConfig, stage_name: str) -> str:
    return f"{cfg.registered_model_prefix}-{stage_name}"


def register_export(client: MlflowClient, name: str, run_id: str, artifact_path: str, tags: dict):
    """A new version of `name` from the run's artifact folder. `models:/NAME@latest` resolves to
    the newest version: MLflow reserves the alias `latest` for exactly that."""
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - MLflow raises RESOURCE_DOES_NOT_EXIST as a generic exception
        client.create_registered_model(name, description="ValleyForge stage exports")
    return client.create_model_version(name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id, tags=tags)


REUSE_KEYS = ("stage", "config_hash", "data_manifest_hash", "init_from")  # what makes a stage's version reusable


def reusable_version(client: MlflowClient, name: str, tags: dict):
    """The newest version of `name` registered for the same stage, config, data and start; None
    when there is none (or no such model)."""
    versions = client.search_model_versions(f"name = '{name}'")
    matching = [v for v in versions if all(v.tags.get(k) == tags[k] for k in REUSE_KEYS)]
    return max(matching, key=lambda v: int(v.version), default=None)


def resolve_model_uri(client: MlflowClient, uri: str) -> tuple[str, str]:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` -> (pinned `models:/NAME/VERSION`, description)."""
    body = uri.removeprefix("models:/")
    if "@" in body:
        name, alias = body.split("@", 1)
        version = client.get_model_version_by_alias(name, alias).version
    else:
        name, _, version = body.partition("/")
        client.get_model_version(name, version)
    return f"models:/{name}/{version}", f"{uri} -> version {version}"


def fetch_model(model: str, tracking_uri: str, dst: Path | None = None) -> Path:
    """A local export folder for `model`: the folder itself, or a registry URI downloaded from
    `tracking_uri`'s registry (into `dst` when given, else a new temporary folder)."""
    if not model.startswith("models:/"):
        folder = Path(model)
        if not folder.is_dir():
            raise ValueError(f"{model}: not an export folder or a models:/ URI")
        return folder
    import mlflow
    from mlflow.exceptions import MlflowException
    try:
        pinned, _ = resolve_model_uri(MlflowClient(tracking_uri), model)
        mlflow.set_tracking_uri(tracking_uri)
        return Path(mlflow.artifacts.download_artifacts(pinned, dst_path=str(dst) if dst else None))
    except MlflowException as err:
        raise ValueError(f"{model}: {err.message} (tracking URI {tracking_uri})") from err
