"""The reader: batches shaped for the model, ranks reading disjoint shards, bad samples counted."""

import json

import numpy as np
import pytest
import torch

import data_shards.read.reader as reader_module
from data_shards.config import ReaderConfig
from data_shards.conversation import get_template
from data_shards.manifest import read_manifest
from data_shards.media import VisualSpec, encode_jpeg
from data_shards.read.reader import Topology, build_loader
from data_shards.read.tarstream import iter_samples
from data_shards.tokenizer import build_word_tokenizer
from data_shards.write.synth import vocabulary
from data_shards.write.writer import SplitWriter

pytestmark = pytest.mark.unit
VISUAL = VisualSpec(num_frames=4, image_size=32, tokens_per_video=20, tokens_per_image=17)


def keys_of(loader, num_batches):
    it = iter(loader)
    return [key for _ in range(num_batches) for key in next(it)["keys"]]


def test_batches_have_model_shapes(synth_data):
    tok = build_word_tokenizer(vocabulary())
    loader = build_loader(
        str(synth_data / "instruct" / "train"),
        ReaderConfig(micro_batch_size=4, num_workers=1),
        tok,
        get_template("vicuna_v1"),
        VISUAL,
        Topology(0, 1),
        train=True,
    )
    batch = next(iter(loader))
    assert batch["frames"].shape == (4, 4, 3, 32, 32) and batch["frame_mask"].shape == (4, 4)
    visual_id = tok.convert_tokens_to_ids("<visual>")
    for b in range(4):  # visual slots per sample match its media: 20 (video), 17 (image), 0 (text)
        slots, frames = int((batch["input_ids"][b] == visual_id).sum()), int(batch["frame_mask"][b].sum())
        assert slots == {4: 20, 1: 17, 0: 0}[frames]
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_ranks_read_disjoint_shards_and_shuffle_is_seeded(synth_data):
    tok = build_word_tokenizer(vocabulary())
    split = str(synth_data / "captions" / "train")
    cfg = ReaderConfig(micro_batch_size=8, num_workers=0, shuffle_buffer=16, seed=3)
    rank_keys = [
        keys_of(build_loader(split, cfg, tok, get_template("plain"), VISUAL, Topology(r, 2), True), 8) for r in range(2)
    ]
    assert not set(rank_keys[0]) & set(rank_keys[1])
    again = keys_of(build_loader(split, cfg, tok, get_template("plain"), VISUAL, Topology(0, 2), True), 8)
    assert again == rank_keys[0]
    other_seed = keys_of(
        build_loader(
            split, cfg.model_copy(update={"seed": 4}), tok, get_template("plain"), VISUAL, Topology(0, 2), True
        ),
        8,
    )
    assert other_seed != rank_keys[0]


def test_bad_samples_are_skipped_and_counted(tmp_path, synth_data):
    tok = build_word_tokenizer(vocabulary())
    good = read_manifest(synth_data / "captions" / "heldout")
    samples = [{"__key__": s.key, **s.members} for s in iter_samples(good.urls[0])]
    writer = SplitWriter(tmp_path / "mixed", samples_per_shard=100)
    for s in samples:
        writer.write(s)
    writer.write({"__key__": "broken-json", "json": b"{not json", "mp4": samples[0]["mp4"]})
    writer.write({"__key__": "bad-video", "json": samples[0]["json"], "mp4": b"\x00" * 100})
    writer.write(
        {
            "__key__": "no-placeholder",
            "mp4": samples[0]["mp4"],
            "json": json.dumps(
                {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a red circle ."}]}
            ).encode(),
        }
    )
    writer.close()
    cfg = ReaderConfig(micro_batch_size=len(samples), num_workers=0, shuffle_buffer=1)
    loader = build_loader(str(tmp_path / "mixed"), cfg, tok, get_template("plain"), VISUAL, Topology(0, 1), False)
    it = iter(loader)
    first, second = next(it), next(it)
    assert sorted(first["keys"]) == sorted(s["__key__"] for s in samples)
    assert second["rejected"] == {"broken json": 1, "undecodable media": 1, "placeholder mismatch": 1}
    shard = str(tmp_path / "mixed" / "shard-000000.tar")
    assert second["rejected_by_shard"] == {
        (shard, "broken json"): 1,
        (shard, "undecodable media"): 1,
        (shard, "placeholder mismatch"): 1,
    }
    assert first["seen"] + second["seen"] == 2 * len(samples) + 3
    assert "broken-json" not in second["keys"] and isinstance(second["frames"], torch.Tensor)


def test_damaged_media_is_counted_and_a_bug_in_decoding_propagates(tmp_path, synth_data, monkeypatch):
    """A truncated mp4 or jpg is a bad sample, skipped and counted; an error that is not the media
    libraries' (a bug in the decoding code) stops the reader with its traceback."""
    tok = build_word_tokenizer(vocabulary())
    good = next(iter_samples(read_manifest(synth_data / "captions" / "heldout").urls[0]))
    image_json = json.loads(good.members["json"])
    image_json["conversations"][0]["value"] = "<image>"
    still = encode_jpeg(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    writer = SplitWriter(tmp_path / "damaged", samples_per_shard=100)
    writer.write({"__key__": "good", **good.members})
    video = good.members["mp4"]
    writer.write({"__key__": "cut-video", "json": good.members["json"], "mp4": video[: len(video) // 2]})
    writer.write({"__key__": "cut-image", "json": json.dumps(image_json).encode(), "jpg": still[: len(still) // 2]})
    writer.close()
    cfg = ReaderConfig(micro_batch_size=1, num_workers=0, shuffle_buffer=1)

    it = iter(build_loader(str(tmp_path / "damaged"), cfg, tok, get_template("plain"), VISUAL, Topology(0, 1), False))
    first, second = next(it), next(it)  # in order: good, then both damaged ones skipped, then good again
    assert first["keys"] == second["keys"] == ["good"]
    assert first["rejected"] == {} and second["rejected"] == {"undecodable media": 2}

    def broken_decoder(*args, **kwargs):
        raise TypeError("a bug in the decoding code")

    monkeypatch.setattr(reader_module, "decode_media", broken_decoder)
    loader = build_loader(str(tmp_path / "damaged"), cfg, tok, get_template("plain"), VISUAL, Topology(0, 1), False)
    with pytest.raises(TypeError, match="a bug in the decoding code"):
        next(iter(loader))
