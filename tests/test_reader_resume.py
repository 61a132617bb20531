"""Resuming the reader: N batches, save its state, a new process loads it and reads the same
next batches as an uninterrupted run; the state stays small wherever it was taken."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_shards.config import DataSource, ReaderConfig
from data_shards.conversation import get_template
from data_shards.media import VisualSpec
from data_shards.read.reader import Topology, build_loader
from data_shards.build.synth import vocabulary
from data_shards.tokenizer import build_word_tokenizer

VISUAL = VisualSpec(num_frames=4, image_size=16, tokens_per_video=20, tokens_per_image=17)


def make_loader(data_root: str, mixing: str, rank: int):
    sources = [DataSource(url=f"{data_root}/captions/train", weight=0.7),
               DataSource(url=f"{data_root}/instruct/train", weight=0.3)]
    cfg = ReaderConfig(micro_batch_size=4, num_workers=2, shuffle_buffer=16, seed=11, mixing=mixing,
                       frame_sampling="random_segment")
    return build_loader(sources, cfg, build_word_tokenizer(vocabulary()), get_template("plain"), VISUAL,
                        Topology(rank, 2), train=True)


def fingerprint(batch) -> list:
    """Keys plus a checksum of the pixels: the random frame choices must match too."""
    return [batch["keys"], round(float(batch["frames"].double().sum()), 3)]


def read(loader, count: int) -> list:
    return [fingerprint(next(loader)) for _ in range(count)]


def run_child(*args: str) -> None:
    subprocess.run([sys.executable, __file__, *args], check=True, cwd=Path(__file__).parents[1])


@pytest.mark.parametrize("mixing", ["epoch", "resampled"])
def test_reader_resume_in_new_process_gives_the_same_next_batches(synth_data, tmp_path, mixing):
    # Each slot holds 64 samples of each source per epoch; 40 batches take the captions source
    # of both slots past its first epoch.
    first, after = 40, 12
    uninterrupted = read(make_loader(str(synth_data), mixing, rank=1), first + after)
    state_file, out_file = tmp_path / "state.json", tmp_path / "next.json"
    run_child("save", str(synth_data), mixing, str(first), str(state_file))
    run_child("resume", str(synth_data), mixing, str(after), str(state_file), str(out_file))
    resumed = json.loads(out_file.read_text())
    assert resumed == json.loads(json.dumps(uninterrupted[first:]))
    # The state holds positions, not samples: a few bytes per buffered sample.
    state = json.loads(state_file.read_text())
    assert len(state_file.read_bytes()) < 10_000
    for slot in state["slots"]:
        assert len(slot["buffer"]) == 15 and all(offset % 512 == 0 for _, offset, _ in slot["buffer"])
    epochs = {source["epoch"] for slot in state["slots"] for source in slot["sources"]}
    assert max(epochs) >= 1 if mixing == "resampled" else all(s["epoch"] == 0 for s in state["slots"])


def test_reader_resume_refuses_another_topology(synth_data):
    loader = make_loader(str(synth_data), "epoch", rank=0)
    read(loader, 2)
    state = loader.state_dict()
    other = make_loader(str(synth_data), "epoch", rank=1)
    with pytest.raises(ValueError, match="saved rank differs"):
        other.load_state_dict(state)


if __name__ == "__main__":
    command, root, mixing_mode, count = sys.argv[1:5]
    torch.set_num_threads(1)
    reader = make_loader(root, mixing_mode, rank=1)
    if command == "save":
        read(reader, int(count))
        Path(sys.argv[5]).write_text(json.dumps(reader.state_dict()))
    else:
        reader.load_state_dict(json.loads(Path(sys.argv[5]).read_text()))
        Path(sys.argv[6]).write_text(json.dumps(read(reader, int(count))))
