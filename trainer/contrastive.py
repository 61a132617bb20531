"""The contrastive video-text objective (X-CLIP / CLIPA style): a temporal module attending across
the vision tower's tokens of every frame makes one video embedding, a text tower one caption embedding,
and a symmetric InfoNCE loss with a learnable temperature pulls each clip towards its own
caption and away from every other caption of the global batch.

The caption a clip is paired with is its sample's supervised text (the answer turns; with the
`plain` template, the caption and its end-of-sequence token). Across ranks the embeddings are
gathered with their gradients (as open_clip does): each rank scores its own clips and captions
against every rank's, so the negatives of a micro-batch are those of every rank's micro-batch in
the same accumulation round.

Plain torch + transformers: no DeepSpeed, Ray or MLflow here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextModel

from data_shards.conversation import IGNORE_INDEX
from data_shards.errors import ValleyForgeError

INITIAL_TEMPERATURE = 0.07  # CLIP's: logits scaled by 1 / 0.07 at the start
MAX_LOGIT_SCALE = 100.0  # CLIP's clamp on the learned scale


class TemporalEncoder(nn.Module):
    """`temporal`: every frame's tokens [B,T,1+P,D] ([CLS] and patches, from the vision tower's last
    layer) -> one video embedding [B,E] (unit length). A learned position per frame is added to
    its tokens, then transformer layers attend across all the clip's tokens, every frame's to
    every other's (cross-frame attention: where a patch's content went between frames is what
    motion is), then the mean over the real frames' tokens and a linear map to the shared
    embedding space. Under token reduction it sees the fewer patches the tower kept. It also
    holds the learned temperature."""

    def __init__(self, width: int, embed_dim: int, num_frames: int, layers: int, heads: int):
        super().__init__()
        self.positions = nn.Parameter(torch.zeros(num_frames, width))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.projection = nn.Linear(width, embed_dim, bias=False)
        # log(1 / temperature) = log(1 / 0.07) + this offset, which random init starts at 0 (a
        # 1-element vector: ZeRO-3 cannot partition a 0-dim parameter)
        self.logit_scale_offset = nn.Parameter(torch.zeros(1))

    def logit_scale(self) -> torch.Tensor:
        return (math.log(1 / INITIAL_TEMPERATURE) + self.logit_scale_offset[0]).exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, tokens_BTND: torch.Tensor, frame_mask_BT: torch.Tensor) -> torch.Tensor:
        batch, frames, per_frame, _ = tokens_BTND.shape
        hidden = (tokens_BTND + self.positions[:frames, None].to(tokens_BTND.dtype)).flatten(1, 2)
        real_BK = frame_mask_BT[:, :, None].expand(-1, -1, per_frame).reshape(batch, frames * per_frame)
        for layer in self.layers:
            hidden = layer(hidden, src_key_padding_mask=~real_BK)
        weight_BK1 = real_BK.to(hidden.dtype)[:, :, None]
        pooled_BD = (hidden * weight_BK1).sum(1) / weight_BK1.sum(1).clamp(min=1)
        return F.normalize(self.projection(self.norm(pooled_BD)), dim=-1)


class TextEncoder(nn.Module):
    """`text`: a CLIP text transformer over the caption tokens, its output at each caption's last
    token (causal attention: the one that has read the whole caption) mapped linearly into the
    shared embedding space (unit length)."""

    def __init__(self, transformer: CLIPTextModel, embed_dim: int):
        super().__init__()
        self.transformer = transformer
        self.projection = nn.Linear(transformer.config.hidden_size, embed_dim, bias=False)

    @property
    def config(self):
        return self.transformer.config

    def forward(self, ids_BL: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
        hidden_BLD = self.transformer(input_ids=ids_BL, attention_mask=mask_BL).last_hidden_state
        last_B = mask_BL.sum(1).clamp(min=1) - 1
        pooled_BD = hidden_BLD[torch.arange(ids_BL.shape[0], device=ids_BL.device), last_B]
        return F.normalize(self.projection(pooled_BD), dim=-1)


def caption_tokens(input_ids_BL: torch.Tensor, labels_BL: torch.Tensor, max_length: int):
    """Each sample's supervised tokens, left-aligned and cut to `max_length`: [B,L'] ids and
    their mask. A sample without any is refused (it has no caption to be paired with)."""
    supervised_BL = labels_BL != IGNORE_INDEX
    counts_B = supervised_BL.sum(1)
    if bool((counts_B == 0).any()):
        raise ValleyForgeError(
            "a contrastive stage pairs each clip with its sample's supervised text, and a sample "
            "in this batch has none (a text-only or unanswered sample in a captions split?)"
        )
    length = min(int(counts_B.max()), max_length)
    # stable sort puts each row's supervised positions first, in order
    order_BL = torch.sort((~supervised_BL).to(torch.int8), dim=1, stable=True).indices[:, :length]
    ids_BL = input_ids_BL.gather(1, order_BL)
    mask_BL = torch.arange(length, device=ids_BL.device)[None] < counts_B.clamp(max=length)[:, None]
    return ids_BL * mask_BL, mask_BL.long()


def _gathered(local_BE: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's rows, in rank order, with gradients flowing back to each rank's own; and where
    this rank's rows start."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local_BE, 0
    parts = dist_fn.all_gather(local_BE)
    offset = sum(part.shape[0] for part in parts[: dist.get_rank()])
    return torch.cat(parts), offset


def info_nce(video_BE: torch.Tensor, text_BE: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """The symmetric InfoNCE loss of this rank's pairs against every rank's: the mean over its
    clips of the cross-entropy of finding the clip's caption among all captions, and over its
    captions of finding the caption's clip among all clips. Its mean over ranks (ZeRO averages
    the gradients) is the loss of the whole gathered batch."""
    all_video, offset = _gathered(video_BE)
    all_text, _ = _gathered(text_BE)
    targets = torch.arange(video_BE.shape[0], device=video_BE.device) + offset
    video_to_text = logit_scale * video_BE @ all_text.T
    text_to_video = logit_scale * text_BE @ all_video.T
    return (F.cross_entropy(video_to_text, targets) + F.cross_entropy(text_to_video, targets)) / 2


@dataclass
class ContrastiveOutput:
    loss: torch.Tensor
    video_embeds: torch.Tensor  # [B,E], unit length
    text_embeds: torch.Tensor
    logit_scale: torch.Tensor


def retrieval_metrics(video_NE: torch.Tensor, text_NE: torch.Tensor, logit_scale: float) -> dict[str, float]:
    """Held-out retrieval over N pairs: recall at 1 and 5 from clip to caption and from caption to
    clip, and the InfoNCE loss of all N at once (`eval/loss`). A candidate ranks above the true
    one only when it scores strictly higher: a caption word for word the same as the true one
    (a tie) does not count against it."""
    similarity = video_NE.double() @ text_NE.double().T
    metrics = {}
    for name, scores in (("video_to_text", similarity), ("text_to_video", similarity.T)):
        true_N = scores.diagonal()
        rank_N = (scores > true_N[:, None]).sum(1)
        for k in (1, 5):
            metrics[f"eval/retrieval/{name}_r{k}"] = float((rank_N < k).double().mean())
    targets = torch.arange(similarity.shape[0])
    logits = logit_scale * similarity
    metrics["eval/loss"] = float((F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2)
    return metrics
