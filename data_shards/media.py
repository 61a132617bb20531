"""Encode media (H.264 mp4 clips with PyAV, JPEG stills), decode still images, and turn frames
into model pixels. Video decoding with frame sampling lives in data_shards/frames.py."""
from __future__ import annotations

import io

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


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


def decode_image(data: bytes) -> np.ndarray:
    """Decode an encoded still image to RGB [1,H,W,3] (an image is a one-frame clip)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))[None]


def to_model_pixels(frames_THWC: np.ndarray, image_size: int, mean, std) -> torch.Tensor:
    """Resize uint8 frames to the vision encoder's square input and normalize: [T,3,S,S] float32."""
    pixels = torch.from_numpy(frames_THWC).permute(0, 3, 1, 2).float().div_(255.0)
    if pixels.shape[-2:] != (image_size, image_size):
        pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear",
                               align_corners=False, antialias=True)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t
