"""ZeRO-3 under Ray on 2 gloo ranks: parameters really sharded, the loss goes down, and the
export loads in plain transformers with the trained module's logits."""
import json
from pathlib import Path

import torch

from data_shards.config import ReaderConfig
from trainer.config import EngineConfig, ModelConfig, StageConfig
from trainer.stage import StageJob, prepare_stage
from two_ranks import fit_on_two_ranks, worker_topology

STEPS = 25


def zero3_worker(config):
    from transformers import AutoModelForCausalLM

    from trainer.export import export_model
    from trainer.loop import train

    topology = worker_topology()
    rank = topology.rank
    job = config["job"]
    stage = prepare_stage(job, topology)
    params = list(stage.engine.module.parameters())
    local = sum(p.ds_tensor.numel() for p in params)
    full = sum(p.ds_numel for p in params)
    losses = []
    train(stage.engine, stage.train_batches, STEPS, 1, lambda m, s: losses.append(m["train/loss"]), None, 0,
          stage.health, stage.meter)

    probe_ids = torch.arange(5, 25).view(2, 10)
    stage.engine.module.eval()
    with torch.no_grad():
        trained_logits = stage.engine.module.llm(input_ids=probe_ids).logits
    export = export_model(stage.engine.module, stage.tokenizer, job.export_dir)
    result = {"rank": rank, "local": local, "full": full, "losses": losses}
    if export is not None:
        plain = AutoModelForCausalLM.from_pretrained(export / "llm").eval()
        with torch.no_grad():
            result["max_logit_diff"] = float((plain(input_ids=probe_ids).logits - trained_logits).abs().max())
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(result))


def test_zero3_shards_parameters_and_learns(ray_local, synth_data, tmp_path):
    job = StageJob(
        model=ModelConfig(vision={"tiny": {}}, llm={"tiny": {}}, word_vocab=str(synth_data / "vocab.txt"),
                          num_frames=4),
        engine=EngineConfig(zero_stage=3, param_persistence_threshold=0),
        data=ReaderConfig(micro_batch_size=4, num_workers=1, max_length=256),
        stage=StageConfig(name="instruct", train_data=str(synth_data / "instruct" / "train"), template="vicuna_v1",
                          trainable=["projector", "llm"], steps=STEPS, optimizer={"lr": 3e-3}),
        init_export=None, export_dir=str(tmp_path / "export"), checkpoint_dir=str(tmp_path / "ckpt"), seed=0)
    fit_on_two_ranks(zero3_worker, {"job": job, "out": str(tmp_path)}, tmp_path / "ray")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    full = results[0]["full"]
    for r in results:  # each rank holds about half of every parameter (padding aside)
        assert 0.45 * full <= r["local"] <= 0.55 * full, r
    assert results[0]["local"] + results[1]["local"] >= full

    losses = results[0]["losses"]
    assert results[0]["losses"] == results[1]["losses"]  # logged loss is the cross-rank mean
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses

    assert results[0]["max_logit_diff"] < 1e-4
