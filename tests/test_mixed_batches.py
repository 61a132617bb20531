"""Joint text-only + multimodal training under ZeRO-3: one rank gets only text-only batches while
the other gets only video batches, the vision tower training too, and the run finishes (a
collective timeout turns a hang into a failure)."""
import json
from pathlib import Path


from data_shards.config import ReaderConfig
from data_shards.conversation import get_template
from data_shards.reader import Topology, build_loader
from data_shards.synth import SynthSpec, make_sample
from data_shards.writer import SplitWriter
from trainer.config import EngineConfig, ModelConfig, StageConfig
from trainer.stage import StageJob, prepare_stage
from two_ranks import fit_on_two_ranks, worker_topology

STEPS = 4


def mismatched_worker(config):
    from trainer.loop import train

    topology = worker_topology()
    rank = topology.rank
    job = config["job"]
    stage = prepare_stage(job, topology)
    split = config["text_split"] if rank == 0 else config["video_split"]
    batches = build_loader(split, job.data, stage.tokenizer, get_template(job.stage.template),
                           stage.engine.module.visual_spec(), Topology(0, 1), train=True)
    seen_media = []

    def tracked():
        while True:
            batch = next(batches)
            seen_media.append(int(batch["frame_mask"].sum()))
            yield batch

    vision = stage.engine.module.vision
    before = float(sum(p.ds_tensor.float().abs().sum() for p in vision.parameters()))
    losses = []
    train(stage.engine, tracked(), STEPS, 1, lambda m, s: losses.append(m["train/loss"]), None, 0, stage.health, stage.meter)
    after = float(sum(p.ds_tensor.float().abs().sum() for p in vision.parameters()))
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(
        {"media": seen_media, "losses": losses, "vision_changed": after != before}))


def test_text_only_rank_and_video_rank_train_together(ray_local, synth_data, tmp_path):
    writer = SplitWriter(tmp_path / "text", samples_per_shard=16)
    for i in range(32):
        writer.write(make_sample(i, 5, "text", SynthSpec(), with_probes=False))
    writer.close()
    job = StageJob(
        model=ModelConfig(vision={"tiny": {}}, llm={"tiny": {}}, word_vocab=str(synth_data / "vocab.txt"),
                          num_frames=4, vision_feature_layer=-1),
        engine=EngineConfig(zero_stage=3, param_persistence_threshold=0),
        data=ReaderConfig(micro_batch_size=4, num_workers=0, max_length=256, shuffle_buffer=1),
        stage=StageConfig(name="joint", train_data=str(synth_data / "instruct" / "train"), template="vicuna_v1",
                          trainable=["vision", "projector", "llm"], steps=STEPS, optimizer={"lr": 1e-3}),
        init_export=None, export_dir=str(tmp_path / "export"), checkpoint_dir=str(tmp_path / "ckpt"), seed=0)
    config = {"job": job, "out": str(tmp_path), "text_split": str(tmp_path / "text"),
              "video_split": str(synth_data / "captions" / "heldout")}
    fit_on_two_ranks(mismatched_worker, config, tmp_path / "ray", timeout_s=120)
    text_rank, video_rank = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert text_rank["media"] == [0] * STEPS and all(m == 4 * 4 for m in video_rank["media"])
    assert len(text_rank["losses"]) == len(video_rank["losses"]) == STEPS
    # the vision tower trained from the video rank's gradients, on both ranks' shards
    assert text_rank["vision_changed"] and video_rank["vision_changed"]
