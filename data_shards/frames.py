"""Pick the frames a clip contributes and decode only those.

A cheap demux pass (packets, no decoding) gives every frame's timestamp and where the
keyframes are; the sampler picks frame indices (uniform, one random frame per segment, or a
fixed rate with a cap); the decoder then jumps to the keyframe before a wanted frame whenever
that keyframe lies ahead of where decoding stands, instead of decoding the whole clip.
"""

from __future__ import annotations

import bisect
import io
import random
from dataclasses import dataclass

import av
import numpy as np


class NoFrames(ValueError):
    """The container holds no video frame."""


class DamagedVideo(Exception):
    """A frame the container's index lists does not decode: the stream is damaged."""


@dataclass(frozen=True)
class FrameSampling:
    mode: str = "uniform"  # a key of SAMPLERS
    num_frames: int = 8  # frames per clip (the cap, in fps mode)
    fps: float = 1.0  # fps mode: frames per second of video


@dataclass(frozen=True)
class VideoIndex:
    """Presentation timestamps of every frame (sorted) and of the keyframes, in stream time base."""

    frame_pts: list[int]
    keyframe_pts: list[int]
    time_base: float

    @property
    def duration_s(self) -> float:
        if len(self.frame_pts) < 2:
            return 0.0
        step = (self.frame_pts[-1] - self.frame_pts[0]) / (len(self.frame_pts) - 1)
        return (self.frame_pts[-1] - self.frame_pts[0] + step) * self.time_base


def index_video(data: bytes) -> VideoIndex:
    """Demux (no decoding) and collect frame and keyframe timestamps."""
    with av.open(io.BytesIO(data), metadata_errors="replace") as container:  # damaged tags are no reason to fail
        if not container.streams.video:
            raise NoFrames("no video stream")
        stream = container.streams.video[0]
        frame_pts, keyframe_pts = [], []
        for packet in container.demux(stream):
            if packet.pts is None or packet.size == 0:
                continue
            frame_pts.append(packet.pts)
            if packet.is_keyframe:
                keyframe_pts.append(packet.pts)
        time_base = float(stream.time_base)
    if not frame_pts:
        raise NoFrames("video has no frames")
    return VideoIndex(sorted(frame_pts), sorted(keyframe_pts), time_base)


def uniform_indices(total: int, count: int) -> list[int]:
    """Centres of `count` equal segments; repeats frames when the clip is shorter."""
    return [int((i + 0.5) * total / count) for i in range(count)]


def _uniform(index: VideoIndex, sampling: FrameSampling, rng: random.Random) -> list[int]:
    return uniform_indices(len(index.frame_pts), sampling.num_frames)


def _random_segment(index: VideoIndex, sampling: FrameSampling, rng: random.Random) -> list[int]:
    """One random frame in each of `num_frames` equal segments."""
    total, count = len(index.frame_pts), sampling.num_frames
    bounds = [i * total / count for i in range(count + 1)]
    return [min(total - 1, int(lo) + rng.randrange(max(1, int(hi) - int(lo)))) for lo, hi in zip(bounds, bounds[1:])]


def _fps(index: VideoIndex, sampling: FrameSampling, rng: random.Random) -> list[int]:
    """One frame every 1/fps seconds from the first, at most `num_frames` spread over the clip."""
    step = 1.0 / (sampling.fps * index.time_base)
    wanted = np.arange(index.frame_pts[0], index.frame_pts[-1] + 1, step)
    if len(wanted) > sampling.num_frames:
        wanted = wanted[uniform_indices(len(wanted), sampling.num_frames)]
    return [min(bisect.bisect_left(index.frame_pts, t), len(index.frame_pts) - 1) for t in wanted]


SAMPLERS = {"uniform": _uniform, "random_segment": _random_segment, "fps": _fps}


def pick_indices(index: VideoIndex, sampling: FrameSampling, rng: random.Random) -> list[int]:
    return SAMPLERS[sampling.mode](index, sampling, rng)


def decode_frames(
    data: bytes, sampling: FrameSampling, rng: random.Random | None = None, size: int | None = None
) -> np.ndarray:
    """The sampled frames of an encoded video as uint8 RGB [T,H,W,3] (T <= num_frames in fps
    mode), scaled to size x size by the decoder's scaler when `size` is given."""
    index = index_video(data)
    picked = pick_indices(index, sampling, rng or random.Random(0))
    return decode_at(data, index, [index.frame_pts[i] for i in picked], size)


def decode_at(data: bytes, index: VideoIndex, wanted_pts: list[int], size: int | None = None) -> np.ndarray:
    """Decode the frames at `wanted_pts` (any order, repeats allowed), seeking forward by keyframe."""
    decoded: dict[int, np.ndarray] = {}
    with av.open(io.BytesIO(data), metadata_errors="replace") as container:
        stream = container.streams.video[0]
        frames, last_pts, last_frame = None, None, None
        for target in sorted(set(wanted_pts)):
            if last_pts is not None and last_pts >= target:  # the frame decoded last already covers it
                decoded[target] = last_frame
                continue
            k = bisect.bisect_right(index.keyframe_pts, target) - 1
            # no packet flagged a keyframe (a damaged index): decode from the first frame
            keyframe = index.keyframe_pts[max(k, 0)] if index.keyframe_pts else index.frame_pts[0]
            if frames is None or (last_pts is not None and keyframe > last_pts):
                container.seek(keyframe, backward=True, any_frame=False, stream=stream)
                frames = container.decode(stream)
            for frame in frames:
                last_pts, last_frame = frame.pts, frame
                if frame.pts is not None and frame.pts >= target:
                    break
            else:
                raise DamagedVideo(f"frame at pts {target} could not be decoded")
            decoded[target] = last_frame
        scale = {"width": size, "height": size, "interpolation": "AREA"} if size else {}
        images = {pts: frame.to_ndarray(format="rgb24", **scale) for pts, frame in decoded.items()}
    return np.stack([images[pts] for pts in wanted_pts])
