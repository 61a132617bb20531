"""Synthetic benchmark clips: textured moving shapes, H.264, with a chosen size, length and
keyframe interval, written as mp4 files plus a LLaVA-style JSON list."""

from __future__ import annotations

import json
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from data_shards.media import encode_mp4


def render(seed: int, width: int, height: int, num_frames: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    background = ((xs * rng.uniform(0.2, 0.6) + ys * rng.uniform(0.2, 0.6)) % 256).astype(np.uint8)
    texture = rng.integers(0, 40, size=(height, width), dtype=np.uint8)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    size = min(width, height) // 4
    vx, vy = rng.uniform(-3, 3, size=2)
    x0, y0 = rng.uniform(size, width - 2 * size), rng.uniform(size, height - 2 * size)
    colour = rng.integers(80, 255, size=3, dtype=np.uint8)
    for t in range(num_frames):
        frame = np.repeat((background + texture)[..., None], 3, axis=2)
        x = int(x0 + vx * t) % (width - size)
        y = int(y0 + vy * t) % (height - size)
        frame[y : y + size, x : x + size] = colour
        frames[t] = frame
    return frames


def _write(args) -> str:
    path, seed, width, height, num_frames, fps, keyframe_interval = args
    Path(path).write_bytes(encode_mp4(render(seed, width, height, num_frames), fps, keyframe_interval))
    return path


def write_clips(
    directory: Path,
    count: int,
    width: int,
    height: int,
    seconds: float,
    fps: int,
    keyframe_interval: int,
    processes: int = 2,
) -> Path:
    """`count` mp4 files under directory/videos and directory/annotations.json; returns the JSON."""
    (directory / "videos").mkdir(parents=True, exist_ok=True)
    jobs = [
        (str(directory / "videos" / f"clip{i:04d}.mp4"), i, width, height, int(seconds * fps), fps, keyframe_interval)
        for i in range(count)
        if not (directory / "videos" / f"clip{i:04d}.mp4").is_file()
    ]
    with Pool(processes) as pool:
        pool.map(_write, jobs)
    annotations = [
        {
            "id": f"clip{i:04d}",
            "video": f"videos/clip{i:04d}.mp4",
            "conversations": [
                {"from": "human", "value": "<video>\ndescribe the video ."},
                {"from": "gpt", "value": "a square moving ."},
            ],
        }
        for i in range(count)
    ]
    path = directory / "annotations.json"
    path.write_text(json.dumps(annotations))
    return path
