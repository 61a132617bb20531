"""The demo's three stages end to end on Ray + MLflow (a contrastive one, then two language-modelling
ones): runs, metrics, registered versions, each stage starting from the one before through the
registry, and a registry round trip with identical weights."""

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from launch.config import load_config
from launch.pipeline import Pipeline
from launch.tracking import register_export, resolve_model_uri
from trainer.blueprint import blueprint_from_config, build_model, fill_weights, load_export

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.fixture()
def tracking_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.mark.ray
def test_stages_register_and_chain_through_the_registry(ray_local, synth_data, tmp_path, tracking_uri):
    overrides = [
        f"output_dir={tmp_path}/run",
        f"model.word_vocab={synth_data}/vocab.txt",
        "model.num_frames=4",
        "data.micro_batch_size=4",
        "tracking.registered_model_prefix=t",
        "tracking.promote_alias=champion",
    ]
    for stage, data in (("contrastive", "captions"), ("pretrain", "captions"), ("instruct", "instruct")):
        overrides += [
            f"stages.{stage}.train_data={synth_data}/{data}/train",
            f"stages.{stage}.eval_data={synth_data}/{data}/heldout",
            f"stages.{stage}.steps=3",
            f"stages.{stage}.eval_every=2",
            f"stages.{stage}.eval_batches=1",
        ]
    overrides.append(f"evaluation.data={synth_data}/instruct/heldout")
    # pretrain reads a weighted mixture of two sources; instruct checkpoints
    overrides += [
        f"stages.pretrain.train_data=[{{url: {synth_data}/captions/train, weight: 0.8}}, "
        f"{{url: '{synth_data}/instruct/train/shard-*.tar', weight: 0.2}}]",
        "stages.instruct.checkpoint_every=2",
    ]
    cfg = load_config(DEMO, overrides)
    registered = Pipeline(cfg, console=lambda _: None).run()

    client = MlflowClient(tracking_uri)
    assert [(r.model_name, r.version) for r in registered] == [
        ("t-contrastive", "1"),
        ("t-pretrain", "1"),
        ("t-instruct", "1"),
    ]
    contrastive_run, pretrain_run, instruct_run = (client.get_run(r.run_id) for r in registered)
    for run in (contrastive_run, pretrain_run, instruct_run):
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert [m.step for m in history] == [1, 2, 3]
        for key in (
            "train/lr",
            "train/grad_norm",
            "train/tokens_per_s",
            "train/samples_per_s",
            "eval/loss",
            "data/skip_fraction",
            "train/visual_tokens_per_sample",
            "train/model_tflops_per_s_per_device",
            "train/data_wait_fraction",
            "system/peak_rss_gb",
            "system/cpu_utilization_percentage",
            "system/system_memory_usage_megabytes",
        ):
            assert key in run.data.metrics, key
        table = client.download_artifacts(run.info.run_id, "trainable_parameters.txt", str(tmp_path))
        assert Path(table).read_text().splitlines()[0].split() == ["module", "parameters", "trainable", "lr"]
        parent_id = run.data.tags["mlflow.parentRunId"]
    assert client.get_run(parent_id).data.tags["config_hash"] == cfg.digest()
    assert "config.resolved.yaml" in [a.path for a in client.list_artifacts(parent_id)]
    assert instruct_run.data.params["init_from"] == "models:/t-pretrain@latest -> version 1"
    assert pretrain_run.data.params["init_from"] == "models:/t-contrastive@latest -> version 1"
    for name in (
        "train/logit_scale",
        "eval/retrieval/video_to_text_r1",
        "eval/retrieval/video_to_text_r5",
        "eval/retrieval/text_to_video_r1",
        "eval/retrieval/text_to_video_r5",
    ):
        assert name in contrastive_run.data.metrics, name
    # the contrastive stage trained the vision tower, and the next stage started from it
    contrastive, _ = load_export(tmp_path / "run" / "exports" / "contrastive")
    pretrained, _ = load_export(tmp_path / "run" / "exports" / "pretrain")
    initial = build_model(blueprint_from_config(cfg.model))
    fill_weights(initial, blueprint_from_config(cfg.model), cfg.model.init_std, cfg.seed)
    for key, value in contrastive.vision.state_dict().items():
        assert torch.equal(pretrained.vision.state_dict()[key], value), key
    assert any(not torch.equal(initial.vision.state_dict()[k], v) for k, v in contrastive.vision.state_dict().items())
    checkpoints = tmp_path / "run" / "checkpoints" / "instruct"
    assert (checkpoints / "latest").read_text() == "step-00000003"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000002", "step-00000003"]
    for key in ("eval/attribute_accuracy", "eval/attribute_accuracy/colour", "eval/attribute_chance"):
        assert key in instruct_run.data.metrics, key

    version = client.get_model_version("t-instruct", "1")
    assert version.tags["stage"] == "instruct" and version.tags["config_hash"] == cfg.digest()
    assert len(version.tags["data_manifest_hash"]) == 64 and version.tags["git_commit"]
    # the experiment opens in the UI's model-training view; each version describes itself
    assert (
        client.get_experiment(contrastive_run.info.experiment_id).tags["mlflow.experimentKind"]
        == "custom_model_development"
    )
    description = version.description.splitlines()
    assert description[0] == "**demo**, stage `instruct` (language_modeling)"
    assert description[2] == "- steps: 3; weights of step 3 (last step)"
    assert description[3].startswith("- final losses: train/loss ") and ", eval/loss " in description[3]
    assert "eval/attribute_accuracy " in description[4]
    assert description[5] == "- started from: models:/t-pretrain@latest -> version 1"
    assert "eval/retrieval/video_to_text_r1" in client.get_model_version("t-contrastive", "1").description
    # the first evaluated version of each stage takes the promoted alias
    for name, metric in (
        ("t-contrastive", "eval/retrieval/video_to_text_r1"),
        ("t-pretrain", "eval/loss"),
        ("t-instruct", "eval/attribute_accuracy"),
    ):
        assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
        assert (
            client.get_model_version(name, "1")
            .tags["promotion"]
            .startswith(f"champion -> version 1, the first evaluated ({metric} ")
        )

    # Registry round trip: resolve the alias, download, load: identical to what the workers exported.
    pinned, _ = resolve_model_uri(client, "models:/t-instruct@latest")
    downloaded = mlflow.artifacts.download_artifacts(pinned, dst_path=str(tmp_path / "dl"))
    from_registry, _ = load_export(downloaded)
    from_workers, _ = load_export(tmp_path / "run" / "exports" / "instruct")
    registry_state, worker_state = from_registry.state_dict(), from_workers.state_dict()
    assert registry_state.keys() == worker_state.keys()
    assert all(torch.equal(registry_state[k], worker_state[k]) for k in worker_state)

    # A stop between registering a version and describing it, as the registry would be left:
    pretrain_description = client.get_model_version("t-pretrain", "1").description
    client.update_model_version("t-pretrain", "1", description="")
    client.delete_model_version_tag("t-pretrain", "1", "promotion")
    client.delete_registered_model_alias("t-pretrain", "champion")
    # Run again: both stages are registered for this config, data and start: reused, not retrained;
    # the undescribed one described and its alias decided now.
    said = []
    again = Pipeline(cfg, console=said.append).run()
    assert client.get_model_version("t-pretrain", "1").description == pretrain_description
    assert client.get_model_version("t-pretrain", "1").tags["promotion"].startswith("champion -> version 1, the first")
    assert str(client.get_model_version_by_alias("t-pretrain", "champion").version) == "1"
    assert [(r.model_name, r.version, r.run_id) for r in again] == [
        (r.model_name, r.version, r.run_id) for r in registered
    ]
    assert [line for line in said if "reusing" in line] == [
        "[contrastive] reusing t-contrastive version 1: registered for the same config, data and start",
        "[pretrain] reusing t-pretrain version 1: registered for the same config, data and start",
        "[instruct] reusing t-instruct version 1: registered for the same config, data and start",
    ]
    # --restart: trained anew, under new runs, from step 1 (the checkpoints are ignored)
    restarted = Pipeline(cfg, console=lambda _: None).run(restart=True)
    assert [(r.model_name, r.version) for r in restarted] == [
        ("t-contrastive", "2"),
        ("t-pretrain", "2"),
        ("t-instruct", "2"),
    ]
    assert not {r.run_id for r in restarted} & {r.run_id for r in registered}
    assert [m.step for m in client.get_metric_history(restarted[2].run_id, "train/loss")] == [1, 2, 3]
    assert client.get_model_version("t-instruct", "2").tags["init_from"] == "models:/t-pretrain/2"
    for name in ("t-contrastive", "t-pretrain", "t-instruct"):  # the alias moved only where version 2 did better
        decision = client.get_model_version(name, "2").tags["promotion"]
        holder = str(client.get_model_version_by_alias(name, "champion").version)
        assert holder == ("2" if decision.startswith("champion -> version 2: ") else "1"), (name, decision)


@pytest.mark.unit
def test_latest_alias_follows_the_newest_version(tmp_path, tracking_uri):
    client = MlflowClient(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("registry-round-trip")
    folder = tmp_path / "export"
    folder.mkdir()
    for content in ("first", "second"):
        (folder / "weights.txt").write_text(content)
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(folder), "export")
        register_export(client, "m", run.info.run_id, "export", {"stage": "s"})
    pinned, description = resolve_model_uri(client, "models:/m@latest")
    assert pinned == "models:/m/2" and description == "models:/m@latest -> version 2"
    downloaded = Path(mlflow.artifacts.download_artifacts(pinned, dst_path=str(tmp_path / "dl")))
    assert (downloaded / "weights.txt").read_text() == "second"
