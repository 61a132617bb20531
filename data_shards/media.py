"""Media as both directions see it: which members of a sample are media, what the model expects
of them (VisualSpec), encoding (H.264 mp4 clips with PyAV, JPEG stills), and decoding a
sample's media into uint8 frame tensors. Frame sampling lives in data_shards/frames.py."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import av
import numpy as np
import torch
from PIL import Image

from data_shards.frames import DamagedVideo, FrameSampling, NoFrames, decode_frames

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# What decoding a damaged or unsupported media member raises, as truncated and garbled mp4, webm,
# jpg, png and webp files show: PyAV's FFmpegError family (InvalidDataError, EOFError,
# PatchWelcomeError, ...), PIL's OSError family (UnidentifiedImageError, "image file is
# truncated", "broken data stream") and its DecompressionBombError, and ours for a container
# without usable frames. Whatever else decoding raises is a bug.
MEDIA_ERRORS = (av.error.FFmpegError, OSError, Image.DecompressionBombError, NoFrames, DamagedVideo)


@dataclass(frozen=True)
class VisualSpec:
    """What the model expects of media: decided by the model, consumed by the reader."""

    num_frames: int
    image_size: int
    tokens_per_video: int
    tokens_per_image: int

    @property
    def tokens(self) -> dict[str, int]:
        return {"video": self.tokens_per_video, "image": self.tokens_per_image}


def media_kind(ext: str) -> str | None:
    """ "video", "image" or None for a file extension (lower case, no dot)."""
    return "video" if ext in VIDEO_EXTS else "image" if ext in IMAGE_EXTS else None


def find_media(members: dict[str, bytes]) -> tuple[str | None, str | None]:
    """(kind, extension) of a sample's media member; (None, None) for a text-only sample."""
    ext = next((e for e in VIDEO_EXTS + IMAGE_EXTS if e in members), None)
    return (media_kind(ext), ext) if ext else (None, None)


def encode_mp4(frames_THWC: np.ndarray, fps: int, keyframe_interval: int = 8) -> bytes:
    """Encode uint8 RGB frames as an H.264 mp4 (yuv420p) in memory."""
    num_frames, height, width, _ = frames_THWC.shape
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # Deterministic output: one thread, fixed GOP, no scene-cut keyframes.
        stream.options = {"g": str(keyframe_interval), "sc_threshold": "0", "threads": "1"}
        stream.thread_count = 1
        for frame in frames_THWC:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def encode_jpeg(image_HWC: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image_HWC).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decode_image(data: bytes, size: int | None = None) -> np.ndarray:
    """Decode an encoded still image to RGB [1,H,W,3] (an image is a one-frame clip), resized to
    size x size when `size` is given."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        return np.array(image)[None]


def to_frame_tensor(frames_THWC: np.ndarray) -> torch.Tensor:
    """uint8 frames [T,H,W,3] -> uint8 tensor [T,3,H,W]. Pixels stay uint8 until the model
    normalizes them: a quarter of the bytes through worker queues and host-to-device copies."""
    return torch.from_numpy(np.ascontiguousarray(frames_THWC.transpose(0, 3, 1, 2)))


def decode_media(
    members: dict[str, bytes], visual: VisualSpec, sampling: FrameSampling, rng: random.Random | None = None
) -> tuple[str | None, torch.Tensor | None]:
    """A sample's media: ("video" | "image" | None, uint8 frames [T,3,S,S] or None)."""
    kind, ext = find_media(members)
    if kind == "video":
        frames = decode_frames(members[ext], sampling, rng, visual.image_size)
    elif kind == "image":
        frames = decode_image(members[ext], visual.image_size)
    else:
        return None, None
    return kind, to_frame_tensor(frames)
