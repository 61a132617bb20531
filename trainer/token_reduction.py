"""CLIPA-style token-length reduction for pretraining: the vision encoder sees fewer patch
tokens, by masking patches (random, grid or block) or by a smaller input image.

Masking keeps the [CLS] token and K of the P patch tokens, chosen per sample and shared by all
of its frames (so per-position reducers still line frames up); the kept tokens run through the
encoder with their own position embeddings. Resizing feeds images of `image_size` with the
position embeddings interpolated. Either way the reader is told the smaller token count, and a
later stage without reduction sees every patch again.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from data_shards.errors import ValleyForgeError

if TYPE_CHECKING:
    from trainer.config import TokenReductionConfig


class TokenReduction:
    def __init__(self, cfg: TokenReductionConfig, image_size: int, patch_size: int):
        self.cfg, self.patch_size = cfg, patch_size
        self.grid = image_size // patch_size
        if cfg.mode == "resize" and (cfg.image_size % patch_size or cfg.image_size >= image_size):
            raise ValleyForgeError(
                f"token_reduction.image_size {cfg.image_size} must be a multiple of the patch "
                f"size {patch_size} and smaller than the encoder's {image_size}"
            )
        self.input_size = cfg.image_size if cfg.mode == "resize" else image_size
        self.stride = max(1, round(1 / math.sqrt(cfg.keep)))  # grid: every stride-th row and column
        self.block = max(1, round(self.grid * math.sqrt(cfg.keep)))  # block: a block x block square

    @property
    def masks(self) -> bool:
        return self.cfg.mode != "resize"

    @property
    def square(self) -> bool:
        """Whether the kept patches still form a square grid (what 2x2 pooling needs)."""
        return self.cfg.mode != "random"

    @property
    def patches(self) -> int:
        """Patch tokens per frame the encoder sees."""
        return {
            "resize": (self.input_size // self.patch_size) ** 2,
            "random": max(1, round(self.cfg.keep * self.grid**2)),
            "grid": (self.grid // self.stride) ** 2,
            "block": self.block**2,
        }[self.cfg.mode]

    def kept_indices(self, batch: int, device) -> torch.Tensor:
        """[batch, K] indices of the kept patches (row-major, ascending), drawn per sample."""
        g = self.grid
        if self.cfg.mode == "random":
            return torch.rand(batch, g * g, device=device).argsort(1)[:, : self.patches].sort(1).values
        if self.cfg.mode == "grid":
            lines = g // self.stride
            offset = torch.randint(0, g - (lines - 1) * self.stride, (batch, 2), device=device)  # the grid stays inside
            rows = offset[:, :1] + self.stride * torch.arange(lines, device=device)
            cols = offset[:, 1:] + self.stride * torch.arange(lines, device=device)
        else:
            top_left = torch.randint(0, g - self.block + 1, (batch, 2), device=device)
            rows = top_left[:, :1] + torch.arange(self.block, device=device)
            cols = top_left[:, 1:] + torch.arange(self.block, device=device)
        return (rows[:, :, None] * g + cols[:, None, :]).flatten(1)


def token_reduction_for(model, cfg: TokenReductionConfig) -> TokenReduction:
    """The reduction for `model`'s vision encoder; refuses one its reducer cannot follow."""
    vision = model.vision.config
    reduction = TokenReduction(cfg, vision.image_size, vision.patch_size)
    if model.arch.reducer == "spatial_pool2" and not reduction.square:
        raise ValleyForgeError(
            "token_reduction mode `random` leaves no patch grid for the spatial_pool2 reducer; "
            "use grid or block masking"
        )
    return reduction


def encode_kept_patches(vision, pixels_NCHW: torch.Tensor, kept_NK: torch.Tensor, feature_layer: int) -> torch.Tensor:
    """A CLIP vision tower's hidden states at `feature_layer` over [CLS] + the kept patches."""
    if not all(hasattr(vision, part) for part in ("embeddings", "pre_layrnorm", "encoder")):
        raise ValleyForgeError(f"token reduction by masking needs a CLIP vision tower, not {type(vision).__name__}")
    embeddings = vision.embeddings(pixels_NCHW)  # [N, 1+P, D], position embeddings added
    index = kept_NK[:, :, None].expand(-1, -1, embeddings.shape[-1])
    hidden = vision.pre_layrnorm(torch.cat([embeddings[:, :1], embeddings[:, 1:].gather(1, index)], 1))
    states = [hidden]
    for layer in vision.encoder.layers:
        hidden = layer(hidden, None)
        states.append(hidden)
    return states[feature_layer]
