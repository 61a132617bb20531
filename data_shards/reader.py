"""Stream webdataset shards into training batches.

The pipeline, stage by stage: the split's shards in a seeded per-epoch order -> this rank's
shards -> this DataLoader worker's shards -> tar members grouped into samples -> a seeded
shuffle buffer -> decode media (PyAV), sample frames, resize, normalize, tokenize with the
conversation template -> batches. Samples that cannot be used are skipped and counted by
reason; each batch carries the counts since the previous batch in `batch["rejected"]`.
"""
from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info

from data_shards.config import ReaderConfig
from data_shards.conversation import IGNORE_INDEX, SampleError, Template, encode_conversation
from data_shards.manifest import read_manifest
from data_shards.media import decode_image, decode_video_frames, to_model_pixels

log = logging.getLogger(__name__)
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class VisualSpec:
    """What the model expects of media: decided by the model, consumed by the reader."""
    num_frames: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tokens_per_video: int
    tokens_per_image: int

    @property
    def tokens(self) -> dict[str, int]:
        return {"video": self.tokens_per_video, "image": self.tokens_per_image}


@dataclass(frozen=True)
class Topology:
    """Where this process sits: rank and world size of the training job."""
    rank: int = 0
    world_size: int = 1


class RejectCounter:
    """Counts skipped samples by reason inside one DataLoader worker."""

    def __init__(self):
        self.counts: Counter = Counter()

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        log.warning("skipped sample %s: %s", where, reason)

    def tar_error(self, err: Exception) -> bool:
        self.add("corrupt tar member", str(err))
        return True  # keep reading

    def drain(self) -> dict[str, int]:
        counts, self.counts = dict(self.counts), Counter()
        return counts


class ShardOrder(torch.utils.data.IterableDataset):
    """Yields {"url": ...} for this rank and worker, epoch after epoch when `repeat`."""

    def __init__(self, urls: list[str], topology: Topology, seed: int, repeat: bool, shuffle: bool):
        self.urls, self.topology, self.seed, self.repeat, self.shuffle = urls, topology, seed, repeat, shuffle

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        epoch = 0
        while True:
            order = list(self.urls)
            if self.shuffle:
                random.Random(f"{self.seed}-{epoch}").shuffle(order)
            mine = order[self.topology.rank:: self.topology.world_size][worker_id::num_workers]
            yield from ({"url": url} for url in mine)
            if not self.repeat:
                return
            epoch += 1


def shuffled(samples: Iterator[dict], buffer_size: int, seed: str) -> Iterator[dict]:
    """Shuffle buffer with its own RNG, seeded per rank (`seed`) and DataLoader worker."""
    worker = get_worker_info()
    rng, buffer = random.Random(f"{seed}-{worker.id if worker else 0}"), []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= buffer_size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


def decode_media(raw: dict, visual: VisualSpec) -> tuple[str | None, torch.Tensor | None]:
    """A raw sample's media: ("video" | "image" | None, model-ready pixels [T,3,S,S] or None)."""
    video_ext = next((e for e in VIDEO_EXTS if e in raw), None)
    image_ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if video_ext:
        kind, frames = "video", decode_video_frames(raw[video_ext], visual.num_frames)
    elif image_ext:
        kind, frames = "image", decode_image(raw[image_ext])
    else:
        return None, None
    return kind, to_model_pixels(frames, visual.image_size, visual.mean, visual.std)


class SampleDecoder:
    """Raw tar sample -> model-ready sample, or None (counted) when unusable."""

    def __init__(self, tokenizer, template: Template, visual: VisualSpec, max_length: int, rejects: RejectCounter):
        self.tokenizer, self.template, self.visual = tokenizer, template, visual
        self.max_length, self.rejects = max_length, rejects

    def __call__(self, raw: dict) -> dict | None:
        where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
        try:
            return self.decode(raw)
        except SampleError as err:
            self.rejects.add(err.reason, f"{where} ({err})")
        except json.JSONDecodeError:
            self.rejects.add("broken json", where)
        except Exception as err:  # noqa: BLE001 - any decoder failure is a bad sample, counted
            self.rejects.add("undecodable media", f"{where} ({type(err).__name__}: {err})")
        return None

    def decode(self, raw: dict) -> dict:
        if "json" not in raw:
            raise SampleError("missing json", "sample has no .json member")
        meta = json.loads(raw["json"])
        media_kind, pixels = decode_media(raw, self.visual)
        input_ids, labels = encode_conversation(self.tokenizer, self.template, meta.get("conversations", []),
                                                media_kind, self.visual.tokens, self.max_length)
        return {"key": raw["__key__"], "input_ids": input_ids, "labels": labels, "pixels": pixels}


def collate(samples: list[dict], pad_id: int, visual: VisualSpec) -> dict:
    """Right-padded ids/labels/attention mask; frames [B,T,3,S,S] with a frame mask
    (an image fills frame 0, text-only samples have no valid frame)."""
    batch_size, length = len(samples), max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((batch_size, length), pad_id, dtype=torch.long)
    labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    size = visual.image_size
    frames = torch.zeros((batch_size, visual.num_frames, 3, size, size))
    frame_mask = torch.zeros((batch_size, visual.num_frames), dtype=torch.bool)
    for b, sample in enumerate(samples):
        n = len(sample["input_ids"])
        input_ids[b, :n] = torch.tensor(sample["input_ids"])
        labels[b, :n] = torch.tensor(sample["labels"])
        attention_mask[b, :n] = 1
        if sample["pixels"] is not None:
            t = sample["pixels"].shape[0]
            frames[b, :t], frame_mask[b, :t] = sample["pixels"], True
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "frames": frames, "frame_mask": frame_mask, "keys": [s["key"] for s in samples]}


def batched(samples: Iterator[dict | None], batch_size: int, pad_id: int, visual: VisualSpec,
            rejects: RejectCounter) -> Iterator[dict]:
    pending = []
    for sample in samples:
        if sample is None:
            continue
        pending.append(sample)
        if len(pending) == batch_size:
            batch = collate(pending, pad_id, visual)
            batch["rejected"] = rejects.drain()
            pending = []
            yield batch


def build_pipeline(split: str, config: ReaderConfig, tokenizer, template: Template, visual: VisualSpec,
                   topology: Topology, train: bool) -> wds.DataPipeline:
    """A split's shards as an endless stream of batches for this rank.

    Training reads shuffled; evaluation reads in order. Both repeat, so every rank can take
    the same number of batches whatever its share of shards.
    """
    manifest = read_manifest(split)
    needed = topology.world_size * max(config.num_workers, 1)
    if len(manifest.shards) < needed:
        raise ValueError(f"{split}: {len(manifest.shards)} shards cannot feed {topology.world_size} ranks x "
                         f"{max(config.num_workers, 1)} workers; write at least {needed} shards")
    rejects = RejectCounter()
    stages = [
        ShardOrder(manifest.urls, topology, config.seed, repeat=True, shuffle=train),
        wds.tarfile_to_samples(handler=rejects.tar_error),
    ]
    if train and config.shuffle_buffer > 1:
        stages.append(lambda src: shuffled(src, config.shuffle_buffer, f"{config.seed}-{topology.rank}"))
    stages += [
        wds.map(SampleDecoder(tokenizer, template, visual, config.max_length, rejects)),
        lambda src: batched(src, config.micro_batch_size, tokenizer.pad_token_id, visual, rejects),
    ]
    return wds.DataPipeline(*stages)


def build_loader(split: str, config: ReaderConfig, tokenizer, template: Template, visual: VisualSpec,
                 topology: Topology, train: bool) -> DataLoader:
    pipeline = build_pipeline(split, config, tokenizer, template, visual, topology, train)
    return DataLoader(pipeline, batch_size=None, num_workers=config.num_workers,
                      persistent_workers=config.num_workers > 0)
