"""Shards: what is written is what is read (keys, counts, bytes); the manifest is right."""

import numpy as np
import pytest
import webdataset as wds

from data_shards.frames import FrameSampling, decode_frames
from data_shards.manifest import read_manifest, sha256_file
from data_shards.read.tarstream import iter_samples
from data_shards.write.writer import SplitWriter

pytestmark = pytest.mark.unit


def test_round_trip_keys_counts_bytes(tmp_path):
    rng = np.random.default_rng(0)
    written = {}
    writer = SplitWriter(tmp_path / "split", samples_per_shard=4, extra_manifest={"source": "test"})
    for i in range(10):
        sample = {
            "__key__": f"s{i:03d}",
            "json": f'{{"i": {i}}}'.encode(),
            "bin": rng.bytes(int(rng.integers(1, 5000))),
        }
        written[sample["__key__"]] = sample
        writer.write(sample)
    writer.close()

    manifest = read_manifest(tmp_path / "split")
    assert [s.samples for s in manifest.shards] == [4, 4, 2]
    assert manifest.num_samples == 10 and manifest.extra["source"] == "test"
    for entry, url in zip(manifest.shards, manifest.urls):
        assert entry.sha256 == sha256_file(url)
        assert entry.bytes == len(open(url, "rb").read())

    read = {s["__key__"]: s for s in wds.DataPipeline(wds.SimpleShardList(manifest.urls), wds.tarfile_to_samples())}
    assert set(read) == set(written)
    for key, sample in written.items():
        assert read[key]["json"] == sample["json"] and read[key]["bin"] == sample["bin"]
    assert not list((tmp_path / "split").glob("*.tmp")), "temporary shard files left behind"


def test_same_samples_give_byte_identical_shards(tmp_path):
    for name in ("a", "b"):
        writer = SplitWriter(tmp_path / name, samples_per_shard=8)
        for i in range(3):
            writer.write({"__key__": f"k{i}", "txt": b"same"})
        writer.close()
    assert sha256_file(tmp_path / "a" / "shard-000000.tar") == sha256_file(tmp_path / "b" / "shard-000000.tar")


def test_synthetic_splits_decode(synth_data):
    manifest = read_manifest(synth_data / "instruct" / "train")
    assert manifest.num_samples == 256
    sample = next(s for s in iter_samples(manifest.urls[0]) if "mp4" in s.members)
    frames = decode_frames(sample.members["mp4"], FrameSampling("uniform", 8))
    assert frames.shape == (8, 64, 64, 3) and frames.dtype == np.uint8
