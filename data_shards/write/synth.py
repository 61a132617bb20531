"""A learnable synthetic video-language task: a coloured shape moving over a plain background.

Stage-1 (captions) samples pair a clip with a caption naming colour, shape and direction;
stage-2 (instruct) samples are multi-turn conversations about a clip, with a few still images
and text-only conversations mixed in. Held-out samples carry `probes`: one question per
attribute with its answer and choices, which evaluation asks and scores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from data_shards.media import encode_jpeg, encode_mp4
from data_shards.write.writer import SplitWriter

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40)}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUNDS = ((0, 0, 0), (70, 70, 70), (140, 140, 140))

QUESTIONS = {
    "colour": ("what colour is the shape ?", "it is {colour} ."),
    "shape": ("what shape is it ?", "it is a {shape} ."),
    "direction": ("which way does it move ?", "it moves {direction} ."),
}
DESCRIBE = ("describe the video .", "a {colour} {shape} moving {direction} .")
DESCRIBE_IMAGE = ("describe the image .", "a {colour} {shape} .")
CAPTIONS = (
    "a {colour} {shape} moving {direction} .",
    "the {colour} {shape} moves {direction} .",
    "a {colour} {shape} goes {direction} .",
)
IMAGE_CAPTIONS = ("a {colour} {shape} .", "the {colour} {shape} .")
TEXT_ONLY = (
    ("what is the opposite of left ?", "right ."),
    ("what is the opposite of right ?", "left ."),
    ("what is the opposite of up ?", "down ."),
    ("what is the opposite of down ?", "up ."),
    ("how many sides does a square have ?", "four ."),
    ("how many sides does a triangle have ?", "three ."),
    ("does a circle have corners ?", "no ."),
    ("does a square have corners ?", "yes ."),
)
ATTRIBUTE_CHOICES = {"colour": list(COLOURS), "shape": list(SHAPES), "direction": list(DIRECTIONS)}


@dataclass(frozen=True)
class SynthSpec:
    frame_size: int = 64
    num_frames: int = 16
    fps: int = 8


def draw_shape(size: int, shape: str, cx: float, cy: float, radius: float) -> np.ndarray:
    """Boolean mask [size,size] of `shape` centred at (cx, cy)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xs - cx, ys - cy
    if shape == "square":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "triangle":  # apex up
        return (dy >= -radius) & (dy <= radius) & (np.abs(dx) <= (dy + radius) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def render_clip(
    rng: np.random.Generator, spec: SynthSpec, colour: str, shape: str, direction: str | None
) -> np.ndarray:
    """uint8 frames [T,H,W,3]; `direction=None` renders a still (one frame)."""
    size = spec.frame_size
    radius = rng.uniform(0.2, 0.27) * size
    travel = rng.uniform(0.25, 0.35) * size if direction else 0.0
    dx, dy = DIRECTIONS[direction] if direction else (0, 0)
    lo, hi = radius + 1, size - radius - 1
    # Start so that the whole path stays inside the frame.
    cx0 = rng.uniform(lo + travel * max(-dx, 0), hi - travel * max(dx, 0))
    cy0 = rng.uniform(lo + travel * max(-dy, 0), hi - travel * max(dy, 0))
    background = np.array(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], dtype=np.uint8)
    num_frames = spec.num_frames if direction else 1
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        progress = t / max(num_frames - 1, 1)
        mask = draw_shape(size, shape, cx0 + dx * travel * progress, cy0 + dy * travel * progress, radius)
        frames[t] = background
        frames[t][mask] = COLOURS[colour]
    return frames


def _turns(pairs: list[tuple[str, str]], placeholder: str | None) -> list[dict]:
    turns = []
    for i, (question, answer) in enumerate(pairs):
        prefix = f"{placeholder}\n" if (placeholder and i == 0) else ""
        turns += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    return turns


def make_sample(index: int, seed: int, kind: str, spec: SynthSpec, with_probes: bool) -> dict[str, bytes]:
    """One sample of `kind` (caption | conversation | image_caption | image_conversation | text)."""
    rng = np.random.default_rng([seed, index])
    attrs = {
        "colour": str(rng.choice(list(COLOURS))),
        "shape": str(rng.choice(SHAPES)),
        "direction": str(rng.choice(list(DIRECTIONS))),
    }
    sample: dict[str, bytes] = {"__key__": f"{kind}-{index:07d}"}
    body: dict = {}
    if kind == "text":
        picks = rng.choice(len(TEXT_ONLY), size=int(rng.integers(1, 3)), replace=False)
        body["conversations"] = _turns([TEXT_ONLY[i] for i in picks], None)
    elif kind.startswith("image"):
        del attrs["direction"]
        frame = render_clip(rng, spec, attrs["colour"], attrs["shape"], None)[0]
        sample["jpg"] = encode_jpeg(frame)
        if kind == "image_caption":
            body["conversations"] = _turns([("", str(rng.choice(IMAGE_CAPTIONS)).format(**attrs))], "<image>")
        else:
            asked = [QUESTIONS["colour"], QUESTIONS["shape"], DESCRIBE_IMAGE]
            order = rng.permutation(len(asked))[: int(rng.integers(1, 4))]
            body["conversations"] = _turns([(asked[i][0], asked[i][1].format(**attrs)) for i in order], "<image>")
    else:
        sample["mp4"] = encode_mp4(
            render_clip(rng, spec, attrs["colour"], attrs["shape"], attrs["direction"]), fps=spec.fps
        )
        if kind == "caption":
            body["conversations"] = _turns([("", str(rng.choice(CAPTIONS)).format(**attrs))], "<video>")
        else:
            asked = [*QUESTIONS.values(), DESCRIBE]
            order = rng.permutation(len(asked))[: int(rng.integers(2, 5))]
            body["conversations"] = _turns([(asked[i][0], asked[i][1].format(**attrs)) for i in order], "<video>")
    if kind in ("caption", "conversation"):
        body["attributes"] = attrs
        if with_probes:
            body["probes"] = [
                {"attribute": a, "question": QUESTIONS[a][0], "answer": attrs[a], "choices": ATTRIBUTE_CHOICES[a]}
                for a in QUESTIONS
            ]
    # A caption has no question: the human turn is the placeholder alone.
    for turn in body["conversations"]:
        turn["value"] = turn["value"].strip()
    sample["json"] = json.dumps(body, sort_keys=True).encode()
    return sample


def _sample_kinds(num_samples: int, stage: str, seed: int) -> list[str]:
    """Stage-1 mixes video and image captions; stage-2 adds text-only conversations."""
    rng = np.random.default_rng([seed, 7])
    if stage == "captions":
        options, weights = ["caption", "image_caption"], [0.9, 0.1]
    else:
        options, weights = ["conversation", "image_conversation", "text"], [0.85, 0.1, 0.05]
    return [str(k) for k in rng.choice(options, size=num_samples, p=weights)]


def _make(args) -> dict[str, bytes]:
    return make_sample(*args)


def write_split(
    directory: Path,
    stage: str,
    num_samples: int,
    seed: int,
    spec: SynthSpec,
    samples_per_shard: int,
    heldout: bool,
    processes: int = 2,
) -> Path:
    """Write one split; held-out splits are video-only and carry probes for evaluation."""
    kinds = (
        ["caption" if stage == "captions" else "conversation"] * num_samples
        if heldout
        else _sample_kinds(num_samples, stage, seed)
    )
    writer = SplitWriter(directory, samples_per_shard, {"source": f"synthetic moving shapes ({stage})", "seed": seed})
    jobs = [(i, seed, kind, spec, heldout) for i, kind in enumerate(kinds)]
    with Pool(processes) as pool:
        for sample in pool.imap(_make, jobs, chunksize=16):
            writer.write(sample)
    return writer.close()


def vocabulary() -> list[str]:
    """Every word the synthetic texts can contain (a word-level tokenizer covers the task)."""
    texts = [q for q, _ in QUESTIONS.values()] + [a for _, a in QUESTIONS.values()]
    texts += [*DESCRIBE, *DESCRIBE_IMAGE, *CAPTIONS, *IMAGE_CAPTIONS]
    texts += [t for pair in TEXT_ONLY for t in pair]
    words = {w for text in texts for w in text.split() if "{" not in w}
    words |= set(COLOURS) | set(SHAPES) | set(DIRECTIONS)
    return sorted(words)


def write_synthetic_dataset(
    out: Path,
    train_samples: int,
    heldout_samples: int,
    seed: int = 0,
    samples_per_shard: int = 128,
    spec: SynthSpec = SynthSpec(),
    progress=print,
    processes: int = 2,
) -> dict[str, Path]:
    """Write captions/{train,heldout} and instruct/{train,heldout} splits plus vocab.txt."""
    out = Path(out)
    splits = {}
    for stage_index, stage in enumerate(("captions", "instruct")):
        for split, count, heldout in (("train", train_samples, False), ("heldout", heldout_samples, True)):
            split_seed = seed * 1000 + stage_index * 10 + int(heldout)
            directory = out / stage / split
            # Small splits still get several shards, so every rank and loader worker has some.
            per_shard = min(samples_per_shard, max(1, count // 8))
            progress(f"writing {count} {stage}/{split} samples to {directory}")
            splits[f"{stage}/{split}"] = write_split(
                directory, stage, count, split_seed, spec, per_shard, heldout, processes
            )
    (out / "vocab.txt").write_text("\n".join(vocabulary()) + "\n")
    return splits
