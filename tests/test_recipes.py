"""Each recipe's tiny twin trains a few steps per stage on 2 ZeRO-3 ranks under Ray, and only
the parameters the recipe means to train change (and all of those modules do)."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from two_ranks import fit_on_ranks, worker_topology

from launch.config import load_config

pytestmark = pytest.mark.ray
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STEPS = 2

# recipe -> per stage, the parameter-name patterns allowed (and required) to change
INTENDED = {
    "valley": [("projector.",), ("projector.", "llm.")],
    "clipa": [("vision.", "temporal.", "text."), ("projector.",), ("projector.", "llm.")],
    "mplug_owl": [("projector.",), ("lora_",)],
    "ep_alm": [("projector.", "soft_prompt.")],
    "multimodal_gpt": [("lora_", "projector.")],
}


def recipe_worker(config):
    from data_shards.read.reader import shard_lists
    from trainer.job import StageJob
    from trainer.partitioned import gather_state_dict
    from trainer.stage import StageRunner

    topology = worker_topology()
    rank = topology.rank
    cfg, out = config["cfg"], Path(config["out"])
    previous, report = None, []
    for index, stage_cfg in enumerate(cfg.stages):
        job = StageJob(
            model=cfg.model,
            engine=cfg.engine,
            data=cfg.data,
            stage=stage_cfg,
            train_shards=shard_lists(stage_cfg.train_data),
            eval_shards=None,
            init_export_url=previous,
            export_dir=str(out / "exports" / stage_cfg.name),
            checkpoint_dir=str(out / "checkpoints" / stage_cfg.name),
            seed=cfg.seed + index,
        )
        runner = StageRunner(job, topology, init_folder=previous)
        before = gather_state_dict(runner.model)
        runner.train(lambda m, s: None)
        after = gather_state_dict(runner.model)
        probe = torch.arange(5, 25).view(2, 10)
        runner.model.eval()
        with torch.no_grad():
            trained_logits = runner.model.llm(input_ids=probe).logits
        runner.export()
        dist.barrier()  # rank 0 has written the export the next stage starts from
        previous = job.export_dir
        if rank == 0:
            from transformers import AutoModelForCausalLM

            exported = AutoModelForCausalLM.from_pretrained(Path(job.export_dir) / "llm").eval()
            with torch.no_grad():
                logit_diff = float((exported(input_ids=probe).logits - trained_logits).abs().max())
            report.append(
                {
                    "patches": runner.model.num_patches,
                    "changed": sorted(k for k in before if not torch.equal(before[k], after[k])),
                    "table": runner.trainable_table,
                    "logit_diff": logit_diff,
                    "adapter": sorted(p.name for p in (Path(job.export_dir) / "llm_adapter").glob("*")),
                }
            )
    if rank == 0:
        (out / "report.json").write_text(json.dumps(report))


@pytest.mark.parametrize("recipe", sorted(INTENDED))
def test_tiny_twin_trains_only_what_the_recipe_says(ray_local, synth_data, tmp_path, recipe):
    cfg = load_config(CONFIGS / "tiny" / f"{recipe}.yaml", [f"model.word_vocab={synth_data}/vocab.txt"])
    stages = []
    for stage in cfg.stages:  # the twin's data paths point at runs/demo/data: use the test's copy
        data = stage.train_data
        if isinstance(data, str):
            data = data.replace("runs/demo/data", str(synth_data))
        else:
            data = [s.model_copy(update={"url": s.url.replace("runs/demo/data", str(synth_data))}) for s in data]
        stages.append(stage.model_copy(update={"train_data": data, "steps": STEPS}))
    cfg = cfg.model_copy(update={"stages": stages}).with_absolute_paths()
    fit_on_ranks(recipe_worker, {"cfg": cfg, "out": str(tmp_path)}, tmp_path / "ray")
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report) == len(INTENDED[recipe])
    for stage, patterns, stage_cfg in zip(report, INTENDED[recipe], cfg.stages):
        unintended = [k for k in stage["changed"] if not any(p in k for p in patterns)]
        assert not unintended, unintended[:5]
        for pattern in patterns:  # every module the stage trains did change
            assert any(pattern in k for k in stage["changed"]), (pattern, stage["table"])
        # the table gives a learning rate to exactly the modules the stage trains
        rated = {row.split()[0] for row in stage["table"].splitlines()[1:-1] if row.split()[-1] != "frozen"}
        assert rated == set(stage_cfg.trainable) | ({"embeddings"} if "llm" in stage_cfg.trainable else set())
        # the exported LLM (LoRA merged in, where the stage trained LoRA) gives the trained logits
        assert stage["logit_diff"] < 1e-4
        lora = "lora_" in patterns
        assert stage["adapter"] == (["adapter_config.json", "adapter_model.safetensors"] if lora else [])
    if recipe == "valley":  # per-module learning rates, as the tiny twin's stage 2 sets them
        table = {line.split()[0]: line.split()[-1] for line in report[1]["table"].splitlines()[1:-1]}
        assert table["projector"] == "0.003" and table["llm"] == "0.002" and table["vision"] == "frozen"
        assert table["embeddings"] == "0.002"  # training the LLM trains its input embeddings too
        assert "llm.model.embed_tokens.weight" in report[1]["changed"]
    if recipe == "clipa":  # a quarter of the 16 patches per frame in the contrastive stage, all of them after it
        assert [stage["patches"] for stage in report] == [4, 16, 16]
