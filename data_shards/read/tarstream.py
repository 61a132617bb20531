"""Read webdataset samples out of a tar, knowing where each one starts.

Members are grouped into samples by key (the file name up to its first dot, directories
included: `clips/0001.mp4` and `clips/0001.json` form sample `clips/0001`). Every sample
carries the byte offset of its first member, so a reader can start again at any sample, or
re-read one sample, without going through the members before it.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from typing import Iterator

from data_shards.read.sources import open_shard


@dataclass
class RawSample:
    url: str
    key: str
    offset: int  # byte offset of the sample's first member in the tar
    next_offset: int  # where the next sample starts
    members: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes
    epoch: int = 0  # the reader's epoch when it read the sample


class CorruptShard(Exception):
    """The shard cannot be read past `offset` (broken tar data, or the file would not open);
    the rest of the shard is lost."""

    def __init__(self, url: str, offset: int, cause: Exception, reason: str = "corrupt tar member"):
        super().__init__(f"{url}: {reason} at byte {offset} ({type(cause).__name__}: {cause})")
        self.url, self.offset, self.reason = url, offset, reason


def split_name(name: str) -> tuple[str, str]:
    """`dir/key.ext.more` -> (`dir/key`, `ext.more`)."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext


def iter_samples(url: str, offset: int = 0, limit: int | None = None) -> Iterator[RawSample]:
    """Samples of the tar at `url` from byte `offset` on (at most `limit` of them).

    Raises CorruptShard where the tar stops being readable; samples before it were yielded.
    """
    try:
        stream = open_shard(url, offset)
    except (OSError, ValueError) as err:
        raise CorruptShard(url, offset, err, reason="unreadable shard") from err
    try:
        current: RawSample | None = None
        yielded = 0
        try:
            tar = tarfile.open(fileobj=stream, mode="r|")
        except (tarfile.TarError, OSError, EOFError) as err:
            raise CorruptShard(url, offset, err) from err
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, OSError, EOFError) as err:
                raise CorruptShard(url, current.next_offset if current else offset, err) from err
            if member is None:
                break
            if not member.isfile() or member.name.split("/")[-1].startswith("."):
                continue
            key, ext = split_name(member.name)
            start = offset + member.offset
            if current is not None and key != current.key:
                yield current  # complete: the next sample has begun
                yielded += 1
                if limit is not None and yielded >= limit:
                    return
                current = None
            try:
                data = tar.extractfile(member).read()
            except (tarfile.TarError, OSError, EOFError) as err:
                raise CorruptShard(url, current.offset if current else start, err) from err
            if current is None:
                current = RawSample(url, key, start, start)
            current.members[ext] = data
            current.next_offset = offset + member.offset_data + ((member.size + 511) // 512) * 512
        if current is not None:
            yield current
    finally:
        stream.close()


def read_sample_at(url: str, offset: int) -> RawSample:
    """The one sample starting at `offset`."""
    for sample in iter_samples(url, offset, limit=1):
        return sample
    raise CorruptShard(url, offset, EOFError("no sample at this offset"))
