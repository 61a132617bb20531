"""Stream webdataset shards into training batches, resumably.

The pipeline, stage by stage: each source's shards in a seeded per-epoch order -> this
rank's shards -> this DataLoader worker's (slot's) shards -> tar samples -> a seeded mixture
of sources -> a seeded shuffle buffer (data_shards/read/stream.py) -> decode media (PyAV, only
the sampled frames, scaled by the decoder to the model's size; pixels stay uint8 and the model
normalizes them) -> tokenize with the conversation template -> batches.
Samples that cannot be used are skipped and counted by reason and shard; each batch carries
the counts since the previous batch of its slot, and the slot's state after it, from which
`ShardLoader.load_state_dict` resumes exactly.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_shards.read.batching import collate
from data_shards.config import DataSource, ReaderConfig, as_sources
from data_shards.conversation import SampleError, Template, conversations_of, encode_conversation
from data_shards.frames import FrameSampling
from data_shards.media import VisualSpec, decode_media
from data_shards.read.sources import shard_urls
from data_shards.read.health import ReadHealth
from data_shards.read.stream import ShardLists, SlotSetup, SlotStream
from data_shards.read.tarstream import RawSample

STATE_VERSION = 1
SHARD_LEVEL_REASONS = ("corrupt tar member", "unreadable shard")


@dataclass(frozen=True)
class Topology:
    """Where this process sits: rank and world size of the training job."""
    rank: int = 0
    world_size: int = 1


class SampleDecoder:
    """Raw tar sample -> model-ready sample, or None (counted) when unusable."""

    def __init__(self, tokenizer, template: Template, visual: VisualSpec, sampling: FrameSampling, max_length: int,
                 seed: int, rejects: ReadHealth):
        self.tokenizer, self.template, self.visual, self.sampling = tokenizer, template, visual, sampling
        self.max_length, self.seed, self.rejects = max_length, seed, rejects

    def __call__(self, raw: RawSample) -> dict | None:
        try:
            return self.decode(raw)
        except SampleError as err:
            self.rejects.reject(err.reason, raw.url, f"{raw.key}: {err}")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            self.rejects.reject("broken json", raw.url, f"{raw.key}: {err}")
        except Exception as err:  # noqa: BLE001 - any decoder failure is a bad sample, counted
            self.rejects.reject("undecodable media", raw.url, f"{raw.key}: {type(err).__name__}: {err}")
        return None

    def decode(self, raw: RawSample) -> dict:
        # Random frame choices depend on the sample and epoch only: a resumed run draws the same.
        rng = random.Random(f"{self.seed}-{raw.url}-{raw.offset}-{raw.epoch}")
        media_kind, pixels = decode_media(raw.members, self.visual, self.sampling, rng)
        conversations = conversations_of(raw.members, media_kind)
        input_ids, labels = encode_conversation(self.tokenizer, self.template, conversations, media_kind,
                                                self.visual.tokens, self.max_length)
        return {"key": raw.key, "input_ids": input_ids, "labels": labels, "pixels": pixels}


@dataclass(frozen=True)
class ReaderSetup:
    """Everything a reader slot needs besides its position (plain data: it is sent to workers)."""
    data: ShardLists
    config: ReaderConfig
    tokenizer: object
    template: Template
    visual: VisualSpec
    topology: Topology
    train: bool


class SlotDataset(IterableDataset):
    """What each DataLoader worker runs: its slot's stream, decoded and batched.

    Worker `w` serves slot `(w + rotation) % slots`: a resumed loader starts with the slot
    whose turn was next, as the DataLoader always asks worker 0 first.
    """

    def __init__(self, setup: ReaderSetup, slot_states: list[dict | None], rotation: int):
        self.setup, self.slot_states, self.rotation = setup, slot_states, rotation

    def __iter__(self):
        setup, cfg = self.setup, self.setup.config
        worker = get_worker_info()
        worker_id, num_slots = (worker.id, worker.num_workers) if worker else (0, 1)
        slot = (worker_id + self.rotation) % num_slots
        slot_setup = SlotSetup(setup.data, cfg.seed, shuffle=setup.train,
                        rank=setup.topology.rank, world_size=setup.topology.world_size, slot=slot, num_slots=num_slots)
        rejects = ReadHealth()  # this slot's skips, handed out with each batch
        stream = SlotStream(slot_setup, cfg.mixing, cfg.shuffle_buffer if setup.train else 1,
                            lambda err: rejects.reject(err.reason, err.url, str(err)),
                            self.slot_states[slot])
        sampling = FrameSampling(cfg.frame_sampling if setup.train else "uniform", setup.visual.num_frames,
                                 cfg.sample_fps)
        decoder = SampleDecoder(setup.tokenizer, setup.template, setup.visual, sampling, cfg.max_length, cfg.seed,
                                rejects)
        pending, seen = [], 0
        for raw in stream:
            seen += 1
            sample = decoder(raw)
            if sample is None:
                continue
            pending.append(sample)
            if len(pending) == cfg.micro_batch_size:
                batch = collate(pending, setup.tokenizer.pad_token_id, setup.visual,
                                cfg.max_length if cfg.packing else None)
                rejected, rejected_by_shard = rejects.drain()
                # An unreadable shard or tar member counts once, on top of the samples read.
                batch.update(seen=seen + sum(n for (_, reason), n in rejected_by_shard.items()
                                             if reason in SHARD_LEVEL_REASONS),
                             rejected=rejected, rejected_by_shard=rejected_by_shard,
                             reader_state={"slot": slot, "stream": stream.state()})
                pending, seen = [], 0
                yield batch


class ShardLoader:
    """An endless iterator of one rank's batches with a `state_dict()` that resumes it.

    The state holds, per slot, the stream state after the last batch handed out, and which
    slot hands out the next batch. Resuming needs the same ranks, slots and sources.
    """

    def __init__(self, setup: ReaderSetup):
        self.setup = setup
        self.num_slots = max(setup.config.num_workers, 1)
        self.slot_states: list[dict | None] = [None] * self.num_slots
        self.next_slot = 0
        self._batches = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._batches is None:
            dataset = SlotDataset(self.setup, list(self.slot_states), self.next_slot)
            workers = self.setup.config.num_workers
            self._batches = iter(DataLoader(dataset, batch_size=None, num_workers=workers,
                                            persistent_workers=workers > 0))
        batch = next(self._batches)
        state = batch.pop("reader_state")
        self.slot_states[state["slot"]] = state["stream"]
        self.next_slot = (state["slot"] + 1) % self.num_slots
        return batch

    def _fingerprint(self) -> dict:
        return {"world_size": self.setup.topology.world_size, "rank": self.setup.topology.rank,
                "num_slots": self.num_slots, "sources": [list(urls) for urls in self.setup.data.shards],
                "seed": self.setup.config.seed}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, **self._fingerprint(), "next_slot": self.next_slot,
                "slots": list(self.slot_states)}

    def load_state_dict(self, state: dict) -> None:
        if self._batches is not None:
            raise RuntimeError("load the reader state before reading the first batch")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"reader state version {state.get('version')!r}, expected {STATE_VERSION}")
        mine = self._fingerprint()
        for field_name, value in mine.items():
            if state.get(field_name) != value:
                shown = value if field_name != "sources" else f"{sum(map(len, value))} shards"
                raise ValueError(f"cannot resume the reader: its saved {field_name} differs from this run's "
                                 f"({shown}); resume with the same cluster.num_workers, data.num_workers, "
                                 f"data.seed and data sources")
        self.slot_states, self.next_slot = list(state["slots"]), state["next_slot"]


def shard_lists(data: str | list[DataSource]) -> ShardLists:
    """A stage's data (a split, shard URLs or a mixture) expanded to each source's shard URLs."""
    sources = as_sources(data)
    return ShardLists(tuple(s.url for s in sources), tuple(s.weight for s in sources),
                      tuple(tuple(shard_urls(s.url)) for s in sources))


def check_enough_shards(data: ShardLists, world_size: int, loader_workers: int) -> None:
    """Every rank x DataLoader worker (slot) must get a shard of each source."""
    needed = world_size * max(loader_workers, 1)
    for name, shards in zip(data.names, data.shards):
        if len(shards) < needed:
            raise ValueError(f"{name}: {len(shards)} shards cannot feed {world_size} ranks x "
                             f"{max(loader_workers, 1)} readers (cluster.num_workers x data.num_workers); "
                             f"write at least {needed} shards")


def build_loader(data: ShardLists | str | list[DataSource], config: ReaderConfig, tokenizer, template: Template,
                 visual: VisualSpec, topology: Topology, train: bool) -> ShardLoader:
    """Training reads shuffled (and mixed, when several sources); evaluation reads in order.
    Both repeat, so every rank can take the same number of batches whatever its share. `data`
    is expanded here unless it comes as the driver's ShardLists."""
    data = data if isinstance(data, ShardLists) else shard_lists(data)
    check_enough_shards(data, topology.world_size, config.num_workers)
    return ShardLoader(ReaderSetup(data, config, tokenizer, template, visual, topology, train))
