"""Build-time transcoding vs training-time decode cost (BENCHMARKS.md, section d).

The same clips (640x360, 30 fps, 10 s, a keyframe every 250 frames as x264 writes by default)
built into shards as they are and transcoded (short side 224, 4 fps, a keyframe every 4 frames);
then the reader's per-clip decode (8 frames at 224x224, uniform and random-segment) timed on both.

    python bench/bench_transcode.py --work /tmp/vf-bench-transcode [--clips 24]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from clips import write_clips  # noqa: E402

from data_shards.frames import FrameSampling  # noqa: E402
from data_shards.manifest import read_manifest  # noqa: E402
from data_shards.media import VisualSpec, decode_media  # noqa: E402
from data_shards.read.tarstream import iter_samples  # noqa: E402
from data_shards.write.ingest import IngestOptions  # noqa: E402
from data_shards.write.shards import BuildOptions, build_shards  # noqa: E402
from data_shards.write.transcode import TranscodeOptions  # noqa: E402

VISUAL = VisualSpec(num_frames=8, image_size=224, tokens_per_video=64, tokens_per_image=8)
TRANSCODE = TranscodeOptions(video_size=224, video_fps=4, keyframe_interval=4)


def build(annotations: Path, media: Path, out: Path, transcode: TranscodeOptions) -> tuple[float, int]:
    """(build seconds, shard bytes), built from scratch."""
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    build_shards(
        [str(annotations)],
        out,
        BuildOptions(IngestOptions(str(media), transcode), samples_per_shard=8),
        workers=2,
        show_progress=False,
    )
    return time.perf_counter() - started, read_manifest(out).extra["source_statistics"]["sample_bytes_out"]


def decode_ms(shards: Path, mode: str, repeats: int) -> float:
    videos = [s.members for url in read_manifest(shards).urls for s in iter_samples(url)]
    sampling, rng = FrameSampling(mode, VISUAL.num_frames), random.Random(0)
    started = time.perf_counter()
    for _ in range(repeats):
        for members in videos:
            decode_media(members, VISUAL, sampling, rng)
    return (time.perf_counter() - started) / (repeats * len(videos)) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/vf-bench-transcode"))
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    annotations = write_clips(args.work / "raw", args.clips, 640, 360, seconds=10, fps=30, keyframe_interval=250)
    rows = []
    for name, options in (("as is", TranscodeOptions()), ("transcoded", TRANSCODE)):
        out = args.work / name.replace(" ", "_")
        seconds, size = build(annotations, args.work / "raw", out, options)
        rows.append(
            (
                name,
                seconds / args.clips,
                size / args.clips / 1024,
                decode_ms(out, "uniform", args.repeats),
                decode_ms(out, "random_segment", args.repeats),
            )
        )
    print("| shards | build s/clip | KiB/clip | decode ms/clip, uniform | decode ms/clip, random segment |")
    print("|---|---|---|---|---|")
    for name, build_s, kib, uniform, segment in rows:
        print(f"| {name} | {build_s:.2f} | {kib:.0f} | {uniform:.1f} | {segment:.1f} |")
    print(
        f"speed-up at training time: uniform {rows[0][3] / rows[1][3]:.1f}x, "
        f"random segment {rows[0][4] / rows[1][4]:.1f}x"
    )


if __name__ == "__main__":
    main()
