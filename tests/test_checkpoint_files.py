"""Which checkpoint tags are kept (the newest complete ones, never a tag a crash left incomplete),
and which are loaded: only tags whose files are the ones their writer listed, from the job's own
storage or the sources it names."""

import json
from pathlib import Path

import pytest
import torch

from data_shards.errors import ValleyForgeError
from launch.inputs import is_under
from trainer.checkpoint import (
    COMPLETE,
    LATEST,
    LAYOUT,
    PARTS,
    Checkpointer,
    complete_tags,
    find_resume_point,
    prune,
)
from trainer.checkpoint_integrity import files_under, list_files
from trainer.checkpoint_universal import conversion_workers
from trainer.layout import BatchLayout
from trainer.storage import Storage

pytestmark = pytest.mark.unit


def test_prune_keeps_the_newest_complete_tags_and_drops_incomplete_ones(tmp_path):
    storage = Storage(str(tmp_path))
    for step, complete in [(3, True), (6, True), (9, False), (12, True), (15, False)]:
        storage.write_text(f"step-{step:08d}/mp_rank_00_model_states.pt", "weights")
        if complete:
            storage.write_text(f"step-{step:08d}/{COMPLETE}", json.dumps({"step": step, "eval/loss": 1.0}))
    storage.write_text("latest", "step-00000012")
    prune(storage, keep=2)
    assert storage.folders() == ["step-00000006", "step-00000012"]
    assert storage.read_text("latest") == "step-00000012"


def test_prune_keeps_the_lowest_eval_loss_for_register_best(tmp_path):
    storage = Storage(str(tmp_path))
    for step, eval_loss in [(1, 2.0), (2, 1.5), (3, 1.7), (4, 1.9), (5, 1.8)]:
        storage.write_text(f"step-{step:08d}/{COMPLETE}", json.dumps({"step": step, "eval/loss": eval_loss}))
    assert prune(storage, keep=2, keep_best=True) == ["step-00000001", "step-00000003"]
    assert storage.folders() == ["step-00000002", "step-00000004", "step-00000005"]


def test_a_checkpoint_without_a_file_list_is_refused_as_an_older_release(tmp_path):
    """A tag written before checkpoints listed their files (reader.pt and rank-N.pt beside
    DeepSpeed's) is named as an older release's."""
    storage = Storage(str(tmp_path))
    layout = BatchLayout(world_size=1, streams=2, micro_batches_per_step=2, micro_batch_size=4)
    for name in ("reader.pt", "rank-0.pt", LAYOUT):
        storage.write_text(f"step-00000002/{name}", layout.to_json())
    storage.write_text(f"step-00000002/{COMPLETE}", json.dumps({"step": 2}))
    storage.write_text(LATEST, "step-00000002")
    with pytest.raises(ValleyForgeError, match="a checkpoint of an older release cannot be resumed"):
        find_resume_point(storage, None)


class Unpickled:
    """Leaves a file behind when it is unpickled: proof that a load ran."""

    def __init__(self, proof: Path):
        self.proof = proof

    def __reduce__(self):
        return (Path.touch, (self.proof,))


def test_a_tampered_file_is_refused_before_anything_is_unpickled(tmp_path):
    """Each tag lists its files' sizes and sha256 in its `complete` marker; a rank file that
    differs, one the writer did not list, and a listed one that is gone are each refused, named,
    before DeepSpeed (which unpickles in full) or our own loader reads anything."""
    storage, tag = Storage(str(tmp_path / "ckpt")), "step-00000002"
    folder = tmp_path / "ckpt" / tag
    folder.mkdir(parents=True)
    layout = BatchLayout(world_size=1, streams=2, micro_batches_per_step=2, micro_batch_size=4)
    (folder / LAYOUT).write_text(layout.to_json())
    rank_file = "zero_pp_rank_0_mp_rank_00_model_states.pt"
    torch.save({"weights": torch.zeros(3)}, folder / rank_file)
    torch.save({}, folder / PARTS)
    files = list_files(folder, files_under(folder))
    storage.write_text(f"{tag}/{COMPLETE}", json.dumps({"step": 2, "files": files}))
    storage.write_text(LATEST, tag)
    proof = tmp_path / "unpickled"
    checkpointer = Checkpointer(storage, every=1, engine=None, parts={}, layout=layout)

    torch.save(Unpickled(proof), folder / rank_file)  # same name, other bytes
    with pytest.raises(ValleyForgeError, match=f"{rank_file}: differs from what this checkpoint's writer listed"):
        checkpointer.restore(find_resume_point(storage, None))
    torch.save({"weights": torch.zeros(3)}, folder / rank_file)
    torch.save(Unpickled(proof), folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")  # a file nobody listed
    with pytest.raises(ValleyForgeError, match="optim_states.pt: not a file this checkpoint's writer listed"):
        checkpointer.restore(find_resume_point(storage, None))
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    (folder / rank_file).unlink()
    with pytest.raises(ValleyForgeError, match=f"{rank_file}: listed by this checkpoint's writer but missing"):
        checkpointer.restore(find_resume_point(storage, None))
    assert not proof.exists()
    assert complete_tags(storage) == {tag: {"step": 2}}  # marks as the driver records them: no file list


def test_a_checkpoint_is_loaded_only_from_the_job_storage_or_named_sources():
    assert is_under("s3://bucket/job/checkpoints/pretrain/step-00000004", "s3://bucket/job")
    assert is_under("/runs/a/checkpoints/pretrain/step-00000004", "/runs/a/")
    assert not is_under("s3://bucket/jobber/checkpoints/pretrain/step-00000004", "s3://bucket/job")
    assert not is_under("s3://bucket/job/../other/step-00000004", "s3://bucket/job")
    assert not is_under("/runs/a", "/runs/a")


GIB = 2**30


@pytest.mark.parametrize(
    ("files", "free", "cpus", "workers"),
    [
        ([GIB] * 4, 100 * GIB, 16, (4, 16)),  # one extract worker per rank's file
        ([GIB] * 8, 100 * GIB, 2, (2, 2)),  # as many as the CPUs
        ([GIB] * 4, 5 * GIB, 16, (2, 16)),  # each holds twice its file: free memory for 2
        ([GIB] * 4, GIB, 16, (1, 16)),  # at least one
        ([GIB // 8] * 4, 100 * GIB, 16, (1, 1)),  # 0.5 GiB: starting workers costs more than they save
    ],
)
def test_the_universal_conversion_spreads_over_the_cpus_and_memory_it_has(files, free, cpus, workers):
    assert conversion_workers(files, free, cpus) == workers
