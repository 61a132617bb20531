"""The tracking server stopped for 12 s mid-stage and started again: the stage trains on, the
driver waits the outage out, and afterwards every step's metrics are in MLflow once and the
export is registered."""

import threading
import time
from urllib.parse import urlparse

import pytest
from cluster_parts import start_mlflow_server, stop_group
from mlflow import MlflowClient
from test_worker_loss import one_stage

from launch.pipeline import Pipeline

pytestmark = pytest.mark.cluster  # an `mlflow server` process (stopped and restarted), besides Ray

OUTAGE_S, STEPS = 12, 40


def test_a_tracking_outage_mid_stage_is_waited_out(ray_local, synth_data, tmp_path, monkeypatch, capsys):
    # MLflow's own retries would bridge a short outage by themselves: without them every
    # request fails at once, so what bridges this one is the driver's.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    server, uri = start_mlflow_server(server_dir, None)
    out, outcome = tmp_path / "out", {}
    cfg = one_stage(synth_data, out, "outage", STEPS).model_copy(deep=True)
    cfg.tracking.tracking_uri = uri

    def run():
        outcome["registered"] = Pipeline(cfg, console=lambda _: None).run()

    thread = threading.Thread(target=run)
    thread.start()
    client, latest = MlflowClient(uri), out / "checkpoints" / "pretrain" / "latest"
    deadline = time.monotonic() + 300
    while not latest.is_file():
        assert thread.is_alive() and time.monotonic() < deadline, "the stage never reached a checkpoint"
        time.sleep(0.2)
    stopped_at = latest.read_text()
    stop_group(server)
    time.sleep(OUTAGE_S)
    trained_meanwhile = latest.read_text()
    server, _ = start_mlflow_server(server_dir, None, port=urlparse(uri).port)
    try:
        thread.join(timeout=600)
        assert "registered" in outcome, "the job did not complete after the outage"
        (registered,) = outcome["registered"]
        assert trained_meanwhile > stopped_at  # training went on while the server was down
        history = client.get_metric_history(registered.run_id, "train/loss")
        assert [m.step for m in history] == list(range(1, STEPS + 1))  # every step, once
        assert client.get_model_version(registered.model_name, registered.version).run_id == registered.run_id
        said = capsys.readouterr().out  # the driver's progress output
        # whichever write was in flight when the server went away (a step's metrics, a note)
        assert "tracking server unreachable while " in said and "retrying for up to 3600 s" in said, said
        assert "tracking server reachable again" in said, said
    finally:
        stop_group(server)
