"""Build-time media re-encoding that makes training cheaper to read.

Videos: decode once, keep frames at a target rate, scale the short side to a target size,
cap the duration, and encode H.264 with a short keyframe interval, so that the reader's
keyframe seeks land close to the frames it wants. Images: scale down to a maximum side.
Both are deterministic (one encoder thread, fixed GOP), so shards stay byte-reproducible.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image

from data_shards.frames import NoFrames
from data_shards.media import encode_mp4


@dataclass(frozen=True)
class TranscodeOptions:
    video_size: int | None = None  # short side in pixels; None keeps the source size
    video_fps: float | None = None  # frames per second kept; None keeps the source rate
    keyframe_interval: int = 8  # frames between keyframes of the re-encoded video
    max_seconds: float | None = None  # longer videos are cut
    image_max_side: int | None = None  # larger images are scaled down (JPEG)

    @property
    def transcodes_video(self) -> bool:
        return any(v is not None for v in (self.video_size, self.video_fps, self.max_seconds))


def _scaled(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    if short_side is not None and min(width, height) > short_side:
        scale = short_side / min(width, height)
        width, height = round(width * scale), round(height * scale)
    return width - width % 2, height - height % 2  # yuv420p needs even sides


def transcode_video(data: bytes, options: TranscodeOptions) -> tuple[bytes, dict]:
    """Re-encoded mp4 bytes and what was kept: {frames, fps, width, height, seconds}."""
    with av.open(io.BytesIO(data), metadata_errors="replace") as container:
        if not container.streams.video:
            raise NoFrames("no video stream")
        stream = container.streams.video[0]
        source_fps = float(stream.average_rate or stream.guessed_rate or 25)
        fps = min(options.video_fps or source_fps, source_fps)
        frames, next_time, start, size = [], 0.0, None, None
        for frame in container.decode(stream):
            if frame.time is None:
                continue
            start = frame.time if start is None else start
            t = frame.time - start
            if options.max_seconds is not None and t >= options.max_seconds:
                break
            if t + 1e-6 < next_time:
                continue
            next_time += 1.0 / fps
            size = size or _scaled(frame.width, frame.height, options.video_size)  # the first frame's, for all
            frames.append(frame.reformat(width=size[0], height=size[1], format="rgb24").to_ndarray())
    if not frames:
        raise NoFrames("video has no decodable frames")
    out_fps = max(1, round(fps))
    encoded = encode_mp4(np.stack(frames), fps=out_fps, keyframe_interval=options.keyframe_interval)
    height, width = frames[0].shape[:2]
    return encoded, {
        "frames": len(frames),
        "fps": out_fps,
        "width": width,
        "height": height,
        "seconds": len(frames) / out_fps,
    }


def shrink_image(data: bytes, max_side: int) -> tuple[bytes, str, tuple[int, int]]:
    """(bytes, extension, (width, height)); re-encoded as JPEG only when a side exceeds `max_side`."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if max(image.size) <= max_side:
            return data, (image.format or "jpeg").lower().replace("jpeg", "jpg"), image.size
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        buffer = io.BytesIO()
        image.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue(), "jpg", size
