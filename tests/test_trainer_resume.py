"""The trainer's checkpoints on ZeRO-3 ranks under Ray, against a 2-rank run that never stopped:
- from its step-3 checkpoint in an S3 store (moto's server), a run whose rank is SIGKILLed while
  its files of the step-6 checkpoint go up in the background leaves step 3 the latest; new worker
  processes resume from it, train steps 4-6 on the same batches with the same losses and write
  step 6 in full; a rank that cannot see the checkpoint stops the run;
- the same checkpoint resumes on 1 rank reading with 2 loader workers instead of 1, and a
  checkpoint that rank wrote resumes on 2 again: the universal conversion happens on its own,
  grad_accum is recomputed so the global batch stays, and every resumed step trains on the same
  micro-batches with the same loss, ending with the same weights."""

import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from ray.train import TrainingFailedError
from two_ranks import fit_on_ranks, tiny_job, worker_topology

from trainer.checkpoint_upload import Upload
from trainer.stage import StageRunner
from trainer.storage import Storage

STEPS = 6


def die_while_uploading(tag: str) -> None:
    """This process is SIGKILLed once its upload of `tag` has put one file into storage."""
    put = Upload._put

    def put_then_die(upload, name):
        size_digest = put(upload, name)
        if upload.tag == tag:
            os.kill(os.getpid(), signal.SIGKILL)
        return size_digest

    Upload._put = put_then_die


def resume_worker(config):
    """Trains the job; each rank writes what it trained on (keys with grad_accum 1) and rank 0's log."""
    os.environ.update(config.get("env", {}))  # what the checkpoint storage needs
    topology = worker_topology()
    mode, job = config["mode"], config["job"]
    if mode == "blind" and topology.rank == 1:  # as on a node that does not see the run's disk
        job = dataclasses.replace(job, checkpoint_dir=str(Path(config["out"]) / "elsewhere"))
    runner = StageRunner(job, topology)
    if mode == "die_uploading" and topology.rank == 1:
        die_while_uploading(f"step-{STEPS:08d}")
    keys, logged, pending = {}, {}, []

    def recorded():
        while True:
            batch = next(runner.train_batches)
            pending.append(batch["keys"])
            yield batch

    def log(metrics, step):
        keys[step] = pending.pop()
        logged[step] = [metrics["train/loss"], metrics["data/batch_digest"]]

    runner.train(log, recorded())
    out = {"grad_accum": runner.layout.grad_accum, "keys": keys, "logged": logged}
    Path(config["out"], f"{config['name']}-rank{topology.rank}.json").write_text(json.dumps(out))


def run(
    job,
    folder: Path,
    name: str,
    mode: str = "train",
    ranks: int = 2,
    every: int = 3,
    resume_tag: Path | None = None,
    storage: str | None = None,
    env: dict | None = None,
    **data,
) -> list[dict]:
    """`job` on `ranks` ranks with checkpoints in `folder/name` (or the storage URL `storage`, which
    the workers reach with `env`), resuming a copy of `resume_tag`; what each rank wrote, steps as
    numbers."""
    checkpoints = storage or folder / name
    if resume_tag:
        shutil.copytree(resume_tag, checkpoints / resume_tag.name)
        (checkpoints / "latest").write_text(resume_tag.name)
    job = dataclasses.replace(
        job,
        checkpoint_dir=str(checkpoints),
        data=job.data.model_copy(update=data),
        stage=job.stage.model_copy(update={"checkpoint_every": every}),
    )
    fit_on_ranks(
        resume_worker,
        {"job": job, "mode": mode, "name": name, "out": str(folder), "env": env or {}},
        folder / "ray",
        num_workers=ranks,
    )
    records = [json.loads((folder / f"{name}-rank{r}.json").read_text()) for r in range(ranks)]
    return [{**r, **{k: {int(step): v for step, v in r[k].items()} for k in ("keys", "logged")}} for r in records]


@pytest.fixture(scope="module")
def job(synth_data, tmp_path_factory):
    return tiny_job(
        synth_data,
        tmp_path_factory.mktemp("job"),
        num_frames=4,
        stage={
            "name": "instruct",
            "trainable": ["projector", "llm"],
            "steps": STEPS,
            "optimizer": {"lr": 3e-3, "module_lr": {"projector": 1e-2}},
        },
        data={
            "micro_batch_size": 4,
            "num_workers": 1,
            "max_length": 256,
            "shuffle_buffer": 32,
            "frame_sampling": "random_segment",
        },
    )


@pytest.fixture(scope="module")
def uninterrupted(ray_local, job, tmp_path_factory):
    """2 ranks, steps 1-6, checkpoints at 3 and 6: what each rank logged, and the checkpoints."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    return run(job, folder, "full"), folder / "full"


@pytest.mark.cluster
def test_a_rank_killed_mid_upload_leaves_the_previous_checkpoint_to_resume(
    job, uninterrupted, object_store, tmp_path, monkeypatch
):
    for key, value in object_store.env.items():  # this process reads the store too
        monkeypatch.setenv(key, value)
    full, full_checkpoints = uninterrupted
    storage = Storage(f"s3://{object_store.bucket}/upload-kill")
    storage.upload(full_checkpoints / "step-00000003", "step-00000003")
    storage.write_text("latest", "step-00000003")
    with pytest.raises(TrainingFailedError):  # the worker group fails with its SIGKILLed rank
        run(job, tmp_path, "resumed", mode="die_uploading", storage=storage.url, env=object_store.env)
    assert storage.read_text("latest") == "step-00000003"
    assert storage.exists("step-00000006") and not storage.exists("step-00000006/complete")
    resumed = run(job, tmp_path, "resumed", storage=storage.url, env=object_store.env)
    assert storage.folders() == ["step-00000003", "step-00000006"]
    complete = json.loads(storage.read_text("step-00000006/complete"))
    assert complete["step"] == 6 and any("zero_pp_rank_1_" in name for name in complete["files"])
    for rank in range(2):
        assert sorted(resumed[rank]["logged"]) == [4, 5, 6]
        for step in (4, 5, 6):
            assert resumed[rank]["keys"][step] == full[rank]["keys"][step]
            assert abs(resumed[rank]["logged"][step][0] - full[rank]["logged"][step][0]) < 1e-5
    with pytest.raises(Exception) as failure:  # rank 1 never starts from step 0 on its own
        run(job, tmp_path, "resumed", mode="blind", storage=storage.url, env=object_store.env)
    assert "rank(s) [1] cannot read the checkpoint rank 0 resumes from" in str(failure.value)


def weights(tag: Path) -> dict:
    return get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.ray
def test_a_checkpoint_resumes_on_another_number_of_ranks(job, uninterrupted, tmp_path):
    full, full_checkpoints = uninterrupted
    assert full[0]["grad_accum"] == 1
    # 2 -> 1: the step-3 checkpoint of 2 ranks on 1 rank reading both data streams with 2 workers
    (one,) = run(job, tmp_path, "one", ranks=1, every=1, resume_tag=full_checkpoints / "step-00000003", num_workers=2)
    assert one["grad_accum"] == 2 and sorted(one["logged"]) == [4, 5, 6]
    # 1 -> 2: the step-5 checkpoint that rank wrote, on 2 ranks again
    two, _ = run(job, tmp_path, "two", resume_tag=tmp_path / "one" / "step-00000005")
    assert two["grad_accum"] == 1 and sorted(two["logged"]) == [6]
    assert (tmp_path / "two" / "step-00000005" / "universal" / "converted").is_file()
    for resumed in (one, two):
        for step, (loss, digest) in resumed["logged"].items():
            assert digest == full[0]["logged"][step][1], f"step {step} trained on other micro-batches"
            assert abs(loss - full[0]["logged"][step][0]) < 1e-5, f"step {step}: {loss} vs {full[0]['logged'][step][0]}"
    final = weights(full_checkpoints / "step-00000006")
    assert same_weights(weights(tmp_path / "one" / "step-00000006"), final)
    assert same_weights(weights(tmp_path / "two" / "step-00000006"), final)
