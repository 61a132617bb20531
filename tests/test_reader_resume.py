"""Resuming the reader: N batches, save its state, a new process loads it and reads the same
next batches as an uninterrupted run; the state stays small wherever it was taken. The stage's
sequence of micro-batches is the same on any number of ranks and loader workers, and a state
saved on one number resumes on another."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_shards.config import DataSource, ReaderConfig
from data_shards.conversation import get_template
from data_shards.media import VisualSpec
from data_shards.read.reader import Topology, build_loader, merge_states, micro_batches_of
from data_shards.tokenizer import build_word_tokenizer
from data_shards.write.synth import vocabulary

pytestmark = pytest.mark.unit
VISUAL = VisualSpec(num_frames=4, image_size=16, tokens_per_video=20, tokens_per_image=17)


STREAMS = 4


def make_loader(data_root: str, mixing: str, rank: int, world_size: int = 2, workers: int = 2):
    sources = [
        DataSource(url=f"{data_root}/captions/train", weight=0.7),
        DataSource(url=f"{data_root}/instruct/train", weight=0.3),
    ]
    cfg = ReaderConfig(
        micro_batch_size=4,
        num_workers=workers,
        shuffle_buffer=16,
        seed=11,
        mixing=mixing,
        frame_sampling="random_segment",
    )
    return build_loader(
        sources,
        cfg,
        build_word_tokenizer(vocabulary()),
        get_template("plain"),
        VISUAL,
        Topology(rank, world_size),
        train=True,
        num_streams=STREAMS,
    )


def fingerprint(batch) -> list:
    """Keys plus a checksum of the pixels: the random frame choices must match too."""
    return [batch["keys"], round(float(batch["frames"].double().sum()), 3)]


def read(loader, count: int) -> list:
    return [fingerprint(next(loader)) for _ in range(count)]


def run_child(*args: str) -> None:
    subprocess.run([sys.executable, __file__, *args], check=True, cwd=Path(__file__).parents[1])


@pytest.mark.parametrize("mixing", ["epoch", "resampled"])
def test_reader_resume_in_new_process_gives_the_same_next_batches(synth_data, tmp_path, mixing):
    # Each stream holds 64 samples of each source per epoch; 40 batches take the captions source
    # of both of the rank's streams past its first epoch.
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
    positions = state["positions"].values()
    assert len(positions) == 2
    for stream in positions:
        assert len(stream["buffer"]) == 15 and all(offset % 512 == 0 for _, offset, _ in stream["buffer"])
    epochs = {source["epoch"] for stream in positions for source in stream["sources"]}
    assert max(epochs) >= 1 if mixing == "resampled" else all(s["epoch"] == 0 for s in positions)


def in_stage_order(per_rank: list[list], first: int, count: int) -> list:
    """The stage's micro-batches `first` .. from each rank's batches, in the stage's order."""
    world, taken = len(per_rank), [iter(batches) for batches in per_rank]
    owners = {j: r for r in range(world) for j in micro_batches_of(r, world, STREAMS, first, count)}
    return [next(taken[owners[j]]) for j in range(first, first + count)]


def test_micro_batch_sequence_and_resume_do_not_depend_on_ranks_or_workers(synth_data):
    root = str(synth_data)
    # 16 micro-batches in the stage's order: one rank reading all 4 streams with 2 loader workers
    reference = read(make_loader(root, "epoch", rank=0, world_size=1, workers=2), 16)
    # 2 ranks x 2 workers take 3 each, the first 6; their merged state resumes on 1 rank x 1 worker
    ranks = [make_loader(root, "epoch", rank=r) for r in range(2)]
    assert in_stage_order([read(loader, 3) for loader in ranks], 0, 6) == reference[:6]
    merged = merge_states([loader.state_dict() for loader in ranks])
    assert merged["consumed"] == 6
    one = make_loader(root, "epoch", rank=0, world_size=1, workers=1)
    one.load_state_dict(merged)
    assert read(one, 2) == reference[6:8]
    # ... 1 rank's state after 8 on 3 ranks, which 4 streams do not divide: rank 0 reads streams
    # 0 and 3 (with 2 loader workers), ranks 1 and 2 one each; micro-batches 8-11 fall 2, 1, 1
    three = [make_loader(root, "epoch", rank=r, world_size=3, workers=2) for r in range(3)]
    for loader in three:
        loader.load_state_dict(merge_states([one.state_dict()]))
    shares = [len(micro_batches_of(r, 3, STREAMS, 8, 4)) for r in range(3)]
    assert shares == [2, 1, 1]
    assert three[0].peek()["keys"] == reference[8][0]  # looked at, not taken: read next
    assert in_stage_order([read(loader, n) for loader, n in zip(three, shares)], 8, 4) == reference[8:12]
    # ... and their merged state after 12 on 4 ranks of 1 stream each
    four = [make_loader(root, "epoch", rank=r, world_size=4, workers=1) for r in range(4)]
    after_twelve = merge_states([loader.state_dict() for loader in three])
    for loader in four:
        loader.load_state_dict(after_twelve)
    assert in_stage_order([read(loader, 1) for loader in four], 12, 4) == reference[12:16]


if __name__ == "__main__":
    command, root, mixing_mode, count = sys.argv[1:5]
    torch.set_num_threads(1)
    reader = make_loader(root, mixing_mode, rank=1)
    if command == "save":
        read(reader, int(count))
        Path(sys.argv[5]).write_text(json.dumps(reader.state_dict()))
    else:  # rank 1's streams, and the stage's count: both ranks took as many
        state = json.loads(Path(sys.argv[5]).read_text())
        reader.load_state_dict({**state, "consumed": 2 * state.pop("taken")})
        Path(sys.argv[6]).write_text(json.dumps(read(reader, int(count))))
