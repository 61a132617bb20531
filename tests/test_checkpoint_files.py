"""Which checkpoint tags are kept: the newest complete ones, never a tag a crash left incomplete."""
from trainer.checkpoint import COMPLETE, prune
from trainer.storage import Storage


def test_prune_keeps_the_newest_complete_tags_and_drops_incomplete_ones(tmp_path):
    storage = Storage(str(tmp_path))
    for step, complete in [(3, True), (6, True), (9, False), (12, True), (15, False)]:
        storage.write_text(f"step-{step:08d}/mp_rank_00_model_states.pt", "weights")
        if complete:
            storage.write_text(f"step-{step:08d}/{COMPLETE}", f"{step}\n")
    storage.write_text("latest", "step-00000012")
    prune(storage, keep=2)
    assert storage.folders() == ["step-00000006", "step-00000012"]
    assert storage.read_text("latest") == "step-00000012"
