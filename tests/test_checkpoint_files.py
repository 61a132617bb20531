"""Which checkpoint tags are kept: the newest complete ones, never a tag a crash left incomplete."""

import json

import pytest

from trainer.checkpoint import COMPLETE, prune
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
