"""Visual token reducers and projectors: from the vision encoder's features to the LLM's
visual tokens.

A reducer maps features [B,T,1+P,D] ([CLS] first, P = g*g patches per frame) and the frame
mask [B,T] to tokens [B,N,D] and their validity [B,N]; a projector maps those to [B,M,D_llm]
with their validity. Invalid tokens (frames a sample does not have) are never spliced into the
text, and every sample's count of valid tokens is what the reader expands its placeholder to.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class KeepAllPatches(nn.Module):
    """`none`: every frame's patch tokens, frame after frame (T*P tokens)."""

    @staticmethod
    def num_tokens(num_patches: int, num_frames: int) -> int:
        return num_patches * num_frames

    def forward(self, features_BTND, frame_mask_BT):
        patches_BTPD = features_BTND[:, :, 1:]
        batch, frames, patches, dim = patches_BTPD.shape
        valid_BTP = frame_mask_BT[:, :, None].expand(-1, -1, patches)
        return patches_BTPD.reshape(batch, frames * patches, dim), valid_BTP.reshape(batch, frames * patches)


class ValleyPooling(nn.Module):
    """`valley`: each patch position averaged over the clip's frames (spatial tokens), followed
    by one token per frame, its [CLS] (temporal tokens)."""

    @staticmethod
    def num_tokens(num_patches: int, num_frames: int) -> int:
        return num_patches + num_frames

    def forward(self, features_BTND, frame_mask_BT):
        cls_BTD, patches_BTPD = features_BTND[:, :, 0], features_BTND[:, :, 1:]
        weight_BT11 = frame_mask_BT.to(features_BTND.dtype)[:, :, None, None]
        spatial_BPD = (patches_BTPD * weight_BT11).sum(1) / weight_BT11.sum(1).clamp(min=1)
        has_media_BP = frame_mask_BT.any(1, keepdim=True).expand(-1, patches_BTPD.shape[2])
        return torch.cat([spatial_BPD, cls_BTD], 1), torch.cat([has_media_BP, frame_mask_BT], 1)


class SpatialPool2x2(nn.Module):
    """`spatial_pool2`: each frame's patch grid average-pooled 2x2 (LLaVA-NeXT style), T*ceil(g/2)^2 tokens."""

    @staticmethod
    def num_tokens(num_patches: int, num_frames: int) -> int:
        return math.ceil(math.isqrt(num_patches) / 2) ** 2 * num_frames

    def forward(self, features_BTND, frame_mask_BT):
        patches_BTPD = features_BTND[:, :, 1:]
        batch, frames, patches, dim = patches_BTPD.shape
        grid = math.isqrt(patches)
        maps = patches_BTPD.reshape(batch * frames, grid, grid, dim).permute(0, 3, 1, 2)
        pooled = F.avg_pool2d(maps, kernel_size=2, stride=2, ceil_mode=True)  # [B*T, D, g', g']
        per_frame = pooled.shape[-1] * pooled.shape[-2]
        tokens = pooled.flatten(2).transpose(1, 2).reshape(batch, frames * per_frame, dim)
        valid = frame_mask_BT[:, :, None].expand(-1, -1, per_frame).reshape(batch, frames * per_frame)
        return tokens, valid


class TemporalDifference(nn.Module):
    """`temporal_diff`: each patch position averaged over the clip (what is where), then the
    same position's mean over the clip's second half minus its mean over the first half (what
    moved, and which way): 2*P tokens whatever the frame count. A still image's difference
    tokens are zero."""

    @staticmethod
    def num_tokens(num_patches: int, num_frames: int) -> int:
        return 2 * num_patches

    def forward(self, features_BTND, frame_mask_BT):
        patches_BTPD = features_BTND[:, :, 1:]
        mask_BT = frame_mask_BT.to(patches_BTPD.dtype)
        count_B = mask_BT.sum(1, keepdim=True)
        # frame t is "late" when it lies in the second half of the sample's valid frames
        position_BT = mask_BT.cumsum(1) - 1
        late_BT = (position_BT >= count_B / 2) * mask_BT
        early_BT = mask_BT - late_BT

        def mean(weight_BT):
            w = weight_BT[:, :, None, None]
            return (patches_BTPD * w).sum(1) / w.sum(1).clamp(min=1)

        has_media_BP = frame_mask_BT.any(1, keepdim=True).expand(-1, 2 * patches_BTPD.shape[2])
        motion_BPD = torch.where(count_B[:, :, None] > 1, mean(late_BT) - mean(early_BT), 0.0)
        return torch.cat([mean(mask_BT), motion_BPD], 1), has_media_BP


REDUCERS = {
    "none": KeepAllPatches,
    "valley": ValleyPooling,
    "spatial_pool2": SpatialPool2x2,
    "temporal_diff": TemporalDifference,
}


class LinearProjector(nn.Linear):
    """`linear` (Valley, eP-ALM)."""

    def __init__(self, vision_dim: int, llm_dim: int, **_):
        super().__init__(vision_dim, llm_dim)

    @staticmethod
    def num_tokens(reduced: int) -> int:
        return reduced

    def forward(self, tokens_BND, valid_BN):
        return super().forward(tokens_BND), valid_BN


class MLPProjector(nn.Module):
    """`mlp2x_gelu` (LLaVA-1.5): Linear, GELU, Linear."""

    def __init__(self, vision_dim: int, llm_dim: int, **_):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(vision_dim, llm_dim), nn.Linear(llm_dim, llm_dim)

    @staticmethod
    def num_tokens(reduced: int) -> int:
        return reduced

    def forward(self, tokens_BND, valid_BN):
        return self.fc2(F.gelu(self.fc1(tokens_BND))), valid_BN


class AbstractorLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, queries_BQD, tokens_BND, ignore_BN):
        kv = self.norm_kv(torch.cat([tokens_BND, queries_BQD], 1))
        ignore = torch.cat([ignore_BN, torch.zeros_like(ignore_BN[:, :1]).expand(-1, queries_BQD.shape[1])], 1)
        attended, _ = self.attention(self.norm_q(queries_BQD), kv, kv, key_padding_mask=ignore, need_weights=False)
        queries_BQD = queries_BQD + attended
        return queries_BQD + self.mlp(self.norm_mlp(queries_BQD))


class VisualAbstractor(nn.Module):
    """`abstractor` (mPLUG-Owl): learned queries cross-attend to the visual tokens (and to
    themselves), then a linear map to the LLM width: a fixed `num_queries` tokens per sample."""

    def __init__(self, vision_dim: int, llm_dim: int, num_queries: int = 32, layers: int = 2, heads: int = 4):
        super().__init__()
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.zeros(num_queries, vision_dim))
        self.layers = nn.ModuleList(AbstractorLayer(vision_dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(vision_dim)
        self.out = nn.Linear(vision_dim, llm_dim)

    def num_tokens(self, reduced: int) -> int:
        return self.num_queries

    def forward(self, tokens_BND, valid_BN):
        queries = self.queries[None].expand(tokens_BND.shape[0], -1, -1)
        ignore = ~valid_BN
        ignore = ignore & valid_BN.any(1, keepdim=True)  # a sample without media attends to its zeros, not to nothing
        for layer in self.layers:
            queries = layer(queries, tokens_BND, ignore)
        has_media = valid_BN.any(1, keepdim=True).expand(-1, self.num_queries)
        return self.out(self.norm(queries)), has_media


PROJECTORS = {"linear": LinearProjector, "mlp2x_gelu": MLPProjector, "abstractor": VisualAbstractor}


class SoftPrompt(nn.Module):
    """eP-ALM's trainable prompt: `num_tokens` embeddings put before every sample's text."""

    def __init__(self, num_tokens: int, llm_dim: int):
        super().__init__()
        self.embeddings = nn.Parameter(torch.zeros(num_tokens, llm_dim))

    def prepend(self, embeds_BLD, attention_mask_BL, labels_BL, ignore_index: int):
        batch, count = embeds_BLD.shape[0], self.embeddings.shape[0]
        embeds = torch.cat([self.embeddings[None].expand(batch, -1, -1).to(embeds_BLD.dtype), embeds_BLD], 1)
        mask = torch.cat([attention_mask_BL.new_ones(batch, count), attention_mask_BL], 1)
        labels = (
            None if labels_BL is None else torch.cat([labels_BL.new_full((batch, count), ignore_index), labels_BL], 1)
        )
        return embeds, mask, labels
