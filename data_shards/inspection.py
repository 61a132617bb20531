"""`valleyforge shards inspect` and `valleyforge shards verify`.

inspect: sample counts by kind, video durations, a token-length histogram, and a PNG contact
sheet of a few samples' frames with their text.
verify: every shard's sha256 against the manifest, and every sample decoded (json, media);
each problem is reported with its shard and key.
"""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from data_shards.conversation import SampleError, conversations_of
from data_shards.errors import ValleyForgeError
from data_shards.frames import decode_at, index_video, uniform_indices
from data_shards.manifest import MANIFEST_NAME, read_manifest, sha256_file
from data_shards.media import MEDIA_ERRORS, decode_image, find_media
from data_shards.read.sources import shard_urls
from data_shards.read.tarstream import CorruptShard, RawSample, iter_samples

SHEET_FRAMES = 4
THUMB = 96


def _samples(urls: list[str], desc: str) -> Iterator[RawSample]:
    for url in tqdm(urls, desc=desc, unit="shard"):
        yield from iter_samples(url)


@dataclass
class Inspection:
    counts: Counter = field(default_factory=Counter)
    seconds: list[float] = field(default_factory=list)
    token_lengths: list[int] = field(default_factory=list)
    sheet_rows: list[tuple[np.ndarray, str]] = field(default_factory=list)

    def report(self) -> str:
        lines = [
            f"samples: {sum(self.counts.values())} ("
            + ", ".join(f"{k} {n}" for k, n in sorted(self.counts.items()))
            + ")"
        ]
        if self.seconds:
            s = np.array(self.seconds)
            lines.append(
                f"video seconds: total {s.sum():.1f}, mean {s.mean():.2f}, min {s.min():.2f}, max {s.max():.2f}"
            )
        lines.append("text length histogram:")
        lines += histogram_lines(self.token_lengths)
        return "\n".join(lines)


def histogram_lines(values: list[int], width: int = 40) -> list[str]:
    """Power-of-two buckets, one bar line each."""
    if not values:
        return ["  (no text)"]
    buckets = Counter(max(0, int(v).bit_length() - 1) for v in values)
    top = max(buckets.values())
    return [
        f"  {2**b if b else 0:>6}-{2 ** (b + 1) - 1:<6} {n:>7} {'#' * max(1, round(width * n / top))}"
        for b, n in sorted(buckets.items())
    ]


def inspect_shards(spec: str, count_tokens: Callable[[str], int], sheet_samples: int = 6) -> Inspection:
    result = Inspection()
    for sample in _samples(shard_urls(spec), "inspecting"):
        kind, ext = find_media(sample.members)
        result.counts[kind or "text"] += 1
        try:
            turns = conversations_of(sample.members, kind)
        except (ValueError, UnicodeDecodeError):
            turns = []
        text = " ".join(str(t.get("value", "")) for t in turns)
        result.token_lengths.append(count_tokens(text))
        try:
            index = index_video(sample.members[ext]) if kind == "video" else None
            if index:
                result.seconds.append(index.duration_s)
            if kind and len(result.sheet_rows) < sheet_samples:
                frames = (
                    decode_at(
                        sample.members[ext],
                        index,
                        [index.frame_pts[i] for i in uniform_indices(len(index.frame_pts), SHEET_FRAMES)],
                    )
                    if index
                    else decode_image(sample.members[ext])
                )
                result.sheet_rows.append((frames, f"{sample.key}: {text}"))
        except MEDIA_ERRORS as err:
            raise ValleyForgeError(
                f"{sample.url}: sample {sample.key}: undecodable {kind} ({type(err).__name__}: "
                f"{err}); `valleyforge shards verify` lists every damaged sample"
            ) from err
    return result


def contact_sheet(rows: list[tuple[np.ndarray, str]], path: str | Path) -> Path:
    """One row per sample: its frames as thumbnails, its text below."""
    text_height = 40
    sheet = Image.new("RGB", (SHEET_FRAMES * THUMB + 8, max(1, len(rows)) * (THUMB + text_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (frames, text) in enumerate(rows):
        top = r * (THUMB + text_height)
        for c, frame in enumerate(frames[:SHEET_FRAMES]):
            sheet.paste(Image.fromarray(frame).resize((THUMB, THUMB)), (c * THUMB + 4, top))
        lines = textwrap.wrap(text, width=60)[:2]
        draw.text((4, top + THUMB + 2), "\n".join(lines), fill="black")
    path = Path(path)
    try:
        sheet.save(path)
    except ValueError as err:  # PIL's "unknown file extension"
        raise ValleyForgeError(f"{path}: {err} (name the contact sheet .png or .jpg)") from err
    return path


@dataclass
class Problem:
    shard: str
    key: str
    what: str

    def __str__(self) -> str:
        return f"{self.shard}:{self.key}: {self.what}"


def verify_shards(spec: str) -> tuple[int, list[Problem]]:
    """(samples decoded, problems); sha256 is checked when the spec has a manifest."""
    problems: list[Problem] = []
    path = Path(spec)
    has_manifest = path.is_dir() and (path / MANIFEST_NAME).is_file() or path.name == MANIFEST_NAME
    expected = {}
    if has_manifest:
        manifest = read_manifest(spec)
        for entry, url in zip(manifest.shards, manifest.urls):
            expected[url] = entry
            if not Path(url).is_file():
                problems.append(Problem(url, "-", "shard file missing"))
            elif sha256_file(Path(url)) != entry.sha256:
                problems.append(Problem(url, "-", f"sha256 differs from the manifest ({entry.sha256[:12]}...)"))
    urls = [u for u in shard_urls(spec) if not has_manifest or Path(u).is_file()]
    decoded = 0
    for url in tqdm(urls, desc="verifying", unit="shard"):
        count = 0
        try:
            for sample in iter_samples(url):
                count += 1
                problem = _check_sample(sample)
                if problem:
                    problems.append(Problem(url, sample.key, problem))
                else:
                    decoded += 1
        except CorruptShard as err:
            problems.append(Problem(url, f"byte {err.offset}", f"tar unreadable: {err}"))
        if url in expected and count != expected[url].samples:
            problems.append(Problem(url, "-", f"{count} samples, manifest says {expected[url].samples}"))
    return decoded, problems


def _check_sample(sample: RawSample) -> str | None:
    kind, ext = find_media(sample.members)
    try:
        if "json" in sample.members:
            json.loads(sample.members["json"])
        conversations_of(sample.members, kind)
        if kind == "video":  # every frame
            index = index_video(sample.members[ext])
            decode_at(sample.members[ext], index, index.frame_pts)
        elif kind == "image":
            decode_image(sample.members[ext])
    except (SampleError, json.JSONDecodeError, UnicodeDecodeError, *MEDIA_ERRORS) as err:  # anything else: a bug
        return f"{type(err).__name__}: {err}"
    return None
