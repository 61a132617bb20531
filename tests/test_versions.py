"""A registered version's description and the promoted alias, against a real MLflow registry
(sqlite); and the system metrics' names, one node or several."""

import mlflow
import pytest
from mlflow import MlflowClient

from launch.versions import StageRecord, describe, promote
from trainer.system_metrics import system_metrics

pytestmark = pytest.mark.unit


def test_the_promoted_alias_moves_only_to_a_better_evaluation(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("promotion")
    client.create_registered_model("m")

    def version(metrics: dict) -> str:
        with mlflow.start_run() as run:
            mlflow.log_metrics(metrics)
        return str(
            client.create_model_version("m", source=f"runs:/{run.info.run_id}/x", run_id=run.info.run_id).version
        )

    def decide(v: str, metrics: dict) -> str:
        decision = promote(client, "m", v, "champion", metrics)
        assert client.get_model_version("m", v).tags["promotion"] == decision
        return decision

    first = {"eval/loss": 2.0}
    v1 = version(first)
    assert decide(v1, first) == "champion -> version 1, the first evaluated (eval/loss 2)"
    assert decide(v1, first) == "champion already on version 1"
    worse = {"eval/loss": 2.5}
    v2 = version(worse)
    assert decide(v2, worse) == (
        "champion stays on version 1: version 2's eval/loss 2.5 does not beat its 2 (lower is better)"
    )
    assert str(client.get_model_version_by_alias("m", "champion").version) == v1
    better = {"eval/loss": 1.5, "train/loss": 1.0}
    v3 = version(better)
    assert decide(v3, better) == "champion -> version 3: eval/loss 1.5 beats version 1's 2"
    assert str(client.get_model_version_by_alias("m", "champion").version) == v3
    unevaluated = {"train/loss": 0.5}
    v4 = version(unevaluated)
    assert decide(v4, unevaluated).startswith("champion not moved: version 4 has no evaluation")
    # attribute accuracy, when a version has it, decides before the loss (higher is better)
    accurate = {"eval/loss": 9.0, "eval/attribute_accuracy": 0.9}
    v5 = version(accurate)
    assert decide(v5, accurate) == (
        "champion -> version 5: eval/attribute_accuracy 0.9; version 3 has no eval/attribute_accuracy"
    )
    assert str(client.get_model_version_by_alias("m", "champion").version) == v5


def test_a_description_gives_the_stage_data_steps_losses_and_evaluation():
    record = StageRecord(
        "demo",
        "instruct",
        "language_modeling",
        "/data/instruct (weight 1)",
        "ab" * 32,
        1600,
        "step 1600 (last step)",
        "models:/demo-pretrain@latest -> version 3",
    )
    text = describe(
        record, {"train/loss": 0.51234, "eval/loss": 0.6, "eval/attribute_accuracy": 0.75, "train/lr": 1e-4}
    )
    assert text.splitlines() == [
        "**demo**, stage `instruct` (language_modeling)",
        "- data: /data/instruct (weight 1) (manifest abababababab)",
        "- steps: 1600; weights of step 1600 (last step)",
        "- final losses: train/loss 0.5123, eval/loss 0.6",
        "- evaluation: eval/attribute_accuracy 0.75",
        "- started from: models:/demo-pretrain@latest -> version 3",
    ]


def test_system_metrics_name_each_node_once_and_each_rank_gpu():
    def sample(host, cpu, *gpu_utilization):
        gpus = [
            {"memory_usage_megabytes": 10.0, "memory_usage_percentage": 1.0, "utilization_percentage": u}
            for u in gpu_utilization
        ]
        return {
            "host": host,
            "cpu_utilization_percentage": cpu,
            "system_memory_usage_megabytes": 100.0,
            "system_memory_usage_percentage": 50.0,
            "gpus": gpus,
        }

    one_node = system_metrics([sample("a", 30.0), sample("a", 31.0), None])
    assert one_node == {
        "system/cpu_utilization_percentage": 30.0,
        "system/system_memory_usage_megabytes": 100.0,
        "system/system_memory_usage_percentage": 50.0,
    }
    two_nodes = system_metrics([sample("a", 30.0, 90.0), sample("b", 40.0, 80.0), sample("b", 41.0, None)])
    assert two_nodes["system/node_0/gpu_0_utilization_percentage"] == 90.0
    assert two_nodes["system/node_1/cpu_utilization_percentage"] == 40.0
    assert two_nodes["system/node_1/gpu_0_utilization_percentage"] == 80.0
    assert "system/node_1/gpu_1_utilization_percentage" not in two_nodes  # no NVML reading on that rank
    assert two_nodes["system/node_1/gpu_1_memory_usage_megabytes"] == 10.0
