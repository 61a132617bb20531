"""Evaluation by generation during a ZeRO-3 stage on 2 ranks: `eval/attribute_accuracy/*` every
`eval_every` steps, each rank asking about its share of the probed clips. Five clips: one rank asks
three questions more and the other repeats its last, unscored, so that both generate in step (none
idles, none hangs); the last step's figures equal one process asking every question of the same
clips with the exported weights."""

import dataclasses
import json
from pathlib import Path

import pytest
from two_ranks import fit_on_ranks, tiny_job, worker_topology

from data_shards.read.reader import shard_lists
from trainer.blueprint import load_export
from trainer.evaluation import sharded_attribute_accuracy
from trainer.stage import StageRunner

pytestmark = pytest.mark.ray
CLIPS = 5


def probe_worker(config):
    topology, logged = worker_topology(), {}
    runner = StageRunner(config["job"], topology)
    runner.train(
        lambda metrics, step: logged.update(
            {step: {k: v for k, v in metrics.items() if k.startswith("eval/attribute")}}
        )
    )
    runner.export()
    if topology.rank == 0:
        Path(config["out"], "logged.json").write_text(json.dumps(logged))


def test_ranks_evaluate_by_generation_during_training_on_their_shares(ray_local, synth_data, tmp_path):
    heldout = str(synth_data / "instruct" / "heldout")
    job = tiny_job(
        synth_data,
        tmp_path,
        num_frames=4,
        stage={
            "name": "instruct",
            "trainable": ["projector", "llm"],
            "steps": 4,
            "eval_every": 2,
            "optimizer": {"lr": 3e-3},
            "probe_eval": {"data": heldout, "max_clips": CLIPS},
        },
        data={"micro_batch_size": 4, "num_workers": 1, "max_length": 256, "shuffle_buffer": 16},
    )
    job = dataclasses.replace(job, probe_shards=shard_lists(heldout))
    fit_on_ranks(probe_worker, {"job": job, "out": str(tmp_path)}, tmp_path / "ray")
    logged = {int(step): metrics for step, metrics in json.loads((tmp_path / "logged.json").read_text()).items()}
    assert [step for step, metrics in sorted(logged.items()) if metrics] == [2, 4]
    assert {
        "eval/attribute_accuracy/colour",
        "eval/attribute_accuracy/shape",
        "eval/attribute_accuracy/direction",
        "eval/attribute_accuracy",
        "eval/attribute_chance",
    } == set(logged[4])
    model, tokenizer = load_export(tmp_path / "export")
    alone = sharded_attribute_accuracy(
        model, tokenizer, job.probe_shards.shards[0], "vicuna_v1", 8, CLIPS, rank=0, world_size=1
    )
    assert logged[4] == alone
