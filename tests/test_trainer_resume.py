"""The trainer's checkpoints on ZeRO-3 ranks under Ray, against a 2-rank run that never stopped:
- from its step-3 checkpoint in an S3 store (moto's server), a run whose rank is SIGKILLed while
  its files of the step-6 checkpoint go up in the background leaves step 3 the latest; new worker
  processes resume from it, train steps 4-6 on the same batches with the same losses and write
  step 6 in full; a rank that cannot see the checkpoint stops the run;
- the same checkpoint resumes on 3 ranks, which its global batch of 2 micro-batches does not
  divide (each step one rank has none and takes part at weight zero), and a checkpoint those 3
  wrote resumes on 2 again; a 3-rank run of 4 micro-batches a step (grad_accum 2: one rank takes
  2, two take 1 and a pass at weight zero) resumes on 2. The universal conversion happens on its
  own (once per tag, and not when the rank count is the same), and every resumed step trains on
  the same micro-batches with the same loss, ending with the same weights."""

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
    """Trains the job; each rank writes its layout's grad_accum and the loss and batch digest it logged."""
    os.environ.update(config.get("env", {}))  # what the checkpoint storage needs
    topology = worker_topology()
    mode, job = config["mode"], config["job"]
    if mode == "blind" and topology.rank == 1:  # as on a node that does not see the run's disk
        job = dataclasses.replace(job, checkpoint_dir=str(Path(config["out"]) / "elsewhere"))
    runner = StageRunner(job, topology)
    if mode == "die_uploading" and topology.rank == 1:
        die_while_uploading(f"step-{STEPS:08d}")
    logged = {}
    runner.train(lambda metrics, step: logged.__setitem__(step, [metrics["train/loss"], metrics["data/batch_digest"]]))
    out = {"grad_accum": runner.layout.grad_accum, "logged": logged}
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
    per_step: int | None = None,
    **data,
) -> list[dict]:
    """`job` on `ranks` ranks with checkpoints in `folder/name` (or the storage URL `storage`, which
    the workers reach with `env`), resuming a copy of `resume_tag`, with `per_step` micro-batches a
    step (unset: 1 per rank) and `data` changed as given; what each rank wrote, steps as numbers."""
    checkpoints = storage or folder / name
    if resume_tag:
        shutil.copytree(resume_tag, checkpoints / resume_tag.name)
        (checkpoints / "latest").write_text(resume_tag.name)
    job = dataclasses.replace(
        job,
        checkpoint_dir=str(checkpoints),
        data=job.data.model_copy(update=data),
        stage=job.stage.model_copy(update={"checkpoint_every": every}),
        micro_batches_per_step=per_step,
    )
    fit_on_ranks(
        resume_worker,
        {"job": job, "mode": mode, "name": name, "out": str(folder), "env": env or {}},
        folder / "ray",
        num_workers=ranks,
    )
    records = [json.loads((folder / f"{name}-rank{r}.json").read_text()) for r in range(ranks)]
    return [{**r, "logged": {int(step): v for step, v in r["logged"].items()}} for r in records]


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
            "streams": 6,  # 2 and 3 ranks, 1 loader worker each: 2 and 3 divide it
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
    assert not storage.exists("step-00000003/universal")  # resumed on as many ranks as wrote it
    complete = json.loads(storage.read_text("step-00000006/complete"))
    assert complete["step"] == 6 and any("zero_pp_rank_1_" in name for name in complete["files"])
    assert sorted(resumed[0]["logged"]) == [4, 5, 6]
    same_steps(resumed[0], full[0])
    with pytest.raises(Exception) as failure:  # rank 1 never starts from step 0 on its own
        run(job, tmp_path, "resumed", mode="blind", storage=storage.url, env=object_store.env)
    assert "rank(s) [1] cannot read the checkpoint rank 0 resumes from" in str(failure.value)


def weights(tag: Path) -> dict:
    return get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def same_steps(resumed: dict, full: dict) -> None:
    """Every step `resumed` logged trained on the micro-batches `full` did, with its loss."""
    for step, (loss, digest) in resumed["logged"].items():
        assert digest == full["logged"][step][1], f"step {step} trained on other micro-batches"
        assert abs(loss - full["logged"][step][0]) < 1e-5, f"step {step}: {loss} vs {full['logged'][step][0]}"


@pytest.mark.ray
def test_a_checkpoint_resumes_on_a_rank_count_that_does_not_divide_its_global_batch(job, uninterrupted, tmp_path):
    full, full_checkpoints = uninterrupted
    assert full[0]["grad_accum"] == 1
    # 2 -> 3: the step-3 checkpoint; 2 micro-batches a step on 3 ranks
    three = run(job, tmp_path, "three", ranks=3, every=1, resume_tag=full_checkpoints / "step-00000003")
    assert three[0]["grad_accum"] == 1 and sorted(three[0]["logged"]) == [4, 5, 6]
    # 3 -> 2: the step-5 checkpoint the 3 ranks wrote
    two, _ = run(job, tmp_path, "two", resume_tag=tmp_path / "three" / "step-00000005")
    assert sorted(two["logged"]) == [6]
    assert (tmp_path / "two" / "step-00000005" / "universal" / "converted").is_file()
    for resumed in (three[0], two):
        same_steps(resumed, full[0])
    final = weights(full_checkpoints / "step-00000006")
    assert same_weights(weights(tmp_path / "three" / "step-00000006"), final)
    assert same_weights(weights(tmp_path / "two" / "step-00000006"), final)


@pytest.mark.ray
def test_an_uneven_run_with_grad_accum_2_resumes_on_an_even_count(job, tmp_path):
    """4 micro-batches a step on 3 ranks, uninterrupted; its step-3 checkpoint on 2 ranks."""
    full = run(job, tmp_path, "full", ranks=3, per_step=4)
    assert full[0]["grad_accum"] == 2 and sorted(full[0]["logged"]) == list(range(1, STEPS + 1))
    two, _ = run(job, tmp_path, "two", resume_tag=tmp_path / "full" / "step-00000003", per_step=4)
    assert two["grad_accum"] == 2 and sorted(two["logged"]) == [4, 5, 6]
    same_steps(two, full[0])
    assert same_weights(weights(tmp_path / "two" / "step-00000006"), weights(tmp_path / "full" / "step-00000006"))
