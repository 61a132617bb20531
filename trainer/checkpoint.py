"""One checkpointer for everything resumable: the engine (sharded model, optimizer, scheduler,
step) and a dict of named parts, each an object with `state_dict` / `load_state_dict` (the
stage's data position, read-health counts, RNG, the metrics the tracking store may not have
yet: trainer/stage.py names them).

    CHECKPOINTS/              a folder in storage (trainer/storage.py)
      latest                  the newest complete tag; written last, atomically
      step-00000300/          DeepSpeed's files (each rank its own shards)
        parts.pt              every part's state, by name
        layout                ranks, data streams and global batch (trainer/layout.py), JSON
        model/                the model's configs, tokenizer and spec, no weights: with the
                              shards they make an export (trainer/checkpoint_export.py)
        universal/            made when the tag resumes on another number of ranks
                              (trainer/checkpoint_universal.py)
        complete              written once every rank's files are in storage: the step, its
                              train loss, the latest eval loss and every file's size and
                              sha256, as JSON

A save writes each rank's files locally (in place on a local path; on an object store into a
local folder of the rank's own) and training goes on while they go into storage in the
background; the tag is marked `complete` and `latest` moves only once every rank's files are
there. A crash before that leaves `latest` naming the previous complete checkpoint, and a tag
without `complete` is never resumed from nor kept. Each rank writes and reads only its own files
(and the ones all share). Our files load with
torch's weights-only unpickler; DeepSpeed's own files still go through its full unpickler (see
README).
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from data_shards.errors import ValleyForgeError
from trainer.checkpoint_integrity import FileList, check_files, files_under
from trainer.checkpoint_universal import CONVERTED, ensure_universal, universal_loading
from trainer.checkpoint_upload import Upload
from trainer.layout import BatchLayout, describe_change
from trainer.ranks import barrier, from_rank0, gather, rank, sum_across_ranks, world_size
from trainer.storage import Storage

LATEST = "latest"
COMPLETE = "complete"
MODEL_FILES = "model"
PARTS = "parts.pt"
FILES = "files"  # the complete marker's list of the tag's files (trainer/checkpoint_integrity.py)
LAYOUT = "layout"
# DeepSpeed names each data-parallel rank's files zero_pp_rank_<r>_mp_rank_<m>_...
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")


def tag_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint to load: a tag in some storage, the layout it was saved with and the files its
    writer listed (trainer/checkpoint_integrity.py)."""

    storage: Storage
    tag: str
    layout: BatchLayout
    files: FileList

    @property
    def url(self) -> str:
        return self.storage.child(self.tag).url


def _tag_at(url: str) -> tuple[Storage, str]:
    parent, tag = url.rstrip("/").rsplit("/", 1)
    return Storage(parent), tag


def find_resume_point(storage: Storage, resume_from: str | None) -> ResumePoint | None:
    """The newest complete tag in `storage` (as rank 0 sees it), else the tag at the URL
    `resume_from`, else None; the same tag on every rank, each looking in its own `storage`."""
    found = None
    if rank() == 0:
        pointer = storage.read_text(LATEST)
        if pointer or resume_from:
            found = (True, pointer.strip()) if pointer else (False, _tag_at(resume_from)[1])
    found = from_rank0(found)
    if found is None:
        return None
    own, tag = found
    return resume_point(storage if own else _tag_at(resume_from)[0], tag)


def resume_point(storage: Storage, tag: str) -> ResumePoint:
    """The complete tag `tag` of `storage` as rank 0 reads it, on every rank."""
    marks = from_rank0(
        (storage.read_text(f"{tag}/{LAYOUT}"), storage.read_text(f"{tag}/{COMPLETE}")) if rank() == 0 else None
    )
    layout, mark = marks
    if mark is None:
        raise ValleyForgeError(f"{storage.child(tag).url}: no {COMPLETE} marker: not a complete checkpoint")
    files = json.loads(mark).get(FILES)
    if layout is None or files is None:
        raise ValleyForgeError(
            f"{storage.child(tag).url}: no {LAYOUT} file or file list; a checkpoint of an older release cannot be "
            f"resumed: start the stage anew (valleyforge run --restart)"
        )
    return ResumePoint(storage, tag, BatchLayout.from_json(layout), files)


@dataclass
class CheckpointRecord:
    """What the driver records of a complete checkpoint (rank 0 sends it after each save)."""

    url: str  # the tag's folder in storage
    step: int
    scores: dict  # train/loss, and eval/loss when the stage has evaluated by then
    removed: list[str]  # URLs of the tags this save's pruning removed
    why: str = ""  # what asked for it besides the schedule (a stop, a preemption)


def step_tags(storage: Storage) -> list[str]:
    """Every tag folder in `storage`, complete or not, oldest first."""
    return sorted(name for name in storage.folders() if name.startswith("step-"))


def complete_tags(storage: Storage, tags: list[str] | None = None) -> dict[str, dict]:
    """The complete ones of `tags` (default: all in `storage`), oldest first, each with its mark's
    step and scores (not its file list)."""
    marks = {tag: storage.read_text(f"{tag}/{COMPLETE}") for tag in (step_tags(storage) if tags is None else tags)}
    return {
        tag: {key: value for key, value in json.loads(mark).items() if key != FILES}
        for tag, mark in marks.items()
        if mark is not None
    }


def best_tag(marks: dict[str, dict]) -> str | None:
    """The tag with the lowest eval/loss (the newest among equals); None when none was evaluated."""
    scored = [(mark["eval/loss"], -mark["step"], tag) for tag, mark in marks.items() if "eval/loss" in mark]
    return min(scored)[2] if scored else None


def prune(storage: Storage, keep: int, keep_best: bool = False) -> list[str]:
    """Keeps the newest `keep` complete tags (and with `keep_best` the lowest eval/loss); removes
    the others and any a crash left incomplete. Returns the names removed."""
    tags = step_tags(storage)
    marks = complete_tags(storage, tags)
    kept = set(list(marks)[len(marks) - keep :]) | ({best_tag(marks)} if keep_best else set())
    removed = [tag for tag in tags if tag not in kept]
    for tag in removed:
        storage.remove(tag)
    return removed


def belongs_to_rank(file_name: str, this_rank: int) -> bool:
    """Whether a file of a tag's own folder (not model/ nor universal/) is one `this_rank` loads on
    as many ranks as saved it: its own, or one no rank owns."""
    owner = _RANK_FILE.search(file_name)
    return "/" not in file_name and (owner is None or int(owner.group(1)) == this_rank)


def written_by_rank(file_name: str, this_rank: int) -> bool:
    """Whether `this_rank` wrote a checkpoint file: its own; rank 0 the ones no rank owns."""
    owner = _RANK_FILE.search(file_name)
    return int(owner.group(1)) == this_rank if owner else this_rank == 0


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class Part:
    """A resumable part of a stage. Its `state_dict()` is called on every rank at each save (it may
    gather across ranks); rank 0's is saved and every rank loads it. `own_stage_only`: not
    loaded from another stage's checkpoint (a stage's `resume_from`)."""

    state: Stateful
    own_stage_only: bool = False


@dataclass(frozen=True)
class PendingSave:
    tag: str
    step: int
    scores: dict
    why: str
    started: float  # perf_counter at its start
    upload: Upload  # this rank's files


class Checkpointer:
    """Saves the engine and `parts` every `every` steps and after the last (never when `every` is
    0), keeping `keep` tags (and with `keep_best` the one of lowest eval/loss); rank 0 hands each
    save's record to `on_saved`. `layout` is this run's, saved with every tag."""

    def __init__(
        self,
        storage: Storage,
        every: int,
        engine,
        parts: dict[str, Part],
        layout: BatchLayout,
        keep: int = 2,
        keep_best: bool = False,
        on_saved: Callable[[CheckpointRecord], None] | None = None,
        write_model_files: Callable[[Path], None] = lambda folder: None,
    ):
        self.storage, self.every, self.keep, self.keep_best = storage, every, keep, keep_best
        self.engine, self.parts, self.layout = engine, parts, layout
        self.on_saved = on_saved or (lambda record: None)
        self.write_model_files = write_model_files  # rank 0, into each tag's `model/`
        self.pending: PendingSave | None = None  # the save whose files are on their way to storage
        self.save_s = 0.0  # how long the last save took, from its start until it was complete

    def due(self, step: int, last: bool) -> bool:
        return bool(self.every) and (step % self.every == 0 or last)

    def save(self, step: int, scores: dict, why: str = "", wait: bool = False) -> str:
        """Writes every rank's files of one tag locally (in place on a local path), then lets them
        go into storage in the background (trainer/checkpoint_upload.py) and returns the tag; the
        tag is marked `complete` and `latest` moves once every rank's upload is done: at a later
        `poll`, at the next save (at most one in flight), or before returning with `wait`. `why`:
        what asked for it besides the schedule."""
        self.finish()
        started, tag = time.perf_counter(), tag_name(step)
        if rank() == 0:  # what a crashed save of this tag left (a resumed run saves it again)
            self.storage.remove(tag)
        states = {name: part.state.state_dict() for name, part in self.parts.items()}  # on every rank: they gather
        if self.storage.is_local:
            folder = Path(self.storage.root) / tag
        else:  # named as the tag: DeepSpeed checks that every rank saves under the same one
            folder = Path(tempfile.mkdtemp(prefix="valleyforge-save-")) / tag
        self.engine.save_checkpoint(str(folder.parent), tag=tag, save_latest=False, client_state={"step": step})
        if rank() == 0:
            torch.save(states, folder / PARTS)
            (folder / LAYOUT).write_text(self.layout.to_json())
            self.write_model_files(folder / MODEL_FILES)
        own = [name for name in files_under(folder) if written_by_rank(name, rank())]
        upload = Upload(self.storage, tag, folder if self.storage.is_local else folder.parent / tag, own)
        self.pending = PendingSave(tag, step, scores, why, started, upload)
        if wait:
            self.finish()
        return tag

    def poll(self) -> None:
        """Called by every rank at each step boundary: marks the pending save complete once every
        rank's upload is done (asking the ranks costs one small collective while one is pending)."""
        if self.pending is not None:
            (uploading,) = sum_across_ranks([0.0 if self.pending.upload.done() else 1.0])
            if not uploading:
                self.finish()

    def finish(self) -> None:
        """Waits for this rank's upload of the pending save, then with every rank marks the tag
        `complete` (with every rank's file list), moves `latest`, prunes and reports it."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        try:
            own, error = pending.upload.files(), None
        except Exception as err:  # noqa: BLE001 - every rank raises it below, named
            own, error = {}, f"{type(err).__name__}: {err}"
        listed = gather((own, error))
        url = self.storage.child(pending.tag).url
        failed = [(r, error) for r, (_, error) in enumerate(listed) if error]
        if failed:
            raise ValleyForgeError(f"{url}: rank {failed[0][0]} could not write its checkpoint files: {failed[0][1]}")
        if rank() == 0:
            files = {name: size_digest for own, _ in listed for name, size_digest in own.items()}
            mark = {"step": pending.step, **pending.scores, FILES: files}
            self.storage.write_text(f"{pending.tag}/{COMPLETE}", json.dumps(mark) + "\n")
            self.storage.write_text(LATEST, pending.tag)
            removed = prune(self.storage, self.keep, self.keep_best)
            self.on_saved(
                CheckpointRecord(
                    url, pending.step, pending.scores, [self.storage.child(t).url for t in removed], pending.why
                )
            )
        barrier()
        self.save_s = time.perf_counter() - pending.started

    def restore(self, point: ResumePoint | None) -> int:
        """Load `point` on every rank; returns the step it was taken at (0: no point). A rank that
        cannot see the tag stops every rank, named: no rank ever starts from step 0 while the
        others resume."""
        if point is None:
            return 0
        storage, tag = point.storage, point.tag
        blind = [r for r, missing in enumerate(gather(not storage.exists(f"{tag}/{PARTS}"))) if missing]
        if 0 in blind:  # rank 0 read the tag's marker there
            raise ValleyForgeError(f"{point.url}/{PARTS}: listed by this checkpoint's writer but missing")
        if blind:
            raise ValleyForgeError(
                f"{point.url}: rank(s) {blind} cannot read the checkpoint rank 0 resumes from; every "
                f"rank must see the same checkpoint storage (cluster.storage)"
            )
        if point.layout.world_size != self.layout.world_size:
            print(describe_change(point.layout, self.layout), flush=True)
        client_state = self._load_engine(point)
        with storage.fetched(tag, keep=lambda name: name == PARTS) as folder:
            check_files(folder, point.files, lambda name: name == PARTS, point.url)
            states = torch.load(folder / PARTS, weights_only=True)
        own_stage = storage == self.storage
        for name, part in self.parts.items():
            if part.own_stage_only and not own_stage:  # another stage's metrics stay its own
                continue
            if name not in states:
                raise ValleyForgeError(
                    f"{point.url}: holds no state of {name!r}; a checkpoint of another release "
                    f"cannot be resumed: start the stage anew (valleyforge run --restart)"
                )
            part.state.load_state_dict(states[name])
        print(f"resumed from {point.url} at step {client_state['step']}", flush=True)
        return int(client_state["step"])

    def load_weights(self, tag: str) -> None:
        """The engine's state as of this stage's checkpoint `tag` (the data position stays)."""
        self._load_engine(resume_point(self.storage, tag))

    def _load_engine(self, point: ResumePoint) -> dict:
        """DeepSpeed's state of the point's tag: each rank's own ZeRO files when it was saved on as
        many ranks as this run has, else the tag's universal form (made once). Every file is
        checked against the writer's list before DeepSpeed unpickles it."""
        storage, tag, saved = point.storage, point.tag, point.layout
        if saved.world_size == world_size():
            own = lambda name: belongs_to_rank(name, rank()) and name != COMPLETE  # noqa: E731
            with storage.fetched(tag, keep=own) as folder:
                check_files(folder, point.files, own, point.url)
                return self._engine_state(folder, point.url)
        if self.engine.zero_optimization_stage() != 3:
            raise ValleyForgeError(
                f"{point.url}: saved on {saved.world_size} rank(s), resumed on "
                f"{world_size()}: resuming on another number of ranks needs engine.zero_stage 3"
            )
        name, files = ensure_universal(storage, tag, point.files)
        with storage.fetched(name) as folder, universal_loading(self.engine):
            check_files(folder, files, lambda file: file != CONVERTED, storage.child(name).url)
            return self._engine_state(folder, point.url)

    def _engine_state(self, folder: Path, url: str) -> dict:
        path, client_state = self.engine.load_checkpoint(str(folder.parent), tag=folder.name)
        if path is None:
            raise ValleyForgeError(f"{url}: DeepSpeed could not load this checkpoint")
        return client_state
