"""Samples -> model batches: one right-padded sample per row, or packed rows (several samples
per row).

A batch holds input_ids, labels, attention_mask (1 on real tokens), each sample's token count
(`lengths`), uint8 frames [N,T,3,S,S] with a frame mask, and the sample keys. Frames follow the
order in which samples appear in the rows, row after row: the order in which the model splices
visual tokens into the text. A packed batch also holds position_ids restarting at every sample;
the model then gives the LLM no attention mask and attention stays inside each
sample (flash-attention's varlen kernels, or SDPA over each sample's span).
"""

from __future__ import annotations

import torch

from data_shards.conversation import IGNORE_INDEX


def pack_rows(lengths: list[int], row_length: int) -> list[list[int]]:
    """Sample indices per row: as many rows as first-fit decreasing needs, filled evenly (each
    sample, longest first, into the emptiest row with room), since every row of a batch is padded
    to the longest; a sample that fits in none of them gets a row of its own."""
    by_length = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    needed = len(_place(lengths, by_length, row_length, 0, lambda fits, room: fits[0]))
    return _place(lengths, by_length, row_length, needed, lambda fits, room: max(fits, key=room.__getitem__))


def _place(lengths: list[int], order: list[int], row_length: int, rows: int, choose) -> list[list[int]]:
    """Samples in `order` into `rows` empty rows (a new one when a sample fits in none), each into
    the row `choose(rows with room for it, room left per row)` picks; the rows not left empty."""
    placed: list[list[int]] = [[] for _ in range(rows)]
    room = [row_length] * rows
    for i in order:
        fits = [r for r, free in enumerate(room) if free >= lengths[i]]
        if fits:
            target = choose(fits, room)
        else:
            target = len(placed)
            placed.append([])
            room.append(row_length)
        placed[target].append(i)
        room[target] -= lengths[i]
    return [row for row in placed if row]


def collate(samples: list[dict], pad_id: int, visual, pack_length: int | None = None) -> dict:
    """A batch of `samples`, one per row, or packed into rows of at most `pack_length` tokens."""
    if pack_length:
        rows = [[samples[i] for i in row] for row in pack_rows([len(s["input_ids"]) for s in samples], pack_length)]
    else:
        rows = [[s] for s in samples]
    length = max(sum(len(s["input_ids"]) for s in row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for sample in row:
            n = len(sample["input_ids"])
            input_ids[r, start : start + n] = torch.tensor(sample["input_ids"])
            labels[r, start : start + n] = torch.tensor(sample["labels"])
            attention_mask[r, start : start + n] = 1
            position_ids[r, start : start + n] = torch.arange(n)
            start += n
        position_ids[r, start:] = torch.arange(length - start)  # the padding is a sequence of its own
    ordered = [s for row in rows for s in row]
    frames, frame_mask = _frames(ordered, visual)
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "frames": frames,
        "frame_mask": frame_mask,
        "lengths": torch.tensor([len(s["input_ids"]) for s in ordered]),
        "keys": [s["key"] for s in ordered],
    }
    if pack_length:
        batch["position_ids"] = position_ids
    return batch


def _frames(samples: list[dict], visual) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 frames [N,T,3,S,S]: an image fills frame 0, text-only samples have no valid frame."""
    size = visual.image_size
    frames = torch.zeros((len(samples), visual.num_frames, 3, size, size), dtype=torch.uint8)
    frame_mask = torch.zeros((len(samples), visual.num_frames), dtype=torch.bool)
    for b, sample in enumerate(samples):
        if sample["pixels"] is not None:
            t = sample["pixels"].shape[0]
            frames[b, :t], frame_mask[b, :t] = sample["pixels"], True
    return frames, frame_mask
