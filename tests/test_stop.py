"""A job asked to stop mid-stage (what the driver's SIGTERM or SIGINT does: tests/test_interruption.py
has the signals themselves), on the embedded Ray: the workers finish the step in progress and save
it, the driver records that checkpoint, ends the MLflow runs KILLED and raises Stopped naming the
step; the same job run again resumes at that step under the same stage run, each step logged once."""

from __future__ import annotations

import re
import signal
import threading
import time

import pytest
from mlflow import MlflowClient
from test_worker_loss import one_stage

from launch.pipeline import Pipeline
from launch.stop_request import Stopped, StopRequest
from trainer.checkpoint import tag_name

pytestmark = pytest.mark.ray
STEPS = 10


def test_a_stopped_stage_saves_the_step_in_progress_and_resumes_there(ray_local, synth_data, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "run"
    cfg = one_stage(synth_data, out, "stopped", STEPS)
    stop, console, outcome = StopRequest(), [], {}

    def run():
        try:
            Pipeline(cfg, console=console.append, stop=stop).run()
        except Stopped as err:
            outcome["stopped"] = err

    thread = threading.Thread(target=run)
    thread.start()
    latest, deadline = out / "checkpoints" / "pretrain" / "latest", time.monotonic() + 300
    while not latest.is_file():  # the first scheduled checkpoint (step 3)
        assert thread.is_alive() and time.monotonic() < deadline, "no checkpoint before the stage ended"
        time.sleep(0.1)
    stop.signal = signal.SIGTERM  # as the driver's handler does
    thread.join(timeout=300)

    err = outcome["stopped"]
    match = re.fullmatch(
        r"stage 'pretrain' stopped at step (\d+), saved in (\S+); the same command resumes there", str(err)
    )
    assert match and err.exit_code == 128 + signal.SIGTERM, err
    step = int(match.group(1))
    assert 3 <= step < STEPS and match.group(2) == str(out / "checkpoints" / "pretrain" / tag_name(step))
    assert latest.read_text() == tag_name(step)

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("valleyforge-demo").experiment_id
    (parent,) = client.search_runs([experiment], "attributes.run_name = 'stopped'")
    (stage_run,) = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.info.status == stage_run.info.status == "KILLED"
    history = client.get_metric_history(stage_run.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, step + 1))  # no step trained past the one saved
    (model,) = [m for m in client.search_logged_models([experiment]) if m.params["step"] == str(step)]
    assert model.params["saved_for"] == "stop requested"

    (registered,) = Pipeline(cfg, console=lambda _: None).run()
    assert registered.run_id == stage_run.info.run_id  # the same stage run goes on
    for rank in (0, 1):
        log = (out / "logs" / f"pretrain-rank{rank}.log").read_text()
        assert re.findall(r"resumed from \S+/step-(\d+) at step (\d+)", log)[-1] == (tag_name(step)[5:], str(step))
    history = client.get_metric_history(stage_run.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, STEPS + 1))  # each step once
