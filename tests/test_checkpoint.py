"""The trainer's checkpoint on 2 ZeRO-3 ranks under Ray: a run that dies after its step-3
checkpoint, resumed by new worker processes, trains steps 4-6 on the same batches with the
same losses as a run that never stopped."""
import json
from pathlib import Path


from data_shards.config import ReaderConfig
from trainer.config import EngineConfig, ModelConfig, StageConfig
from trainer.stage import StageJob, prepare_stage
from two_ranks import fit_on_two_ranks, worker_topology

STEPS, CRASH_AT = 6, 4


class SimulatedCrash(Exception):
    pass


def resume_worker(config):
    from trainer.loop import train

    topology = worker_topology()
    rank = topology.rank
    job, mode = config["job"], config["mode"]
    stage = prepare_stage(job, topology)
    start = stage.checkpointer.restore() if mode == "resume" else 0
    keys, losses = {}, {}

    def recorded():
        while True:
            batch = next(stage.train_batches)
            keys.setdefault(len(keys) + 1 + start, batch["keys"])
            yield batch

    def log(metrics, step):
        losses[step] = metrics["train/loss"]
        if mode == "crash" and step == CRASH_AT:
            raise SimulatedCrash

    try:
        train(stage.engine, recorded(), STEPS, 1, log, None, 0, stage.health, stage.meter, start,
              stage.checkpointer.save if mode == "crash" else None, checkpoint_every=3)
    except SimulatedCrash:
        pass
    out = {"start": start, "keys": keys, "losses": losses}
    Path(config["out"], f"{mode}-rank{rank}.json").write_text(json.dumps(out))


def run(mode, job, out):
    fit_on_two_ranks(resume_worker, {"job": job, "mode": mode, "out": str(out)}, out / "ray")
    return [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in range(2)]


def test_resume_after_crash_matches_uninterrupted_run(ray_local, synth_data, tmp_path):
    job = StageJob(
        model=ModelConfig(vision={"tiny": {}}, llm={"tiny": {}}, word_vocab=str(synth_data / "vocab.txt"),
                          num_frames=4),
        engine=EngineConfig(zero_stage=3, param_persistence_threshold=0),
        data=ReaderConfig(micro_batch_size=4, num_workers=1, max_length=256, shuffle_buffer=32,
                          frame_sampling="random_segment"),
        stage=StageConfig(name="instruct", train_data=str(synth_data / "instruct" / "train"), template="vicuna_v1",
                          trainable=["projector", "llm"], steps=STEPS, optimizer={"lr": 3e-3}),
        init_export=None, export_dir=str(tmp_path / "export"), checkpoint_dir=str(tmp_path / "ckpt"), seed=0)
    full = run("full", job, tmp_path)
    crashed = run("crash", job, tmp_path)
    assert (tmp_path / "ckpt" / "latest").read_text() == "step-00000003"
    resumed = run("resume", job, tmp_path)
    for rank in range(2):
        assert resumed[rank]["start"] == 3
        assert crashed[rank]["keys"]["1"] == full[rank]["keys"]["1"]
        for step in ("4", "5", "6"):
            assert resumed[rank]["keys"][step] == full[rank]["keys"][step]
            assert abs(resumed[rank]["losses"][step] - full[rank]["losses"][step]) < 1e-5
