"""A checkpoint tag's own list of its files: every file's size and sha256, written into the tag's
`complete` marker (and a universal form's into its `converted` marker) by the job that wrote
them, and checked before any of them is read. DeepSpeed unpickles its files in full: a file
that is not what the writer listed is refused before anything of it is loaded.

What it guarantees: every file read is byte for byte one the writer listed, so a damaged,
truncated, swapped or foreign file stops the load, named. What it does not: whoever can write
the storage can write a marker too (tests/test_checkpoint_files.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from data_shards.errors import ValleyForgeError

# {file path relative to the tag: [size in bytes, sha256 hex]}
FileList = dict[str, list]


def files_under(folder: Path) -> list[str]:
    """Every file below `folder`, as paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def list_files(folder: Path, names: list[str]) -> FileList:
    return {name: [(folder / name).stat().st_size, _sha256(folder / name)] for name in names}


def check_files(folder: Path, listed: FileList, read: Callable[[str], bool], url: str) -> None:
    """Refuses, naming the file, unless every file of `folder` that `read` accepts (the ones about
    to be read) is listed with its size and sha256, and every listed one `read` accepts is there."""
    present = [name for name in files_under(folder) if read(name)]
    for name in present:
        if name not in listed:
            raise ValleyForgeError(f"{url}/{name}: not a file this checkpoint's writer listed; refusing to load it")
        size, digest = listed[name]
        if (folder / name).stat().st_size != size or _sha256(folder / name) != digest:
            raise ValleyForgeError(
                f"{url}/{name}: differs from what this checkpoint's writer listed (size or sha256); refusing to load it"
            )
    missing = sorted(name for name in listed if read(name) and name not in present)
    if missing:
        raise ValleyForgeError(f"{url}/{missing[0]}: listed by this checkpoint's writer but missing")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
