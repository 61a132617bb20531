"""MLflow as the checkpoint registry: each checkpoint of a stage is an MLflow logged model of the
stage run (`models:/m-...`, an external model: its files stay in `cluster.storage`), with the
step, location, train loss and latest eval loss as parameters and a `state` tag saying whether
its files are still in storage."""

from __future__ import annotations

from mlflow import MlflowClient

from data_shards.errors import ValleyForgeError
from trainer.checkpoint import CheckpointRecord, complete_tags
from trainer.storage import Storage

MODEL_TYPE = "valleyforge-checkpoint"
KEPT, REMOVED = "in storage", "removed"


def recorded_checkpoints(client: MlflowClient, experiment_id: str, run_id: str) -> list:
    """The stage run's recorded checkpoints (MLflow LoggedModel), by step."""
    models, token = [], None
    while True:
        page = client.search_logged_models(
            [experiment_id], filter_string=f"source_run_id = '{run_id}'", max_results=100, page_token=token
        )
        models += [m for m in page if m.model_type == MODEL_TYPE]
        token = page.token
        if not token:
            return sorted(models, key=lambda m: int(m.params["step"]))


class CheckpointRegistry:
    """Records one stage run's checkpoints; every method is one idempotent tracking write."""

    def __init__(self, client: MlflowClient, experiment_id: str, run_id: str, stage: str):
        self.client, self.experiment_id, self.run_id, self.stage = client, experiment_id, run_id, stage
        self.model_ids: dict[str, str] = {}  # checkpoint URL -> its logged model's id
        self.states: dict[str, str] = {}  # checkpoint URL -> KEPT or REMOVED

    def load(self) -> None:
        """What earlier drivers recorded for this stage run."""
        for model in recorded_checkpoints(self.client, self.experiment_id, self.run_id):
            self.model_ids[model.params["location"]] = model.model_id
            self.states[model.params["location"]] = model.tags.get("state")

    def record(self, record: CheckpointRecord) -> None:
        if record.url in self.model_ids:
            self._set_state(record.url, KEPT)  # saved again after a restart
        else:
            params = {
                "step": str(record.step),
                "location": record.url,
                **{key.replace("/", "_"): f"{value:.6g}" for key, value in record.scores.items()},
                **({"saved_for": record.why} if record.why else {}),
            }
            model = self.client.create_logged_model(
                self.experiment_id,
                name=f"{self.stage}-step-{record.step:08d}",
                source_run_id=self.run_id,
                params=params,
                tags={"state": KEPT},
                model_type=MODEL_TYPE,
            )
            self.client.finalize_logged_model(model.model_id, "READY")
            self.model_ids[record.url], self.states[record.url] = model.model_id, KEPT
        for url in record.removed:
            self._set_state(url, REMOVED)

    def sync(self, storage: Storage) -> None:
        """Makes the records agree with the stage's checkpoint folder: complete tags a stopped driver
        never recorded are recorded, recorded ones no longer there are marked removed."""
        present = {storage.child(tag).url: mark for tag, mark in complete_tags(storage).items()}
        for url, mark in present.items():
            if self.states.get(url) != KEPT:
                scores = {k: v for k, v in mark.items() if k != "step"}
                self.record(CheckpointRecord(url, mark["step"], scores, []))
        for url in set(self.model_ids) - set(present):
            self._set_state(url, REMOVED)

    def _set_state(self, url: str, state: str) -> None:
        if url in self.model_ids and self.states[url] != state:
            self.client.set_logged_model_tags(self.model_ids[url], {"state": state})
            self.states[url] = state


def checkpoint_location(client: MlflowClient, uri: str) -> str:
    """The storage URL of the recorded checkpoint `models:/m-...`; refuses anything else, or one
    whose files were removed."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_logged_model(uri.removeprefix("models:/"))
    except MlflowException as err:
        raise ValleyForgeError(f"{uri}: no such recorded checkpoint ({err.message})") from None
    if model.model_type != MODEL_TYPE:
        raise ValleyForgeError(f"{uri}: a logged model but not a checkpoint (`valleyforge checkpoints` lists them)")
    if model.tags.get("state") != KEPT:
        raise ValleyForgeError(
            f"{uri}: step {model.params['step']}'s files were removed from storage ({model.params['location']})"
        )
    return model.params["location"]


def checkpoint_table(client: MlflowClient, ref: str) -> list[str]:
    """`valleyforge checkpoints REF`: the recorded checkpoints of a stage run (its id), or of the
    run a registered version (`models:/NAME/VERSION`, `models:/NAME@ALIAS`) came from, marking
    the one the version holds."""
    from mlflow.exceptions import MlflowException

    from launch.tracking import resolve_model_uri

    version = None
    try:
        if ref.startswith("models:/"):
            pinned, _ = resolve_model_uri(client, ref)
            name, number = pinned.removeprefix("models:/").split("/")
            version = client.get_model_version(name, number)
            run = client.get_run(version.run_id)
        else:
            run = client.get_run(ref)
    except MlflowException as err:
        raise ValleyForgeError(f"{ref}: {err.message}") from None
    models = recorded_checkpoints(client, run.info.experiment_id, run.info.run_id)
    lines = [f"stage run {run.info.run_id} ({run.info.run_name}): {len(models)} checkpoint(s) recorded"]
    if not models:
        return lines
    lines.append(f"{'step':>8}  {'train loss':>10}  {'eval loss':>9}  {'state':<10}  {'checkpoint':<42}  location")
    for model in models:
        p = model.params
        held = version is not None and version.tags.get("checkpoint") == f"models:/{model.model_id}"
        lines.append(
            f"{p['step']:>8}  {p.get('train_loss', '-'):>10}  {p.get('eval_loss', '-'):>9}  "
            f"{model.tags.get('state', '?'):<10}  {'models:/' + model.model_id:<42}  {p['location']}"
            + (f"   <- {version.name} version {version.version} ({version.tags.get('selected_by')})" if held else "")
        )
    return lines
