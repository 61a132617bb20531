"""MLflow as the checkpoint registry: every checkpoint of a stage is a logged model of its stage
run, `valleyforge checkpoints` lists them, `register: best` registers the one with the lowest
eval loss (kept in storage for that), `resume_from` continues another run from any kept one, and
`init_from` starts a stage from one's weights."""

import os
import subprocess
import sys

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from mlflow import MlflowClient
from safetensors.torch import load_file
from test_worker_loss import one_stage

from data_shards.errors import ValleyForgeError
from launch.checkpoint_registry import KEPT, REMOVED, recorded_checkpoints
from launch.pipeline import Pipeline

pytestmark = pytest.mark.ray
STEPS = 5


def best_stage(synth_data, out, name, *overrides):
    return one_stage(
        synth_data,
        out,
        name,
        STEPS,
        (
            f"stages.pretrain.eval_data={synth_data}/captions/heldout",
            "stages.pretrain.eval_batches=1",
            "stages.pretrain.checkpoint_every=1",
            "stages.pretrain.register=best",
            *overrides,
        ),
    )


def test_checkpoints_are_recorded_listed_registered_by_eval_loss_and_resumable(
    ray_local, synth_data, tmp_path, monkeypatch
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (first,) = Pipeline(best_stage(synth_data, tmp_path / "a", "best"), console=lambda _: None).run()
    client = MlflowClient(uri)
    run = client.get_run(first.run_id)
    eval_losses = {m.step: m.value for m in client.get_metric_history(first.run_id, "eval/loss")}
    assert sorted(eval_losses) == list(range(1, STEPS + 1))  # evaluated at every checkpoint
    best = min(sorted(eval_losses), key=lambda step: eval_losses[step])

    records = recorded_checkpoints(client, run.info.experiment_id, first.run_id)
    assert [int(m.params["step"]) for m in records] == list(range(1, STEPS + 1))
    kept = {STEPS - 1, STEPS, best}  # the newest two, and the best until it is registered
    for model in records:
        step = int(model.params["step"])
        assert model.tags["state"] == (KEPT if step in kept else REMOVED), step
        assert float(model.params["eval_loss"]) == pytest.approx(eval_losses[step], rel=1e-5)
        assert model.params["location"] == str(tmp_path / "a" / "checkpoints" / "pretrain" / f"step-{step:08d}")
    held = next(m for m in records if int(m.params["step"]) == best)
    version = client.get_model_version(first.model_name, first.version)
    assert version.tags["checkpoint_step"] == str(best) and version.tags["selected_by"] == "lowest eval/loss"
    assert version.tags["checkpoint"] == f"models:/{held.model_id}"

    # The export holds the best checkpoint's weights.
    weights = get_fp32_state_dict_from_zero_checkpoint(
        str(tmp_path / "a" / "checkpoints" / "pretrain"), tag=f"step-{best:08d}"
    )
    exported = load_file(tmp_path / "a" / "exports" / "pretrain" / "projector" / "model.safetensors")
    for key, value in exported.items():
        torch.testing.assert_close(value, weights[f"projector.{key}"])

    listing = subprocess.run(
        [sys.executable, "-m", "launch.cli", "checkpoints", f"models:/{first.model_name}@latest"],
        capture_output=True,
        text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
    )
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0] == f"stage run {first.run_id} (pretrain): {STEPS} checkpoint(s) recorded"
    marked = [line for line in lines if "<-" in line]
    assert len(marked) == 1 and marked[0].split()[0] == str(best) and f"models:/{held.model_id}" in marked[0]
    assert f"{first.model_name} version 1 (lowest eval/loss)" in marked[0]

    # Another run continues from a recorded checkpoint: step STEPS as the first run trained it. Its
    # files lie in the first job's storage: loaded only once the config names that folder.
    source = next(m for m in records if int(m.params["step"]) == STEPS - 1)
    resume = f"stages.pretrain.resume_from=models:/{source.model_id}"
    with pytest.raises(
        ValleyForgeError, match="outside cluster.storage .* add that folder to cluster.checkpoint_sources"
    ):
        Pipeline(best_stage(synth_data, tmp_path / "refused", "refused", resume), console=lambda _: None).run()
    first_storage = f"cluster.checkpoint_sources=[{tmp_path / 'a'}]"
    (second,) = Pipeline(
        best_stage(synth_data, tmp_path / "b", "resumed", resume, first_storage), console=lambda _: None
    ).run()
    first_losses = {m.step: m.value for m in client.get_metric_history(first.run_id, "train/loss")}
    second_losses = {m.step: m.value for m in client.get_metric_history(second.run_id, "train/loss")}
    assert list(second_losses) == [STEPS]
    assert second_losses[STEPS] == pytest.approx(first_losses[STEPS], rel=1e-5)

    # A stage that starts from a recorded checkpoint: its frozen projector is that checkpoint's.
    (third,) = Pipeline(
        best_stage(
            synth_data,
            tmp_path / "c",
            "started",
            "stages.pretrain.register=last",
            "stages.pretrain.checkpoint_every=0",
            "stages.pretrain.trainable=[llm]",
            "stages.pretrain.steps=1",
            f"stages.pretrain.init_from=models:/{held.model_id}",
            first_storage,
        ),
        console=lambda _: None,
    ).run()
    assert client.get_run(third.run_id).data.params["init_from"] == f"checkpoint models:/{held.model_id}"
    started = load_file(tmp_path / "c" / "exports" / "pretrain" / "projector" / "model.safetensors")
    for key, value in started.items():
        torch.testing.assert_close(value, weights[f"projector.{key}"])
