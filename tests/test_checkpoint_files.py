"""Which checkpoint tags are kept: the newest complete ones, never a tag a crash left incomplete."""

import json

import pytest

from data_shards.errors import ValleyForgeError
from trainer.checkpoint import COMPLETE, LAYOUT, Checkpointer, ResumePoint, prune
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


def test_a_checkpoint_without_parts_is_refused_as_an_older_release(tmp_path):
    """A tag written before the checkpointer kept its parts in parts.pt (reader.pt and rank-N.pt)
    is named as an older release's, not as storage this rank cannot see."""
    storage = Storage(str(tmp_path))
    layout = BatchLayout(world_size=1, streams=2, micro_batches_per_step=2, micro_batch_size=4)
    for name in ("reader.pt", "rank-0.pt", LAYOUT):
        storage.write_text(f"step-00000002/{name}", layout.to_json())
    checkpointer = Checkpointer(storage, every=1, engine=None, parts={}, layout=layout)
    with pytest.raises(ValleyForgeError, match="no parts.pt; a checkpoint of an older release cannot be resumed"):
        checkpointer.restore(ResumePoint(storage, "step-00000002", layout))
