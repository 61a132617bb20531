"""One rank's files of a checkpoint on their way into storage, in a background thread, so that
training goes on while they travel: each file is read once, hashed for the tag's file list
(trainer/checkpoint_integrity.py) as it is uploaded to an object store, or hashed and flushed to
disk where storage is a local path (the files were written in place)."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

from trainer.checkpoint_integrity import FileList
from trainer.storage import Storage

CHUNK = 8 << 20


class Upload:
    """Starts at once; `done()` says whether it has ended, `files()` waits for it and returns the
    list of what it put (or raises what stopped it). `local` is the tag's local folder, `names`
    the files of it this rank wrote; on an object store the folder is removed once they are up."""

    def __init__(self, storage: Storage, tag: str, local: Path, names: list[str]):
        self.storage, self.tag, self.local, self.names = storage, tag, local, names
        self._files: FileList = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"upload-{tag}", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def files(self) -> FileList:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._files

    def _run(self) -> None:
        try:
            for name in self.names:
                self._files[name] = self._put(name)
        except BaseException as err:  # noqa: BLE001 - raised again in the training thread by files()
            self._error = err
        finally:
            if not self.storage.is_local:
                shutil.rmtree(self.local, ignore_errors=True)

    def _put(self, name: str) -> list:
        """[size, sha256] of the file, read once: hashed while it goes up, or hashed and flushed."""
        digest, size = hashlib.sha256(), 0
        with open(self.local / name, "rb") as source:
            if self.storage.is_local:
                while chunk := source.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                os.fsync(source.fileno())
            else:
                with self.storage.open(f"{self.tag}/{name}", "wb") as target:
                    while chunk := source.read(CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        target.write(chunk)
        return [size, digest.hexdigest()]
