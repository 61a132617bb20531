"""One sample stream: an endless sequence of raw samples, with a state that resumes it exactly.

A stage's training data is split into a fixed number of streams (`data.streams`), whatever the
ranks and DataLoader workers reading them: stream v of S reads, per source, every S-th shard of
that epoch's seeded order, from offset v; a seeded mixture picks the source of each sample by
weight; a seeded shuffle buffer reorders samples. Every draw is seeded by the stream, never by
the rank or worker reading it, so a stream yields the same samples on any cluster. The state is
small and its size does not depend on how far the stream has read: per source (epoch, shard,
byte offset), the mixture's and buffer's draw counts, and where each buffered sample lies.
Restoring reads the buffered samples back by offset and seeks each source to its byte
offset; nothing before is replayed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterator

from data_shards.errors import ValleyForgeError
from data_shards.read.tarstream import CorruptShard, RawSample, iter_samples, read_sample_at


@dataclass(frozen=True)
class ShardLists:
    """A stage's data expanded once, on the driver: per source its name, weight and shard URLs.
    Every rank splits these same lists, whatever its node sees of the store."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    shards: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class StreamSetup:
    """What a stream reads: the shard lists, and which of the stage's streams it is."""

    data: ShardLists
    seed: int
    shuffle: bool
    stream: int
    num_streams: int


class SourceCursor:
    """Reads one source's shards for one stream, epoch by epoch, remembering its position."""

    def __init__(self, setup: StreamSetup, index: int, on_corrupt: Callable[[CorruptShard], None]):
        self.setup, self.index, self.on_corrupt = setup, index, on_corrupt
        self.epoch, self.shard, self.offset = 0, 0, 0
        self.exhausted = False
        self._samples: Iterator[RawSample] | None = None
        self._shards = self._shards_of(0)

    def _shards_of(self, epoch: int) -> list[str]:
        urls = list(self.setup.data.shards[self.index])
        if self.setup.shuffle:
            random.Random(f"{self.setup.seed}-{self.index}-{epoch}").shuffle(urls)
        # never empty: reader.check_enough_shards made sure of a shard for every stream
        return urls[self.setup.stream :: self.setup.num_streams]

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.shard, self.offset, self.exhausted = epoch, 0, 0, False
        self._shards, self._samples = self._shards_of(epoch), None

    def read(self) -> RawSample | None:
        """The next sample, or None at the end of this epoch's shards."""
        while self.shard < len(self._shards):
            url = self._shards[self.shard]
            if self._samples is None:
                self._samples = iter_samples(url, self.offset)
            try:
                sample = next(self._samples)
            except StopIteration:
                sample = None
            except CorruptShard as err:
                self.on_corrupt(err)
                sample = None
            if sample is None:
                self.shard, self.offset, self._samples = self.shard + 1, 0, None
                continue
            self.offset = sample.next_offset
            sample.epoch = self.epoch
            return sample
        self.exhausted = True
        return None

    def state(self) -> dict:
        return {"epoch": self.epoch, "shard": self.shard, "offset": self.offset, "exhausted": self.exhausted}

    def restore(self, state: dict) -> None:
        self.start_epoch(state["epoch"])
        self.shard, self.offset, self.exhausted = state["shard"], state["offset"], state["exhausted"]


class SampleStream:
    """Mixture of sources -> shuffle buffer, endless; `state()` between samples resumes it."""

    def __init__(
        self,
        setup: StreamSetup,
        mixing: str,
        buffer_size: int,
        on_corrupt: Callable[[CorruptShard], None],
        state: dict | None = None,
    ):
        self.setup, self.mixing, self.buffer_size = setup, mixing, buffer_size
        self.cursors = [SourceCursor(setup, i, on_corrupt) for i in range(len(setup.data.shards))]
        self.epoch, self.draws, self.pops = 0, 0, 0
        self.buffer: list[RawSample] = []
        if state:
            self.epoch, self.draws, self.pops = state["epoch"], state["draws"], state["pops"]
            for cursor, cursor_state in zip(self.cursors, state["sources"]):
                cursor.restore(cursor_state)
            self.buffer = [_reread(url, offset, epoch) for url, offset, epoch in state["buffer"]]

    def _rng(self, purpose: str, count: int) -> random.Random:
        return random.Random(f"{self.setup.seed}-{purpose}-{self.setup.stream}-{count}")

    def _pick(self, candidates: list[int]) -> SourceCursor:
        if len(candidates) == 1:
            return self.cursors[candidates[0]]
        weights = [self.setup.data.weights[i] for i in candidates]
        choice = self._rng("mix", self.draws).choices(candidates, weights)[0]
        self.draws += 1
        return self.cursors[choice]

    def _next_resampled(self) -> RawSample:
        """`resampled`: a source drawn by weight for every sample; each source restarts on its own."""
        cursor = self._pick(list(range(len(self.cursors))))
        sample = cursor.read()
        if sample is None:
            cursor.start_epoch(cursor.epoch + 1)
            sample = cursor.read()
        if sample is None:
            raise ValleyForgeError(
                f"source {self.setup.data.names[cursor.index]!r} has no readable sample in "
                f"data stream {self.setup.stream} of {self.setup.num_streams}"
            )
        return sample

    def _next_by_epoch(self) -> RawSample:
        """`epoch`: every source read once per epoch, interleaved by weight."""
        empty_epochs = 0
        while True:
            live = [i for i, c in enumerate(self.cursors) if not c.exhausted]
            if live:
                sample = self._pick(live).read()
                if sample is not None:
                    return sample
                continue
            empty_epochs += 1
            if empty_epochs > 1:
                raise ValleyForgeError(
                    f"no readable sample in a whole epoch of data stream {self.setup.stream} of "
                    f"{self.setup.num_streams} (sources {list(self.setup.data.names)})"
                )
            self.epoch += 1
            for cursor in self.cursors:
                cursor.start_epoch(self.epoch)

    def __iter__(self) -> Iterator[RawSample]:
        while True:
            sample = MIXING[self.mixing](self)
            if self.buffer_size <= 1:
                yield sample
                continue
            self.buffer.append(sample)
            if len(self.buffer) < self.buffer_size:
                continue
            i = self._rng("shuffle", self.pops).randrange(len(self.buffer))
            self.pops += 1
            self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
            yield self.buffer.pop()

    def state(self) -> dict:
        return {
            "epoch": self.epoch,
            "draws": self.draws,
            "pops": self.pops,
            "sources": [c.state() for c in self.cursors],
            "buffer": [[s.url, s.offset, s.epoch] for s in self.buffer],
        }


# data.mixing: how a stream interleaves its sources
MIXING = {"epoch": SampleStream._next_by_epoch, "resampled": SampleStream._next_resampled}


def _reread(url: str, offset: int, epoch: int) -> RawSample:
    sample = read_sample_at(url, offset)
    sample.epoch = epoch
    return sample
