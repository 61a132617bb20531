"""SDPA over packed rows, each sample attended alone: the twin of flash-attention's varlen path
where flash-attn is not (CPU, or a GPU without it).

Given a packed row (positions restarting at every sample, no attention mask), transformers' own
SDPA path builds a block-diagonal mask over the whole row and computes attention for every pair
of positions in it, most of them masked out. Here each sample's span goes through causal SDPA on
its own, so attention costs the samples' own lengths squared (BENCHMARKS.md, "Packing").
Batches with a padding mask, decoding with a cache and non-causal calls take transformers' SDPA
path unchanged.

It is added to transformers' attention and mask registries under NAME (their extension points);
the LLM is built with it where SDPA is chosen (trainer/blueprint.py). Exports do not record it:
a saved config names no attention implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_packed"


def packed_sdpa_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [B,H,L,D], key and value [B,H_kv,L,D] -> ([B,L,H,D], None), as transformers' SDPA
    function returns; a sample starts wherever its row's position id is 0."""
    if (
        attention_mask is not None
        or position_ids is None
        or query.shape[2] != key.shape[2]
        or kwargs.get("is_causal") is False
    ):
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            position_ids=position_ids,
            **kwargs,
        )
    length = query.shape[2]
    starts: list[set[int]] = [{0} for _ in range(query.shape[0])]
    # transformers' own position ids are [1,L] for every row; one device-to-host copy per layer
    for row, start in (position_ids.expand(query.shape[0], -1) == 0).nonzero().tolist():
        starts[row].add(start)
    rows = []
    for row, row_starts in enumerate(starts):
        bounds = sorted(row_starts) + [length]
        rows.append(
            torch.cat(
                [
                    F.scaled_dot_product_attention(
                        query[row : row + 1, :, start:end],
                        key[row : row + 1, :, start:end],
                        value[row : row + 1, :, start:end],
                        dropout_p=dropout,
                        is_causal=True,
                        scale=scaling,
                        enable_gqa=query.shape[1] != key.shape[1],
                    )
                    for start, end in zip(bounds, bounds[1:])
                ],
                dim=2,
            )
        )
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def packed_or_sdpa_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """No mask without a padding mask (packed rows: the samples' spans come from the position
    ids); transformers' SDPA mask otherwise."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    AttentionInterface.register(NAME, packed_sdpa_attention)
    AttentionMaskInterface.register(NAME, packed_or_sdpa_mask)
