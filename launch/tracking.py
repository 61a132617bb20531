"""MLflow: where runs go, the driver's metric logging, and the model registry."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from data_shards.errors import ValleyForgeError
from launch.config import TrackingConfig


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """The config's `tracking_uri` when set, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in
    the working directory (what `mlflow ui` opens by default), made absolute so workers elsewhere
    agree. The same rule as `cluster.address` over RAY_ADDRESS: the config first."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# error codes of a request the server understood and refused: retrying cannot help
_REFUSED = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "CUSTOMER_UNAUTHORIZED",
    "BAD_REQUEST",
    "INVALID_STATE",
}


class TrackingUnavailable(ValleyForgeError):
    """The tracking server stayed unreachable longer than `tracking.max_outage_s`."""

    exit_code = 1


def is_outage(error: BaseException) -> bool:
    """Whether `error` says the tracking store could not be reached or failed inside (worth
    waiting out), rather than that it refused the request."""
    if isinstance(error, MlflowException):
        return error.error_code not in _REFUSED
    return isinstance(error, OSError)  # requests' connection errors and timeouts are OSErrors


def retried(call, what: str, patience_s: float, say=print, pause_s: float = 5.0):
    """`call()`, again and again through an outage of the tracking server for up to `patience_s`
    (said once when it starts and once when it ends); a refused request raises at once."""
    gave_up_at = None
    while True:
        try:
            result = call()
        except Exception as err:  # noqa: BLE001 - sorted by is_outage
            if not is_outage(err):
                raise
            now = time.monotonic()
            if gave_up_at is None:
                gave_up_at = now + patience_s
                say(
                    f"tracking server unreachable while {what}: {_first_line(err)}; "
                    f"retrying for up to {patience_s:.0f} s (tracking.max_outage_s)"
                )
            if now >= gave_up_at:
                raise TrackingUnavailable(
                    f"tracking server unreachable for {patience_s:.0f} s (tracking.max_outage_s) "
                    f"while {what}: {_first_line(err)}"
                ) from err
            time.sleep(pause_s)
            continue
        if gave_up_at is not None:
            say(f"tracking server reachable again: {what} done")
        return result


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


class RunWriter:
    """Writes into one MLflow run: metrics, text, files, tags."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def metrics(self, metrics: dict, step: int, timestamp_ms: int) -> None:
        """One step's metrics. A fixed timestamp makes a retry of a write that did arrive a
        duplicate the store drops, not a second point."""
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items()]
        )

    def last_step(self, key: str) -> int:
        """The newest step logged for `key`; -1 when none is."""
        return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)

    def text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def artifact(self, path: Path, folder: str) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)


def ui_path(experiment_id: str, run_id: str | None = None, tab: str | None = None) -> str:
    """An experiment's page in the MLflow UI, or one of its runs' (after the server's address), in
    the model-training view: MLflow 3's UI opens experiments in its GenAI view unless the link says
    otherwise (the experiment's kind tag counts only where the UI's view switch is off)."""
    path = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "") + (f"/{tab}" if tab else "")
    return f"{path}?workflowType=machine_learning"


def ui_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where to open a run: the tracking server's page, or the path to open in `mlflow ui`."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{ui_path(experiment_id, run_id)}"
    return f"`mlflow ui` + /{ui_path(experiment_id, run_id)}"


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


def unfinished_run(
    client: MlflowClient, experiment_id: str, run_name: str, config_hash: str, parent_run_id: str | None = None
) -> str | None:
    """The newest run named `run_name` for the config `config_hash` that did not finish: a child of
    `parent_run_id`, or a top-level run when that is None. None when there is none."""
    query = (
        f"attributes.run_name = '{run_name}' and tags.config_hash = '{config_hash}' and attributes.status != 'FINISHED'"
    )
    if parent_run_id:
        query += f" and tags.mlflow.parentRunId = '{parent_run_id}'"
    runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"])
    runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_run_id]
    return runs[0].info.run_id if runs else None


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
            raise ValleyForgeError(f"{model}: not an export folder or a models:/ URI")
        return folder
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        pinned, _ = resolve_model_uri(MlflowClient(tracking_uri), model)
        mlflow.set_tracking_uri(tracking_uri)
        return Path(mlflow.artifacts.download_artifacts(pinned, dst_path=str(dst) if dst else None))
    except MlflowException as err:
        raise ValleyForgeError(f"{model}: {err.message} (tracking URI {tracking_uri})") from err
