"""Too many bad samples at read time stop a 2-rank ZeRO-3 run on Ray, every rank together,
with a message naming the shard the skips came from."""

import pytest
from two_ranks import fit_on_ranks, tiny_job, worker_topology

from data_shards.manifest import read_manifest
from data_shards.read.tarstream import iter_samples
from data_shards.write.writer import SplitWriter
from trainer.stage import StageRunner

pytestmark = pytest.mark.ray


def stage_worker(config):
    runner = StageRunner(config["job"], worker_topology())
    runner.train(lambda m, s: None)
    runner.export()


def test_skip_rate_past_threshold_stops_the_run(ray_local, synth_data, tmp_path):
    good = read_manifest(synth_data / "captions" / "train")
    samples = [s for url in good.urls[:4] for s in iter_samples(url)]
    writer = SplitWriter(tmp_path / "split", samples_per_shard=len(samples) // 4)
    for i, sample in enumerate(samples):  # every 8th sample of shard 1 has a broken video
        broken = len(samples) // 4 <= i < len(samples) // 2 and i % 8 == 0
        writer.write({"__key__": sample.key, **sample.members, **({"mp4": b"\x00" * 64} if broken else {})})
    writer.close()
    job = tiny_job(
        synth_data,
        tmp_path,
        num_frames=2,
        stage={
            "name": "pretrain",
            "train_data": str(tmp_path / "split"),
            "template": "plain",
            "trainable": ["projector"],
            "steps": 50,
        },
        data={
            "micro_batch_size": 4,
            "num_workers": 1,
            "max_length": 128,
            "shuffle_buffer": 8,
            "max_skip_fraction": 0.01,
            "skip_check_min_samples": 40,
        },
    )
    with pytest.raises(Exception) as failure:
        fit_on_ranks(stage_worker, {"job": job}, tmp_path / "ray")
    message = str(failure.value)
    assert "more than data.max_skip_fraction 1.0%" in message
    assert f"most in shard {tmp_path / 'split' / 'shard-000001.tar'} (" in message and "undecodable media" in message
    assert not (tmp_path / "export").exists()
