"""The manifest: the list of a split's shards with sample counts, bytes and sha256."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from data_shards.errors import ValleyForgeError

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ShardEntry:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    directory: Path
    shards: tuple[ShardEntry, ...]
    extra: dict

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def urls(self) -> list[str]:
        return [str(self.directory / s.name) for s in self.shards]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, shards: list[ShardEntry], extra: dict | None = None) -> Path:
    body = {
        "shards": [vars(s) for s in shards],
        "num_samples": sum(s.samples for s in shards),
        "num_bytes": sum(s.bytes for s in shards),
        **(extra or {}),
    }
    path = directory / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def read_manifest(split: str | Path) -> Manifest:
    """Read `split` (a split directory or its manifest.json); errors name the file."""
    path = Path(split)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ValleyForgeError(
            f"{path}: no shard manifest here (expected a split directory holding "
            f"{MANIFEST_NAME}; `valleyforge shards synth` writes one)"
        )
    try:
        body = json.loads(path.read_text())
        shards = tuple(ShardEntry(**s) for s in body.pop("shards"))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValleyForgeError(f"{path}: not a valid shard manifest ({err})") from err
    if not shards:
        raise ValleyForgeError(f"{path}: manifest lists no shards")
    return Manifest(directory=path.parent, shards=shards, extra=body)


def manifest_hash(split: str | Path) -> str:
    """sha256 of the manifest file: identifies exactly which data a run trained on."""
    path = Path(split)
    return sha256_file(path / MANIFEST_NAME if path.is_dir() else path)
