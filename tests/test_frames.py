"""Frame sampling: which frames each mode picks, and that seeking decodes exactly those frames."""

import io
import random

import av
import numpy as np
import pytest

from data_shards.frames import FrameSampling, decode_frames, index_video, pick_indices
from data_shards.media import VisualSpec, decode_media, encode_jpeg, encode_mp4

pytestmark = pytest.mark.unit


def clip(num_frames=90, fps=30, keyframe_interval=10):
    """Frame t has brightness 2t: a decoded frame tells its own index."""
    frames = np.zeros((num_frames, 32, 32, 3), dtype=np.uint8)
    for t in range(num_frames):
        frames[t] = 2 * t
    return encode_mp4(frames, fps=fps, keyframe_interval=keyframe_interval)


def decode_all(data):
    with av.open(io.BytesIO(data)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_index_counts_frames_and_keyframes():
    index = index_video(clip())
    assert len(index.frame_pts) == 90 and len(index.keyframe_pts) == 9
    assert index.duration_s == pytest.approx(3.0)


@pytest.mark.parametrize("mode", ["uniform", "random_segment", "fps"])
def test_seeking_decoder_returns_exactly_the_picked_frames(mode):
    data = clip()
    sampling = FrameSampling(mode, num_frames=8, fps=2.0)
    picked = pick_indices(index_video(data), sampling, random.Random(5))
    frames = decode_frames(data, sampling, random.Random(5))
    full = decode_all(data)
    assert frames.shape[0] == len(picked)
    for frame, i in zip(frames, picked):
        assert np.array_equal(frame, full[i])


def test_modes_pick_where_they_should():
    index = index_video(clip())
    assert pick_indices(index, FrameSampling("uniform", 6), random.Random(0)) == [7, 22, 37, 52, 67, 82]
    # one frame in each of 6 segments of 15 frames, and another draw picks other frames
    draws = [pick_indices(index, FrameSampling("random_segment", 6), random.Random(seed)) for seed in (0, 1)]
    for picked in draws:
        assert [i // 15 for i in picked] == list(range(6))
    assert draws[0] != draws[1]
    # 3 s at 2 fps: 6 frames, every 15th; capped at 4 they spread over the clip
    assert pick_indices(index, FrameSampling("fps", 8, fps=2.0), random.Random(0)) == [0, 15, 30, 45, 60, 75]
    assert pick_indices(index, FrameSampling("fps", 4, fps=2.0), random.Random(0)) == [0, 30, 45, 75]


def test_short_clip_repeats_frames_and_image_is_one_frame():
    data = clip(num_frames=3, keyframe_interval=3)
    frames = decode_frames(data, FrameSampling("uniform", 6))
    assert [round(f.mean() / 2) for f in frames] == [0, 0, 1, 1, 2, 2]  # frames 0 0 1 1 2 2
    visual = VisualSpec(num_frames=6, image_size=16, tokens_per_video=1, tokens_per_image=1)
    kind, pixels = decode_media({"jpg": encode_jpeg(np.zeros((20, 30, 3), np.uint8))}, visual, FrameSampling())
    assert kind == "image" and pixels.shape == (1, 3, 16, 16)
