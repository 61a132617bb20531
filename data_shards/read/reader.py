"""Stream webdataset shards into training batches, resumably, on any number of ranks.

The pipeline, stage by stage: each source's shards in a seeded per-epoch order -> a stream's
shards (the stage's data is split into a fixed number of streams) -> tar samples -> a seeded
mixture of sources -> a seeded shuffle buffer (data_shards/read/stream.py) -> decode media
(PyAV, only the sampled frames, scaled by the decoder to the model's size; pixels stay uint8 and
the model normalizes them) -> tokenize with the conversation template -> micro-batches, each
from one stream. Each rank reads its share of the streams, spread over its DataLoader workers.
Samples that cannot be used are skipped and counted by reason and shard; each batch carries
the counts since the previous batch of its worker, and its stream's state after it, from which
`ShardLoader.load_state_dict` resumes exactly.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from torch.utils.data import DataLoader, IterableDataset

from data_shards.config import DataSource, ReaderConfig, as_sources
from data_shards.conversation import SampleError, Template, conversations_of, encode_conversation
from data_shards.errors import ValleyForgeError
from data_shards.frames import FrameSampling
from data_shards.media import MEDIA_ERRORS, VisualSpec, decode_media
from data_shards.read.batching import collate
from data_shards.read.health import ReadHealth
from data_shards.read.sources import shard_urls
from data_shards.read.stream import SampleStream, ShardLists, StreamSetup
from data_shards.read.tarstream import RawSample

STATE_VERSION = 2
SHARD_LEVEL_REASONS = ("corrupt tar member", "unreadable shard")


@dataclass(frozen=True)
class Topology:
    """Where this process sits: rank and world size of the training job."""

    rank: int = 0
    world_size: int = 1


class SampleDecoder:
    """Raw tar sample -> model-ready sample, or None (counted) when unusable: broken json or text,
    damaged media, a conversation the template cannot take. Anything else raised while decoding
    is a bug, and propagates."""

    def __init__(
        self,
        tokenizer,
        template: Template,
        visual: VisualSpec,
        sampling: FrameSampling,
        max_length: int,
        seed: int,
        rejects: ReadHealth,
    ):
        self.tokenizer, self.template, self.visual, self.sampling = tokenizer, template, visual, sampling
        self.max_length, self.seed, self.rejects = max_length, seed, rejects

    def __call__(self, raw: RawSample) -> dict | None:
        try:
            return self.decode(raw)
        except SampleError as err:
            self.rejects.reject(err.reason, raw.url, f"{raw.key}: {err}")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            self.rejects.reject("broken json", raw.url, f"{raw.key}: {err}")
        return None

    def decode(self, raw: RawSample) -> dict:
        # Random frame choices depend on the sample and epoch only: a resumed run draws the same.
        rng = random.Random(f"{self.seed}-{raw.url}-{raw.offset}-{raw.epoch}")
        try:
            media_kind, pixels = decode_media(raw.members, self.visual, self.sampling, rng)
        except MEDIA_ERRORS as err:  # a damaged or unsupported media member
            raise SampleError("undecodable media", f"{type(err).__name__}: {err}") from err
        conversations = conversations_of(raw.members, media_kind)
        input_ids, labels = encode_conversation(
            self.tokenizer, self.template, conversations, media_kind, self.visual.tokens, self.max_length
        )
        return {"key": raw.key, "input_ids": input_ids, "labels": labels, "pixels": pixels}


@dataclass(frozen=True)
class ReaderSetup:
    """Everything a rank's reader needs besides its position (plain data: it is sent to workers)."""

    data: ShardLists
    config: ReaderConfig
    tokenizer: object
    template: Template
    visual: VisualSpec
    topology: Topology
    train: bool
    num_streams: int


def micro_batches_of(rank: int, world: int, num_streams: int, first: int, count: int) -> list[int]:
    """Which of the stage's micro-batches `first` .. `first + count - 1` rank `rank` of `world`
    reads: micro-batch j comes from stream j mod S, and rank r reads the streams v with v mod W == r."""
    return [j for j in range(first, first + count) if j % num_streams % world == rank]


class StreamDataset(IterableDataset):
    """What one loader worker runs: its streams, each decoded and batched, one batch from each in
    turn, `streams[0]` first."""

    def __init__(self, setup: ReaderSetup, streams: list[int], positions: dict[int, dict | None]):
        self.setup, self.streams, self.positions = setup, streams, positions

    def __iter__(self):
        rejects = ReadHealth()  # this worker's skips, handed out with the batch they were met for
        batches = [self._batches(stream, rejects) for stream in self.streams]
        while True:
            for stream_batches in batches:
                yield next(stream_batches)

    def _batches(self, stream_id: int, rejects: ReadHealth):
        setup, cfg = self.setup, self.setup.config
        stream_setup = StreamSetup(
            setup.data, cfg.seed, shuffle=setup.train, stream=stream_id, num_streams=setup.num_streams
        )
        stream = SampleStream(
            stream_setup,
            cfg.mixing,
            cfg.shuffle_buffer if setup.train else 1,
            lambda err: rejects.reject(err.reason, err.url, str(err)),
            self.positions[stream_id],
        )
        sampling = FrameSampling(
            cfg.frame_sampling if setup.train else "uniform", setup.visual.num_frames, cfg.sample_fps
        )
        decoder = SampleDecoder(
            setup.tokenizer, setup.template, setup.visual, sampling, cfg.max_length, cfg.seed, rejects
        )
        pending, seen = [], 0
        for raw in stream:
            seen += 1
            sample = decoder(raw)
            if sample is None:
                continue
            pending.append(sample)
            if len(pending) == cfg.micro_batch_size:
                batch = collate(
                    pending, setup.tokenizer.pad_token_id, setup.visual, cfg.max_length if cfg.packing else None
                )
                rejected, rejected_by_shard = rejects.drain()
                # An unreadable shard or tar member counts once, on top of the samples read.
                batch.update(
                    seen=seen + sum(n for (_, reason), n in rejected_by_shard.items() if reason in SHARD_LEVEL_REASONS),
                    rejected=rejected,
                    rejected_by_shard=rejected_by_shard,
                    reader_state={"stream": stream_id, "position": stream.state()},
                )
                pending, seen = [], 0
                yield batch


class ShardLoader:
    """An endless iterator of one rank's batches with a `state_dict()` that resumes it, on these
    or any other numbers of ranks and loader workers.

    The stage's micro-batch j comes from stream j mod S; rank r of W reads the streams v with
    v mod W == r (`micro_batches_of`), in turn. So the sequence of micro-batches depends on the
    data, the seed and S only. Its `data.num_workers` loader workers (each its own DataLoader
    with one worker process, so that any number of streams shares them) take the rank's streams
    in turn. A rank's state holds how many batches it took and its streams' positions after
    them; `merge_states` joins the ranks' states into the stage's.
    """

    def __init__(self, setup: ReaderSetup):
        self.setup = setup
        self.streams = list(range(setup.topology.rank, setup.num_streams, setup.topology.world_size))
        self.positions: dict[int, dict | None] = {stream: None for stream in self.streams}
        self.taken = 0  # batches this rank handed out
        self._workers: list | None = None
        self._peeked: dict | None = None

    def __iter__(self):
        return self

    def _open(self) -> None:
        """One DataLoader per loader worker (none: read in this process), the rank's streams dealt
        out in turn: worker w serves the streams at w, w + n, ... of the rank's list, each in the
        order the rank takes them from its next one on."""
        count, first = len(self.streams), self.taken % len(self.streams)
        processes = min(self.setup.config.num_workers, count)
        groups = max(processes, 1)
        self._workers = []
        for worker in range(groups):
            own = sorted(range(worker, count, groups), key=lambda i: (i - first) % count)
            dataset = StreamDataset(
                self.setup,
                [self.streams[i] for i in own],
                {self.streams[i]: self.positions[self.streams[i]] for i in own},
            )
            self._workers.append(
                iter(
                    DataLoader(
                        dataset, batch_size=None, num_workers=min(processes, 1), persistent_workers=processes > 0
                    )
                )
            )

    def _read(self) -> dict:
        """The rank's next batch as read, its stream's position after it included."""
        if self._peeked is not None:
            batch, self._peeked = self._peeked, None
            return batch
        if self._workers is None:
            self._open()
        index = self.taken % len(self.streams)
        batch = next(self._workers[index % len(self._workers)])
        assert batch["reader_state"]["stream"] == self.streams[index], "batches out of stream order"
        return batch

    def __next__(self) -> dict:
        batch = self._read()
        state = batch.pop("reader_state")
        self.positions[state["stream"]] = state["position"]
        self.taken += 1
        return batch

    def peek(self) -> dict:
        """The batch `next` returns next, without taking it: the state stays before it."""
        if self._peeked is None:
            self._peeked = self._read()
        return {key: value for key, value in self._peeked.items() if key != "reader_state"}

    def _fingerprint(self) -> dict:
        return {
            "num_streams": self.setup.num_streams,
            "micro_batch_size": self.setup.config.micro_batch_size,
            "sources": [list(urls) for urls in self.setup.data.shards],
            "seed": self.setup.config.seed,
        }

    def state_dict(self) -> dict:
        """This rank's part of the stage's reader state: what it took, its streams' positions."""
        return {
            "version": STATE_VERSION,
            **self._fingerprint(),
            "taken": self.taken,
            "positions": {str(stream): position for stream, position in self.positions.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from the stage's reader state (`merge_states` of every rank's), whatever the
        ranks and workers that saved it."""
        if self._workers is not None or self._peeked is not None:
            raise RuntimeError("load the reader state before reading the first batch")
        if state.get("version") != STATE_VERSION:
            raise ValleyForgeError(
                f"reader state version {state.get('version')!r}, expected {STATE_VERSION} (a "
                f"checkpoint of an older release: start the stage anew)"
            )
        for field_name, value in self._fingerprint().items():
            if state.get(field_name) != value:
                shown = value if field_name != "sources" else f"{sum(map(len, value))} shards"
                raise ValleyForgeError(
                    f"cannot resume the reader: its saved {field_name} differs from this run's "
                    f"({shown}); resume with the same data.seed, data.micro_batch_size and "
                    f"data sources"
                )
        missing = [stream for stream in self.streams if str(stream) not in state["positions"]]
        if missing:
            raise ValueError(
                f"the reader state lacks data streams {missing}: resume from every rank's state merged (merge_states)"
            )
        self.positions = {stream: state["positions"][str(stream)] for stream in self.streams}
        cycles, rest = divmod(state["consumed"], self.setup.num_streams)
        topology = self.setup.topology
        self.taken = cycles * len(self.streams) + len(range(topology.rank, rest, topology.world_size))


def merge_states(states: list[dict]) -> dict:
    """The stage's reader state from every rank's `state_dict()`: every stream's position, and how
    many of the stage's micro-batches were consumed (the ranks take them in order)."""
    merged = {key: value for key, value in states[0].items() if key != "taken"}
    merged["consumed"] = sum(state["taken"] for state in states)
    merged["positions"] = {stream: p for state in states for stream, p in state["positions"].items()}
    return merged


def shard_lists(data: str | list[DataSource]) -> ShardLists:
    """A stage's data (a split, shard URLs or a mixture) expanded to each source's shard URLs."""
    sources = as_sources(data)
    return ShardLists(
        tuple(s.url for s in sources),
        tuple(s.weight for s in sources),
        tuple(tuple(shard_urls(s.url)) for s in sources),
    )


def check_enough_shards(data: ShardLists, num_streams: int) -> None:
    """Every stream must get a shard of each source."""
    for name, shards in zip(data.names, data.shards):
        if len(shards) < num_streams:
            raise ValleyForgeError(
                f"{name}: {len(shards)} shards cannot feed {num_streams} data streams "
                f"(data.streams; by default cluster.num_workers x data.num_workers); write at "
                f"least {num_streams} shards"
            )


def build_loader(
    data: ShardLists | str | list[DataSource],
    config: ReaderConfig,
    tokenizer,
    template: Template,
    visual: VisualSpec,
    topology: Topology,
    train: bool,
    num_streams: int | None = None,
) -> ShardLoader:
    """Training reads shuffled (and mixed, when several sources); evaluation reads in order.
    Both repeat, so every rank can take the same number of batches whatever its share. `data`
    is expanded here unless it comes as the driver's ShardLists. `num_streams` defaults to one
    per rank x DataLoader worker."""
    data = data if isinstance(data, ShardLists) else shard_lists(data)
    num_streams = num_streams or topology.world_size * max(config.num_workers, 1)
    check_enough_shards(data, num_streams)
    return ShardLoader(ReaderSetup(data, config, tokenizer, template, visual, topology, train, num_streams))
