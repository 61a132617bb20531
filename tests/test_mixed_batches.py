"""Joint text-only + multimodal training under ZeRO-3: one rank gets only text-only batches while
the other gets only video batches, the vision tower training too, and the run finishes (a
collective timeout turns a hang into a failure)."""

import json
from pathlib import Path

import pytest
from two_ranks import fit_on_ranks, tiny_job, worker_topology

from data_shards.conversation import get_template
from data_shards.read.reader import Topology, build_loader
from data_shards.write.synth import SynthSpec, make_sample
from data_shards.write.writer import SplitWriter
from trainer.stage import StageRunner

pytestmark = pytest.mark.ray
STEPS = 4


def mismatched_worker(config):
    topology = worker_topology()
    rank = topology.rank
    job = config["job"]
    runner = StageRunner(job, topology)
    split = config["text_split"] if rank == 0 else config["video_split"]
    batches = build_loader(
        split,
        job.data,
        runner.tokenizer,
        get_template(job.stage.template),
        runner.model.visual_spec(),
        Topology(0, 1),
        train=True,
    )
    seen_media = []

    def tracked():
        while True:
            batch = next(batches)
            seen_media.append(int(batch["frame_mask"].sum()))
            yield batch

    vision = runner.model.vision
    before = float(sum(p.ds_tensor.float().abs().sum() for p in vision.parameters()))
    losses = []
    runner.train(lambda m, s: losses.append(m["train/loss"]), tracked())
    after = float(sum(p.ds_tensor.float().abs().sum() for p in vision.parameters()))
    Path(config["out"], f"rank{rank}.json").write_text(
        json.dumps({"media": seen_media, "losses": losses, "vision_changed": after != before})
    )


def test_text_only_rank_and_video_rank_train_together(ray_local, synth_data, tmp_path):
    writer = SplitWriter(tmp_path / "text", samples_per_shard=16)
    for i in range(32):
        writer.write(make_sample(i, 5, "text", SynthSpec(), with_probes=False))
    writer.close()
    job = tiny_job(
        synth_data,
        tmp_path,
        num_frames=4,
        vision_feature_layer=-1,
        stage={"name": "joint", "trainable": ["vision", "projector", "llm"], "steps": STEPS, "optimizer": {"lr": 1e-3}},
        data={"micro_batch_size": 4, "num_workers": 0, "max_length": 256, "shuffle_buffer": 1},
    )
    config = {
        "job": job,
        "out": str(tmp_path),
        "text_split": str(tmp_path / "text"),
        "video_split": str(synth_data / "captions" / "heldout"),
    }
    fit_on_ranks(mismatched_worker, config, tmp_path / "ray", timeout_s=120)
    text_rank, video_rank = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert text_rank["media"] == [0] * STEPS and all(m == 4 * 4 for m in video_rank["media"])
    assert len(text_rank["losses"]) == len(video_rank["losses"]) == STEPS
    # the vision tower trained from the video rank's gradients, on both ranks' shards
    assert text_rank["vision_changed"] and video_rank["vision_changed"]
