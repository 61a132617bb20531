"""Where shards live: expand a source spec into shard URLs and open them.

A spec is one of
- a split directory (or its manifest.json) written by `valleyforge shards build|synth`;
- a URL or path with brace ranges and/or globs: `/data/v2d/{00000..00099}.tar`,
  `s3://bucket/shards/*.tar`, `gs://...`, `https://host/shard-{000..009}.tar`;
- `pipe:COMMAND` (the command writes one tar to stdout), braces allowed.
Remote files are read through fsspec; ranges and globs resolve before training starts.
"""

from __future__ import annotations

import glob
import hashlib
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import fsspec

if TYPE_CHECKING:
    from data_shards.config import DataSource
from data_shards.errors import ValleyForgeError
from data_shards.manifest import MANIFEST_NAME, manifest_hash, read_manifest

_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_BRACE_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a{0..2}b` -> a0b a1b a2b (zero padding kept), `a{x,y}` -> ax ay; nested left to right."""
    match = _BRACE_RANGE.search(pattern)
    if match:
        lo, hi = match.group(1), match.group(2)
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        match = _BRACE_LIST.search(pattern)
        if not match:
            return [pattern]
        options = match.group(1).split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [url for option in options for url in expand_braces(head + option + tail)]


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _is_manifest_spec(spec: str) -> bool:
    if spec.startswith("pipe:") or is_remote(spec):
        return False
    path = Path(spec)
    return (path.is_dir() and (path / MANIFEST_NAME).is_file()) or path.name == MANIFEST_NAME


def _remote(url: str, call):
    """fsspec needs a package per store (s3fs, gcsfs, aiohttp); say which, in one line, or that
    fsspec knows no such store."""
    try:
        return call(url)
    except ImportError as err:
        raise ValleyForgeError(f"{url}: {err} (pip install 'valleyforge[cloud]' brings s3fs and gcsfs)") from err
    except ValueError as err:  # fsspec's "Protocol not known"
        raise ValleyForgeError(f"{url}: {err}") from err


def _expand_glob(url: str) -> list[str]:
    if not any(ch in url for ch in "*?["):
        return [url]
    if is_remote(url):
        fs, _, paths = _remote(url, fsspec.get_fs_token_paths)
        protocol = url.split("://", 1)[0]
        return sorted(f"{protocol}://{p}" for p in paths)
    return sorted(glob.glob(url))


def shard_urls(spec: str) -> list[str]:
    """Every shard URL a spec names, in a stable order; errors name the spec."""
    if _is_manifest_spec(spec):
        return read_manifest(spec).urls
    if not spec.startswith("pipe:") and not is_remote(spec) and Path(spec).is_dir():
        raise ValleyForgeError(
            f"{spec}: a directory without {MANIFEST_NAME}; name its shards with a glob "
            f"(e.g. {spec.rstrip('/')}/*.tar) or build it with `valleyforge shards build`"
        )
    urls = [
        u
        for pattern in expand_braces(spec)
        for u in (_expand_glob(pattern) if not pattern.startswith("pipe:") else [pattern])
    ]
    if not urls:
        raise ValleyForgeError(f"{spec}: matches no shards")
    for protocol in {u.split("://", 1)[0] for u in urls if is_remote(u)}:
        _remote(protocol, fsspec.get_filesystem_class)
    missing = [u for u in urls if not u.startswith("pipe:") and not is_remote(u) and not Path(u).is_file()]
    if missing == [spec]:
        raise ValleyForgeError(
            f"{spec}: not found (expected a split directory holding {MANIFEST_NAME}, a shard "
            f"file, a glob or brace range of shards, or a URL)"
        )
    if missing:
        raise ValleyForgeError(f"{spec}: {len(missing)} shard(s) not found, first {missing[0]}")
    return urls


def source_digest(spec: str) -> str:
    """Identifies the data a spec names: the manifest's sha256, else a hash of its URL list."""
    if _is_manifest_spec(spec):
        return manifest_hash(spec)
    return hashlib.sha256("\n".join(shard_urls(spec)).encode()).hexdigest()


def data_digest(sources: list[DataSource]) -> str:
    """Identifies a stage's training data: one source's digest, or a hash over a mixture's."""
    if len(sources) == 1:
        return source_digest(sources[0].url)
    return hashlib.sha256(" ".join(f"{source_digest(s.url)}:{s.weight}" for s in sources).encode()).hexdigest()


class PipeReader:
    """A `pipe:` command's stdout as a file; closing it reaps the process."""

    def __init__(self, command: str):
        self.command = command
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)

    def read(self, size: int = -1) -> bytes:
        return self.process.stdout.read(size)

    def close(self) -> None:
        self.process.stdout.close()
        self.process.wait()


def _skip(stream, count: int):
    while count > 0:
        chunk = stream.read(min(count, 1 << 20))
        if not chunk:
            break
        count -= len(chunk)
    return stream


def open_shard(url: str, offset: int = 0) -> BinaryIO:
    """A binary stream of `url` positioned at `offset`: seeks where the store allows it (files,
    object stores, HTTP with range requests), else reads forward (pipes, plain HTTP servers)."""
    if url.startswith("pipe:"):
        return _skip(PipeReader(url[len("pipe:") :]), offset)
    if not is_remote(url):
        stream = open(url.removeprefix("file://"), "rb")
        stream.seek(offset)
        return stream
    if not offset and url.startswith(("http://", "https://")):
        return fsspec.open(url, "rb", block_size=0).open()  # a plain stream: no range requests needed
    stream = fsspec.open(url, "rb").open()
    try:
        stream.seek(offset)
        stream.read(1)  # the first ranged read tells whether the store can serve ranges
        stream.seek(offset)
        return stream
    except ValueError:
        stream.close()
        return _skip(fsspec.open(url, "rb", block_size=0).open(), offset)
