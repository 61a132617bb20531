"""Checkpoints that go up to an object store (moto's S3 server) in the background, on 2 ZeRO-3
ranks: a rank SIGKILLed while its files of the step-6 checkpoint are going up leaves step 3 the
one `latest` names, complete with every rank's file list; new processes resume there and write
step 6 in full."""

from __future__ import annotations

import json

import pytest
from ray.train import TrainingFailedError
from test_trainer_resume import STEPS, job, run  # noqa: F401 - `job` is a fixture

from trainer.storage import Storage

pytestmark = pytest.mark.cluster


def test_a_rank_killed_mid_upload_leaves_the_previous_checkpoint_to_resume(
    ray_local,
    job,  # noqa: F811
    object_store,
    tmp_path,
    monkeypatch,
):
    for key, value in object_store.env.items():  # this process reads the store too
        monkeypatch.setenv(key, value)
    storage = Storage(f"s3://{object_store.bucket}/upload-kill")
    with pytest.raises(TrainingFailedError):  # the worker group fails with its SIGKILLed rank
        run(job, tmp_path, "killed", mode="die_uploading", storage=storage.url, env=object_store.env)
    assert storage.read_text("latest") == "step-00000003"
    listed = json.loads(storage.read_text("step-00000003/complete"))["files"]
    assert any("zero_pp_rank_0_" in name for name in listed) and any("zero_pp_rank_1_" in name for name in listed)
    assert storage.exists("step-00000006") and not storage.exists("step-00000006/complete")

    resumed = run(job, tmp_path, "resumed", storage=storage.url, env=object_store.env)
    assert all(sorted(rank["logged"]) == [4, 5, 6] for rank in resumed)  # from step 3
    assert storage.read_text("latest") == f"step-{STEPS:08d}"
    assert json.loads(storage.read_text(f"step-{STEPS:08d}/complete"))["step"] == STEPS
