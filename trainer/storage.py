"""`cluster.storage`: where everything that outlives a worker or crosses a node lives. A URL that
an fsspec filesystem reaches (s3://, gs://, ...) or a path: on one machine, or a shared mount.

Code that writes or reads many files (DeepSpeed checkpoints, exports) works on a local folder:
`replaced` gives one whose files replace a folder of storage, `fetched` one holding storage's
files. On an object store they are temporary folders, uploaded or downloaded and then removed.
(Checkpoints go up in the background: trainer/checkpoint_upload.py.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem


@dataclass(frozen=True)
class Storage:
    """A folder in storage, named by its URL or path. Plain data: it travels to workers."""

    url: str

    @property
    def _fs_root(self) -> tuple[fsspec.AbstractFileSystem, str]:
        return fsspec.core.url_to_fs(self.url)  # fsspec caches filesystem instances: cheap to repeat

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self._fs_root[0]

    @property
    def root(self) -> str:
        """The folder's path inside `fs` (the URL without its scheme)."""
        return self._fs_root[1]

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def child(self, *parts: str) -> Storage:
        return Storage("/".join([self.url.rstrip("/"), *parts]))

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}" if name else self.root

    def exists(self, name: str = "") -> bool:
        return self.fs.exists(self._path(name))

    def read_text(self, name: str) -> str | None:
        """The file's text as it is now; None when there is no such file. (Another process may have
        written it since this one last looked: an object store's cached listing is dropped first.)"""
        self.fs.invalidate_cache(self._path(name))
        try:
            with self.fs.open(self._path(name), "r") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write_text(self, name: str, text: str) -> None:
        """Replaces the file at once: readers see the old text or the new, never a part (a local
        rename; an object store's PUT)."""
        if self.is_local:
            path = Path(self._path(name))
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".tmp")
            partial.write_text(text)
            _fsync(partial)
            os.replace(partial, path)
        else:
            self.fs.pipe_file(self._path(name), text.encode())

    def open(self, name: str, mode: str = "rb"):
        """The file as a file object (on an object store, a write goes up in parts as it is written)."""
        return self.fs.open(self._path(name), mode)

    def folders(self) -> list[str]:
        """Names of the folders directly inside this one (none when it does not exist)."""
        if not self.exists():
            return []
        self.fs.invalidate_cache(self.root)
        return sorted(
            Path(entry["name"]).name for entry in self.fs.ls(self.root, detail=True) if entry["type"] == "directory"
        )

    def remove(self, name: str = "") -> None:
        """Removes the file or folder, if there is one."""
        if self.exists(name):
            self.fs.rm(self._path(name), recursive=True)

    @contextmanager
    def replaced(self, name: str = "") -> Iterator[Path]:
        """A local folder whose files replace the folder `name` as a whole when the block exits
        without an error; an error leaves the old folder as it was. On a local path a sibling
        folder renamed into place; on an object store the old files removed, then the new put."""
        if self.is_local:
            target = Path(self._path(name))
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            yield partial
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
            return
        with tempfile.TemporaryDirectory(prefix="valleyforge-stage-") as tmp:
            yield Path(tmp)
            self.remove(name)
            self._put_files(Path(tmp), name)

    @contextmanager
    def fetched(self, name: str = "", keep: Callable[[str], bool] = lambda _: True) -> Iterator[Path]:
        """A local folder with the files of this storage's folder `name` (those whose path
        relative to it `keep` accepts); a download removed when the block exits, unless the
        storage is local."""
        if self.is_local:
            yield Path(self._path(name))
            return
        with tempfile.TemporaryDirectory(prefix="valleyforge-fetch-") as tmp:
            folder = Path(tmp) / (Path(name).name or "data")
            self.download(name, folder, keep)
            yield folder

    def download(self, name: str, local: Path, keep: Callable[[str], bool] = lambda _: True) -> Path:
        """Copies the folder `name` (its files that `keep` accepts) to the local folder `local`."""
        source = self._path(name).rstrip("/")
        files = [f for f in self.fs.find(source) if keep(f[len(source) + 1 :])]
        if not files:
            raise FileNotFoundError(f"{self.child(name).url}: no files")
        for file in files:
            target = local / file[len(source) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(file, str(target))
        return local

    def upload(self, local: Path, name: str = "") -> None:
        """Copies the local folder's files into the folder `name`, replacing what was there."""
        self.remove(name)
        if self.is_local:
            shutil.copytree(local, self._path(name))
        else:
            self._put_files(local, name)

    def _put_files(self, local: Path, name: str) -> None:
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            self.fs.put_file(str(file), self._path(f"{name}/{file.relative_to(local).as_posix()}".lstrip("/")))

    def pyarrow_fs(self):
        """This filesystem for pyarrow (Ray Train's storage)."""
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return PyFileSystem(FSSpecHandler(self.fs))


def _fsync(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
