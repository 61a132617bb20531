"""A rank's process killed with SIGKILL mid-stage: with `cluster.max_failures`, Ray Train restarts
the worker group, it resumes from the newest checkpoint and the stage completes, its weights,
every step's loss and samples (their keys' digest) equal to a run that was never interrupted,
each step's metrics logged once."""

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from launch.config import load_config
from launch.pipeline import Pipeline
from trainer.blueprint import load_export

pytestmark = pytest.mark.ray
DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
STEPS = 12


def one_stage(synth_data, out: Path, name: str, steps: int = STEPS, overrides: tuple[str, ...] = ()):
    cfg = load_config(
        DEMO,
        [
            f"name={name}",
            f"output_dir={out}",
            f"model.word_vocab={synth_data}/vocab.txt",
            "model.num_frames=4",
            "data.micro_batch_size=4",
            f"tracking.registered_model_prefix={name}",
            "evaluation=",
            "cluster.max_failures=1",
            f"stages.pretrain.train_data={synth_data}/captions/train",
            "stages.pretrain.eval_data=",
            f"stages.pretrain.steps={steps}",
            "stages.pretrain.checkpoint_every=3",
            *overrides,
        ],
    )
    return cfg.model_copy(update={"stages": [stage for stage in cfg.stages if stage.name == "pretrain"]})


def kill_rank_one_after_a_checkpoint(out: Path, finished: threading.Event) -> int:
    """SIGKILLs rank 1's process once the first checkpoint is in; the pid killed."""
    log, latest = out / "logs" / "pretrain-rank1.log", out / "checkpoints" / "pretrain" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.is_file() and log.is_file() and re.search(r"rank 1: pid (\d+)", log.read_text())):
        assert not finished.is_set() and time.monotonic() < deadline, "no checkpoint before the stage ended"
        time.sleep(0.1)
    pid = int(re.search(r"rank 1: pid (\d+)", log.read_text()).group(1))
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.fixture()
def tracking_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_a_killed_rank_is_replaced_and_the_stage_ends_as_if_uninterrupted(
    ray_local, synth_data, tmp_path, tracking_uri
):
    killed_out, clean_out = tmp_path / "killed", tmp_path / "clean"
    finished, outcome = threading.Event(), {}

    def run():
        try:
            outcome["registered"] = Pipeline(one_stage(synth_data, killed_out, "killed"), console=lambda _: None).run()
        finally:
            finished.set()

    thread = threading.Thread(target=run)
    thread.start()
    pid = kill_rank_one_after_a_checkpoint(killed_out, finished)
    thread.join(timeout=600)
    assert "registered" in outcome, "the stage did not complete after the restart"

    rank_log = (killed_out / "logs" / "pretrain-rank1.log").read_text()
    pids = [int(p) for p in re.findall(r"rank 1: pid (\d+)", rank_log)]
    assert pids[0] == pid and len(pids) == 2 and pids[1] != pid  # a new process took rank 1 over
    resumed = re.findall(r"resumed from \S+/step-(\d+) at step (\d+)", rank_log)
    assert len(resumed) == 1 and int(resumed[0][1]) >= 3

    clean = Pipeline(one_stage(synth_data, clean_out, "clean"), console=lambda _: None).run()
    client = MlflowClient(tracking_uri)
    killed_history = client.get_metric_history(outcome["registered"][0].run_id, "train/loss")
    clean_history = client.get_metric_history(clean[0].run_id, "train/loss")
    assert [m.step for m in killed_history] == list(range(1, STEPS + 1))  # each step once
    assert [m.value for m in killed_history] == pytest.approx([m.value for m in clean_history], rel=1e-5)
    digests = [
        [m.value for m in client.get_metric_history(run_id, "data/batch_digest")]
        for run_id in (outcome["registered"][0].run_id, clean[0].run_id)
    ]
    assert len(digests[0]) == STEPS and digests[0] == digests[1]  # the same samples, step by step

    killed_model, _ = load_export(killed_out / "exports" / "pretrain")
    clean_model, _ = load_export(clean_out / "exports" / "pretrain")
    clean_state = clean_model.state_dict()
    for key, value in killed_model.state_dict().items():
        torch.testing.assert_close(value, clean_state[key], rtol=1e-5, atol=1e-6)
