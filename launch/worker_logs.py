"""Worker logs, wherever the worker runs, end up in the driver's log folder: each worker writes
its output to a file on its own node and a thread ships what is new to the driver's inbox every
second; the driver appends it to `LOGS/<stage>-rank<r>.log`."""

from __future__ import annotations

import threading
import time
from pathlib import Path


class LogShipper:
    """Sends what is appended to `path` to the inbox as `log(rank, text)`, every `every_s`
    seconds and once more on `stop`."""

    def __init__(self, path: Path, rank: int, inbox, every_s: float = 1.0):
        self.path, self.rank, self.inbox, self.every_s = path, rank, inbox, every_s
        self.offset = path.stat().st_size if path.exists() else 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> LogShipper:
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stopping.wait(self.every_s):
            self._ship()

    def _ship(self):
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        if not chunk:
            return None
        self.offset += len(chunk)
        return self.inbox.log.remote(self.rank, chunk.decode(errors="replace"))

    def stop(self) -> None:
        """The last text, delivered before returning (the worker may be about to fail)."""
        import ray

        self.stopping.set()
        self.thread.join()
        sent = self._ship()
        if sent is not None:
            ray.get(sent)


class StageLogs:
    """The driver's copy of one stage's worker logs."""

    def __init__(self, folder: Path, stage: str):
        self.folder, self.stage = folder, stage
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, rank: int) -> Path:
        return self.folder / f"{self.stage}-rank{rank}.log"

    def begin(self, run_id: str, ranks: int) -> None:
        """A header in each rank's file: a rerun appends to the files of the runs before it."""
        for rank in range(ranks):
            with open(self.path(rank), "a") as f:
                f.write(f"===== {time.strftime('%Y-%m-%d %H:%M:%S')} MLflow run {run_id}, rank {rank} =====\n")

    def append(self, rank: int, text: str) -> None:
        with open(self.path(rank), "a") as f:
            f.write(text)

    def tail(self, rank: int, lines: int = 15) -> list[str]:
        if not self.path(rank).is_file():
            return []
        return self.path(rank).read_text(errors="replace").splitlines()[-lines:]

    def files(self) -> list[Path]:
        return sorted(self.folder.glob(f"{self.stage}-rank*.log"))
