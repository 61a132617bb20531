"""Real annotation inputs for the builder tests: PyAV-encoded clips, JPEG stills, a LLaVA JSON
list, a JSONL file with every kind of bad line, and a caption CSV."""

import io
import json
from pathlib import Path

import av
import numpy as np

from data_shards.media import encode_jpeg, encode_mp4


def moving_square(num_frames: int, size: int, fps: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    frames = np.zeros((num_frames, size, size, 3), dtype=np.uint8)
    colour = rng.integers(60, 255, size=3)
    for t in range(num_frames):
        x = int(t * (size - 8) / max(num_frames - 1, 1))
        frames[t, size // 2 - 4 : size // 2 + 4, x : x + 8] = colour
    return encode_mp4(frames, fps=fps, keyframe_interval=fps)


def zero_frame_mp4() -> bytes:
    """An mp4 container with a declared video stream and no frame in it."""
    buffer = io.BytesIO()
    container = av.open(buffer, mode="w", format="mp4")
    stream = container.add_stream("libx264", rate=8)
    stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    container.start_encoding()
    container.close()
    return buffer.getvalue()


def turns(question: str, answer: str | None, placeholder: str | None) -> list[dict]:
    first = f"{placeholder}\n{question}" if placeholder else question
    out = [{"from": "human", "value": first}]
    if answer is not None:
        out.append({"from": "gpt", "value": answer})
    return out


# reason -> how many rejected samples of it the inputs hold
EXPECTED_REJECTS = {
    "missing media": 1,
    "undecodable video": 1,
    "zero-frame video": 1,
    "empty media file": 1,
    "broken json": 1,
    "no assistant turn": 1,
    "placeholder mismatch": 2,
    "invalid utf-8": 1,
    "too long": 1,
}
GOOD_SAMPLES = 8 + 2 + 1 + 3  # JSON videos + JSON images + JSONL text-only + CSV captions


def write_annotation_set(root: Path) -> dict:
    media = root / "media"
    (media / "videos").mkdir(parents=True)
    (media / "images").mkdir()
    for i in range(8):
        (media / "videos" / f"v{i}.mp4").write_bytes(moving_square(24, 48, 12, seed=i))
    for i in range(2):
        (media / "images" / f"i{i}.jpg").write_bytes(encode_jpeg(np.full((40, 56, 3), 40 * i + 50, np.uint8)))
    (media / "videos" / "garbage.mp4").write_bytes(b"\x00\x01not a video" * 50)
    (media / "videos" / "empty.mp4").write_bytes(b"")
    (media / "videos" / "noframes.mp4").write_bytes(zero_frame_mp4())

    llava = [
        {
            "id": f"vid-{i}",
            "video": f"videos/v{i}.mp4",
            "conversations": turns("what moves ?", f"a square moving right , clip {i} .", "<video>"),
        }
        for i in range(8)
    ]
    llava += [
        {
            "id": f"img-{i}",
            "image": f"images/i{i}.jpg",
            "conversations": turns("what is shown ?", "a grey picture .", "<image>"),
        }
        for i in range(2)
    ]
    llava += [
        {"id": "missing", "video": "videos/absent.mp4", "conversations": turns("q ?", "a .", "<video>")},
        {"id": "garbage", "video": "videos/garbage.mp4", "conversations": turns("q ?", "a .", "<video>")},
        {"id": "noframes", "video": "videos/noframes.mp4", "conversations": turns("q ?", "a .", "<video>")},
        {"id": "empty", "video": "videos/empty.mp4", "conversations": turns("q ?", "a .", "<video>")},
        {"id": "two-placeholders", "video": "videos/v0.mp4", "conversations": turns("<video> q ?", "a .", "<video>")},
    ]
    (root / "llava.json").write_text(json.dumps(llava))

    lines = [
        json.dumps({"id": "text-only", "conversations": turns("what is the opposite of up ?", "down .", None)}),
        '{"id": "broken", "conversations": [',
        json.dumps({"id": "no-answer", "video": "videos/v1.mp4", "conversations": turns("q ?", None, "<video>")}),
        json.dumps({"id": "no-placeholder", "video": "videos/v2.mp4", "conversations": turns("q ?", "a .", None)}),
        json.dumps({"id": "long", "conversations": turns("tell me a story", "word " * 200, None)}),
    ]
    jsonl = (
        "\n".join(lines).encode() + b'\n{"id": "latin1", "conversations": [{"from": "human", "value": "caf\xe9"}, '
        b'{"from": "gpt", "value": "ok"}]}\n'
    )
    (root / "chat.jsonl").write_bytes(jsonl)

    (root / "captions.csv").write_text(
        "video,caption\n" + "".join(f'videos/v{i}.mp4,"a square, moving right"\n' for i in range(3))
    )
    return {
        "media": media,
        "annotations": [root / "llava.json", root / "chat.jsonl", root / "captions.csv"],
        "num_input": len(llava) + 6 + 3,
    }
