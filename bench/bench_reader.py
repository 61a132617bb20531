"""Reader benchmarks (BENCHMARKS.md, sections a-c).

a. clips/s of one DataLoader worker process reading 8 frames at 224x224 from shards, against
   the decode floor: the same frames of the same files decoded by PyAV in a tight loop;
b. the same against a LLaVA/Valley-style loader: a JSON list, one mp4 per sample, every frame
   decoded and 8 picked, in one DataLoader worker;
c. time to the first batch of a resumed reader, at 10% and 90% of an epoch, and of a fresh one.

    python bench/bench_reader.py --work /tmp/vf-bench [--clips 96]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import av
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).parent))
from clips import write_clips  # noqa: E402

from data_shards.config import ReaderConfig  # noqa: E402
from data_shards.conversation import encode_conversation, get_template  # noqa: E402
from data_shards.frames import FrameSampling, decode_frames, uniform_indices  # noqa: E402
from data_shards.manifest import read_manifest  # noqa: E402
from data_shards.media import VisualSpec  # noqa: E402
from data_shards.read.batching import collate  # noqa: E402
from data_shards.read.reader import Topology, build_loader  # noqa: E402
from data_shards.read.tarstream import iter_samples  # noqa: E402
from data_shards.tokenizer import build_word_tokenizer  # noqa: E402
from data_shards.write.ingest import IngestOptions  # noqa: E402
from data_shards.write.shards import BuildOptions, build_shards  # noqa: E402

FRAMES, SIZE, BATCH = 8, 224, 8
VISUAL = VisualSpec(num_frames=FRAMES, image_size=SIZE, tokens_per_video=64, tokens_per_image=8)
CLIP_MEAN, CLIP_STD = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)
TOKENIZER = build_word_tokenizer("describe the video . a square moving".split())
TEMPLATE = get_template("vicuna_v1")


def prepare(work: Path, clips: int) -> tuple[Path, Path]:
    """224x224 clips, 8 s at 25 fps, a keyframe every 2 s; their shards (as they are)."""
    annotations = write_clips(work / "raw", clips, 224, 224, seconds=8, fps=25, keyframe_interval=50)
    shards = work / "shards"
    if not (shards / "manifest.json").is_file():
        build_shards(
            [str(annotations)],
            shards,
            BuildOptions(IngestOptions(str(work / "raw")), samples_per_shard=8),
            workers=2,
            show_progress=False,
        )
    return annotations, shards


def decode_floor(shards: Path, seconds: float) -> float:
    """clips/s: PyAV decoding the 8 sampled frames of each clip, from memory, in a tight loop."""
    videos = [s.members["mp4"] for url in read_manifest(shards).urls for s in iter_samples(url)]
    sampling = FrameSampling("uniform", FRAMES)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        decode_frames(videos[done % len(videos)], sampling, size=SIZE)
        done += 1
    return done / (time.perf_counter() - started)


def timed_batches(loader, seconds: float) -> float:
    """clips/s over batches after the first (worker start-up excluded)."""
    batches = iter(loader)
    next(batches)
    clips, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        clips += len(next(batches)["keys"])
    return clips / (time.perf_counter() - started)


def our_reader(shards: Path, shuffle_buffer: int = 64):
    cfg = ReaderConfig(micro_batch_size=BATCH, num_workers=1, shuffle_buffer=shuffle_buffer, max_length=256)
    return build_loader(str(shards), cfg, TOKENIZER, TEMPLATE, VISUAL, Topology(), train=True)


def clip_processor(frames_THWC: np.ndarray) -> torch.Tensor:
    """What a CLIP image processor hands the model: resized, normalized float32 [T,3,S,S]."""
    pixels = torch.from_numpy(frames_THWC).permute(0, 3, 1, 2).float().div_(255.0)
    if pixels.shape[-2:] != (SIZE, SIZE):
        pixels = torch.nn.functional.interpolate(pixels, size=(SIZE, SIZE), mode="bicubic", antialias=True)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def collate_float(samples: list[dict]) -> dict:
    batch = collate([{**s, "pixels": None} for s in samples], TOKENIZER.pad_token_id, VISUAL)
    batch["frames"] = torch.stack([s["pixels"] for s in samples])
    return batch


class LlavaStyleDataset(Dataset):
    """The common pattern: a JSON list in memory, one video file per sample, decode all frames."""

    def __init__(self, annotations: Path):
        self.root = annotations.parent
        self.items = json.loads(annotations.read_text())

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        with av.open(str(self.root / item["video"])) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        picked = np.stack([frames[j] for j in uniform_indices(len(frames), FRAMES)])
        ids, labels = encode_conversation(TOKENIZER, TEMPLATE, item["conversations"], "video", VISUAL.tokens, 256)
        return {"key": item["id"], "input_ids": ids, "labels": labels, "pixels": clip_processor(picked)}


def llava_loader(annotations: Path):
    dataset = LlavaStyleDataset(annotations)
    return DataLoader(
        dataset,
        batch_size=BATCH,
        num_workers=1,
        persistent_workers=True,
        collate_fn=collate_float,
        sampler=torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9),
    )


def resume_first_batch(shards: Path, fraction: float) -> tuple[float, float]:
    """(seconds to read up to `fraction` of an epoch, seconds to the first batch after resuming there)."""
    epoch_batches = read_manifest(shards).num_samples // BATCH
    reader = our_reader(shards)
    started = time.perf_counter()
    for _ in range(max(1, int(fraction * epoch_batches))):
        next(reader)
    reached = time.perf_counter() - started
    state = json.loads(json.dumps(reader.state_dict()))
    del reader
    resumed = our_reader(shards)
    started = time.perf_counter()
    resumed.load_state_dict(state)
    next(resumed)
    return reached, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/vf-bench"))
    parser.add_argument("--clips", type=int, default=96)
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring time per throughput figure")
    args = parser.parse_args()
    torch.set_num_threads(1)
    annotations, shards = prepare(args.work, args.clips)

    floor = decode_floor(shards, args.seconds)
    ours = timed_batches(our_reader(shards), args.seconds)
    llava = timed_batches(llava_loader(annotations), args.seconds)
    print(
        f"a. decode floor {floor:.1f} clips/s; ValleyForge reader {ours:.1f} clips/s per worker "
        f"= {ours / floor:.2f} of the floor"
    )
    print(f"b. LLaVA-style loader {llava:.1f} clips/s per worker; ValleyForge / LLaVA-style = {ours / llava:.2f}x")
    fresh = time.perf_counter()
    next(our_reader(shards))
    fresh = time.perf_counter() - fresh
    print(f"c. first batch of a fresh reader: {fresh:.2f} s")
    for fraction in (0.1, 0.9):
        reached, resumed = resume_first_batch(shards, fraction)
        print(
            f"c. resume at {fraction:.0%} of the epoch: first batch after {resumed:.2f} s "
            f"(reading up to there took {reached:.1f} s)"
        )


if __name__ == "__main__":
    main()
