"""ZeRO-3 under Ray on 2 gloo ranks: parameters really sharded, the loss goes down, and the
export loads in plain transformers with the trained module's logits."""

import json
from pathlib import Path

import pytest
import torch
from two_ranks import fit_on_ranks, tiny_job, worker_topology

from trainer.stage import StageRunner

pytestmark = pytest.mark.ray
STEPS = 25


def zero3_worker(config):
    from transformers import AutoModelForCausalLM

    topology = worker_topology()
    runner = StageRunner(config["job"], topology)
    params = list(runner.model.parameters())
    local = sum(p.ds_tensor.numel() for p in params)
    full = sum(p.ds_numel for p in params)
    losses = []
    runner.train(lambda m, s: losses.append(m["train/loss"]))

    probe_ids = torch.arange(5, 25).view(2, 10)
    runner.model.eval()
    with torch.no_grad():
        trained_logits = runner.model.llm(input_ids=probe_ids).logits
    export, _ = runner.export()
    result = {"rank": topology.rank, "local": local, "full": full, "losses": losses}
    if export is not None:
        with export.fetched() as folder:
            plain = AutoModelForCausalLM.from_pretrained(folder / "llm").eval()
        with torch.no_grad():
            result["max_logit_diff"] = float((plain(input_ids=probe_ids).logits - trained_logits).abs().max())
    Path(config["out"], f"rank{topology.rank}.json").write_text(json.dumps(result))


def test_zero3_shards_parameters_and_learns(ray_local, synth_data, tmp_path):
    job = tiny_job(
        synth_data,
        tmp_path,
        num_frames=4,
        stage={"name": "instruct", "trainable": ["projector", "llm"], "steps": STEPS, "optimizer": {"lr": 3e-3}},
        data={"micro_batch_size": 4, "num_workers": 1, "max_length": 256},
    )
    fit_on_ranks(zero3_worker, {"job": job, "out": str(tmp_path)}, tmp_path / "ray")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    full = results[0]["full"]
    for r in results:  # each rank holds about half of every parameter (padding aside)
        assert 0.45 * full <= r["local"] <= 0.55 * full, r
    assert results[0]["local"] + results[1]["local"] >= full

    losses = results[0]["losses"]
    assert results[0]["losses"] == results[1]["losses"]  # logged loss is the cross-rank mean
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses

    assert results[0]["max_logit_diff"] < 1e-4
