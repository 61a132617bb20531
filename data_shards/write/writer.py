"""Write samples into webdataset tar shards, atomically, and the split's manifest last."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from data_shards.manifest import ShardEntry, sha256_file, write_manifest


def tar_bytes(sample: dict[str, bytes]) -> int:
    """Bytes a sample's members take in a tar: a header block each, data padded to blocks."""
    block = tarfile.BLOCKSIZE
    return sum(block + -(-len(data) // block) * block for ext, data in sample.items() if ext != "__key__")


def tar_file_bytes(member_bytes: int) -> int:
    """Size of a tar holding `member_bytes` of members: end-of-archive blocks, padded to a record."""
    record = tarfile.RECORDSIZE
    return -(-(member_bytes + 2 * tarfile.BLOCKSIZE) // record) * record


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    """Write samples ({"__key__": ..., ext: bytes}) as one tar, byte-reproducibly.

    The shard appears under its final name only when complete (temporary name, then rename).
    """
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext in sorted(k for k in sample if k != "__key__"):
                data = sample[ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
    tmp.replace(path)


def write_shard(path: Path, samples: list[dict[str, bytes]]) -> ShardEntry:
    """Write one shard atomically and describe it for the manifest."""
    write_tar(path, samples)
    return ShardEntry(path.name, len(samples), path.stat().st_size, sha256_file(path))


class SplitWriter:
    """Collects samples into shards of `samples_per_shard` in `directory`; `close()` writes the
    manifest after the last shard."""

    def __init__(self, directory: Path, samples_per_shard: int, extra_manifest: dict | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.extra_manifest = extra_manifest or {}
        self._pending: list[dict[str, bytes]] = []
        self.shards: list[ShardEntry] = []

    def write(self, sample: dict[str, bytes]) -> None:
        self._pending.append(sample)
        if len(self._pending) == self.samples_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        self.shards.append(write_shard(self.directory / f"shard-{len(self.shards):06d}.tar", self._pending))
        self._pending = []

    def close(self) -> Path:
        self._flush()
        return write_manifest(self.directory, self.shards, self.extra_manifest)
