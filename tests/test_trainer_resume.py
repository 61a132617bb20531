"""The trainer's checkpoint on 2 ZeRO-3 ranks under Ray: a run that dies after its step-3
checkpoint, then one whose rank is SIGKILLed while writing the step-6 checkpoint, resumed by new
worker processes from step 3, trains steps 4-6 on the same batches with the same losses as a run
that never stopped; a rank that cannot see the checkpoint stops the run."""
import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest

from trainer.stage import StageRunner
from two_ranks import fit_on_two_ranks, tiny_job, worker_topology

STEPS, CRASH_AT = 6, 4


class SimulatedCrash(Exception):
    pass


class DiesWhileSaving:
    """The real engine, except that saving `tag` kills this process once DeepSpeed wrote its files:
    before the checkpoint is marked complete and `latest` moves."""

    def __init__(self, engine, tag: str):
        self.engine, self.tag = engine, tag

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def save_checkpoint(self, save_dir, tag, **kwargs):
        self.engine.save_checkpoint(save_dir, tag=tag, **kwargs)
        if tag == self.tag:
            os.kill(os.getpid(), signal.SIGKILL)


def resume_worker(config):
    topology = worker_topology()
    mode, job = config["mode"], config["job"]
    if mode == "blind" and topology.rank == 1:  # as on a node that does not see the run's disk
        job = dataclasses.replace(job, checkpoint_dir=str(Path(config["out"]) / "elsewhere"))
    runner = StageRunner(job, topology)
    if mode == "die_saving" and topology.rank == 1:
        runner.checkpointer.engine = DiesWhileSaving(runner.engine, f"step-{STEPS:08d}")
    keys, losses, pending = {}, {}, []

    def recorded():
        while True:
            batch = next(runner.train_batches)
            pending.append(batch["keys"])
            yield batch

    def log(metrics, step):
        keys[step], losses[step] = pending.pop(), metrics["train/loss"]
        if mode == "crash" and step == CRASH_AT:
            raise SimulatedCrash

    try:
        runner.train(log, recorded())
    except SimulatedCrash:
        pass
    out = {"start": min(losses) - 1, "keys": keys, "losses": losses}
    Path(config["out"], f"{mode}-rank{topology.rank}.json").write_text(json.dumps(out))


def run(mode, job, out):
    every = 0 if mode == "full" else 3
    job = dataclasses.replace(job, stage=job.stage.model_copy(update={"checkpoint_every": every}))
    fit_on_two_ranks(resume_worker, {"job": job, "mode": mode, "out": str(out)}, out / "ray")
    return [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in range(2)]


def test_trainer_resume_after_crash_matches_uninterrupted_run(ray_local, synth_data, tmp_path):
    job = tiny_job(synth_data, tmp_path, num_frames=4,
                   stage={"name": "instruct", "trainable": ["projector", "llm"], "steps": STEPS, "optimizer": {"lr": 3e-3}},
                   data={"micro_batch_size": 4, "num_workers": 1, "max_length": 256, "shuffle_buffer": 32,
                         "frame_sampling": "random_segment"})
    full = run("full", job, tmp_path)
    crashed = run("crash", job, tmp_path)
    checkpoints = tmp_path / "ckpt"
    assert (checkpoints / "latest").read_text() == "step-00000003"
    with pytest.raises(Exception):  # the worker group fails with its SIGKILLed rank
        run("die_saving", job, tmp_path)
    assert (checkpoints / "latest").read_text() == "step-00000003"
    assert list((checkpoints / "step-00000006").rglob("*.pt")) and not (checkpoints / "step-00000006" / "complete").exists()
    resumed = run("resume", job, tmp_path)
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000003", "step-00000006"]
    assert json.loads((checkpoints / "step-00000006" / "complete").read_text())["step"] == 6
    for rank in range(2):
        assert full[rank]["start"] == crashed[rank]["start"] == 0 and resumed[rank]["start"] == 3
        assert crashed[rank]["keys"]["1"] == full[rank]["keys"]["1"]
        for step in ("4", "5", "6"):
            assert resumed[rank]["keys"][step] == full[rank]["keys"][step]
            assert abs(resumed[rank]["losses"][step] - full[rank]["losses"][step]) < 1e-5
    with pytest.raises(Exception) as failure:  # rank 1 never starts from step 0 on its own
        run("blind", job, tmp_path)
    assert "rank(s) [1] cannot read their files of the checkpoint rank 0 resumes from" in str(failure.value)
