"""`valleyforge shards build` from real annotation formats, `inspect` and `verify`."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import pytest
from annotation_fixtures import EXPECTED_REJECTS, GOOD_SAMPLES, moving_square, write_annotation_set
from PIL import Image

from data_shards.config import ReaderConfig
from data_shards.conversation import get_template
from data_shards.errors import ValleyForgeError
from data_shards.frames import index_video
from data_shards.manifest import read_manifest, sha256_file
from data_shards.media import VisualSpec
from data_shards.read.reader import Topology, build_loader
from data_shards.read.tarstream import iter_samples
from data_shards.tokenizer import build_word_tokenizer
from data_shards.write.ingest import IngestOptions
from data_shards.write.shards import BuildOptions, build_shards
from data_shards.write.transcode import TranscodeOptions
from data_shards.write.writer import write_tar

pytestmark = pytest.mark.unit
VISUAL = VisualSpec(num_frames=4, image_size=16, tokens_per_video=5, tokens_per_image=2)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_annotation_set(tmp_path_factory.mktemp("annotations"))


def build(inputs, out, workers=2, **transcode):
    options = BuildOptions(
        IngestOptions(str(inputs["media"]), TranscodeOptions(**transcode), max_tokens=100), samples_per_shard=4
    )
    return build_shards([str(p) for p in inputs["annotations"]], out, options, workers=workers, show_progress=False)


def shard_hashes(out: Path) -> dict:
    return {p.name: sha256_file(p) for p in sorted(out.glob("*.tar"))}


def test_every_input_is_written_or_rejected_with_its_reason(inputs, tmp_path):
    summary = build(inputs, tmp_path / "out")
    assert summary.num_input == inputs["num_input"] == summary.num_written + sum(summary.rejects.values())
    assert summary.num_written == GOOD_SAMPLES and summary.rejects == dict(sorted(EXPECTED_REJECTS.items()))
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert {r["id"]: r["reason"] for r in rejects if r["id"]}["garbage"] == "undecodable video"
    broken = next(r for r in rejects if r["reason"] == "broken json")
    assert broken["source"].endswith("chat.jsonl:2")
    manifest = read_manifest(tmp_path / "out")
    assert manifest.num_samples == GOOD_SAMPLES and manifest.extra["rejects"] == summary.rejects
    assert manifest.extra["source_statistics"]["samples_by_kind"] == {"video": 11, "image": 2, "text": 1}
    assert manifest.extra["source_statistics"]["video_seconds_total"] == pytest.approx(22.0)
    for entry, url in zip(manifest.shards, manifest.urls):
        assert entry.samples <= 4 and sha256_file(Path(url)) == entry.sha256
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_build_is_byte_identical_and_resumes_skipping_done_chunks(inputs, tmp_path):
    build(inputs, tmp_path / "a")
    build(inputs, tmp_path / "b", workers=1)
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b")
    # An interrupted build: chunk 2 never finished (a temp shard left behind), no manifest yet.
    out = tmp_path / "a"
    (out / ".build" / "chunk-000002.json").unlink()
    (out / "shard-000002-00.tar").rename(out / "shard-000002-00.tar.tmp")
    (out / "manifest.json").unlink()
    summary = build(inputs, out)
    assert summary.skipped_chunks == 5 and shard_hashes(out) == shard_hashes(tmp_path / "b")
    assert not list(out.glob("*.tmp")) and (out / "manifest.json").is_file()
    with pytest.raises(ValleyForgeError, match="other annotations or options"):
        build(inputs, out, video_size=16)


def test_byte_limit_splits_shards(inputs, tmp_path):
    options = BuildOptions(
        IngestOptions(str(inputs["media"]), max_tokens=100), samples_per_shard=8, max_shard_bytes=20480
    )
    summary = build_shards([str(inputs["annotations"][0])], tmp_path / "out", options, show_progress=False)
    manifest = read_manifest(tmp_path / "out")
    assert summary.num_written == 10 and len(manifest.shards) > 2
    for entry in manifest.shards:  # a shard passes the target only when one sample alone does
        assert entry.samples == 1 or entry.bytes <= 20480


def test_built_shards_train_and_captions_become_conversations(inputs, tmp_path):
    build(inputs, tmp_path / "out")
    words = "what moves is shown the opposite of up down a square moving right clip grey picture , . ? 0 1 2 3 4 5 6 7"
    tok = build_word_tokenizer(words.split())
    cfg = ReaderConfig(micro_batch_size=GOOD_SAMPLES, num_workers=0, shuffle_buffer=1)
    batch = next(build_loader(str(tmp_path / "out"), cfg, tok, get_template("vicuna_v1"), VISUAL, Topology(), False))
    assert batch["rejected"] == {} and len(batch["keys"]) == GOOD_SAMPLES
    assert sorted(int(m.sum()) for m in batch["frame_mask"]) == [0] + [1] * 2 + [4] * 11
    caption = next(s for s in iter_samples(str(tmp_path / "out" / "shard-000005-00.tar")))
    turns = json.loads(caption.members["json"])["conversations"]
    assert turns == [{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "a square, moving right"}]


def test_transcode_sets_size_rate_keyframes_and_duration(inputs, tmp_path):
    build(inputs, tmp_path / "out", video_size=32, video_fps=6, keyframe_interval=3, max_seconds=1.0, image_max_side=20)
    samples = [s for url in read_manifest(tmp_path / "out").urls for s in iter_samples(url)]
    video = next(s for s in samples if "mp4" in s.members)
    index = index_video(video.members["mp4"])
    assert len(index.frame_pts) == 6 and len(index.keyframe_pts) == 2  # 1 s at 6 fps, a keyframe every 3
    with av.open(io.BytesIO(video.members["mp4"])) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (32, 32)
    image = next(s for s in samples if "jpg" in s.members)
    assert max(Image.open(io.BytesIO(image.members["jpg"])).size) == 20


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )


def test_cli_build_inspect_verify(inputs, tmp_path):
    out = tmp_path / "out"
    built = run_cli(
        "shards",
        "build",
        *map(str, inputs["annotations"]),
        "--media-root",
        str(inputs["media"]),
        "--out",
        str(out),
        "--samples-per-shard",
        "4",
        "--workers",
        "2",
        "--max-tokens",
        "100",
    )
    assert built.returncode == 0, built.stderr
    assert f"{inputs['num_input']} input samples = {GOOD_SAMPLES} written + 10 rejected" in built.stdout
    inspected = run_cli("shards", "inspect", str(out), "--sheet", str(tmp_path / "sheet.png"))
    assert inspected.returncode == 0, inspected.stderr
    assert f"samples: {GOOD_SAMPLES} (image 2, text 1, video 11)" in inspected.stdout
    assert "video seconds: total 22.0, mean 2.00" in inspected.stdout
    assert Image.open(tmp_path / "sheet.png").size == (4 * 96 + 8, 6 * (96 + 40))
    assert run_cli("shards", "verify", str(out)).returncode == 0

    # Damage one sample's video inside a shard (same size: the tar stays readable).
    shard = out / "shard-000000-00.tar"
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".mp4"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data : member.offset_data + member.size] = b"\x00" * member.size
    shard.write_bytes(bytes(data))
    verified = run_cli("shards", "verify", str(out))
    assert verified.returncode == 1
    assert f"{shard}:-: sha256 differs from the manifest" in verified.stderr
    assert f"{shard}:{member.name.split('.')[0]}: " in verified.stderr


def test_video2dataset_shards_are_read_as_they_are(tmp_path):
    """video2dataset writes {key}.mp4 + {key}.txt + {key}.json (metadata) per sample, no manifest."""
    for shard in range(2):
        samples = [
            {
                "__key__": f"{shard:05d}{i:04d}",
                "mp4": moving_square(16, 32, 8, seed=i),
                "txt": f"a square moving right {i}".encode(),
                "json": json.dumps({"url": f"https://example.com/{i}.mp4", "status": "success"}).encode(),
            }
            for i in range(3)
        ]
        write_tar(tmp_path / f"{shard:05d}.tar", samples)
    tok = build_word_tokenizer("a square moving right 0 1 2".split())
    cfg = ReaderConfig(micro_batch_size=6, num_workers=0, shuffle_buffer=1)
    batch = next(
        build_loader(str(tmp_path / "{00000..00001}.tar"), cfg, tok, get_template("plain"), VISUAL, Topology(), False)
    )
    assert batch["rejected"] == {} and batch["frame_mask"].all()
    supervised = [tok.decode(ids[labels != -100]) for ids, labels in zip(batch["input_ids"], batch["labels"])]
    assert supervised[0] == "a square moving right 0 </s>"
