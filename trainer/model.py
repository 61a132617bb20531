"""The video-language model: vision encoder -> visual token reducer -> projector -> causal LM,
the projected visual tokens spliced into the LM's input where the text holds visual tokens.

Plain torch + transformers: no DeepSpeed, Ray or MLflow here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from data_shards.conversation import IGNORE_INDEX
from data_shards.errors import ValleyForgeError
from data_shards.media import VisualSpec
from trainer.contrastive import ContrastiveOutput, TemporalEncoder, TextEncoder, caption_tokens, info_nce
from trainer.token_reduction import TokenReduction, encode_kept_patches
from trainer.visual import PROJECTORS, REDUCERS, SoftPrompt

MODEL_INPUTS = ("input_ids", "attention_mask", "frames", "frame_mask", "labels", "position_ids")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def model_inputs(batch: dict, device="cpu") -> dict:
    """A batch's tensors that `VideoLanguageModel.forward` takes, on `device` (position_ids
    only in packed batches)."""
    return {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS if k in batch}


def supervised_tokens(batch: dict) -> int:
    """The tokens a batch's loss is taken over: those with a label, each predicted from the one
    before it (as the causal LM loss shifts them)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@dataclass(frozen=True)
class Architecture:
    """Everything besides the two HF configs needed to rebuild the model (saved with exports)."""

    reducer: str
    projector: str
    vision_feature_layer: int
    num_frames: int
    visual_token_id: int
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    abstractor_queries: int = 32
    abstractor_layers: int = 2
    soft_prompt_tokens: int = 0
    embed_dim: int = 0  # > 0: the model has the contrastive towers (`temporal` and `text`)
    temporal_layers: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, body: dict) -> "Architecture":
        return cls(**{**body, "image_mean": tuple(body["image_mean"]), "image_std": tuple(body["image_std"])})


class VideoLanguageModel(nn.Module):
    """`text`: the text transformer (a CLIPTextModel) when `arch.embed_dim` asks for the
    contrastive towers."""

    def __init__(self, vision: nn.Module, llm: nn.Module, arch: Architecture, text: nn.Module | None = None):
        super().__init__()
        self.arch = arch
        self.vision = vision
        self.reducer = REDUCERS[arch.reducer]()
        self.projector = PROJECTORS[arch.projector](
            vision.config.hidden_size,
            llm.config.hidden_size,
            num_queries=arch.abstractor_queries,
            layers=arch.abstractor_layers,
            heads=vision.config.num_attention_heads,
        )
        self.soft_prompt = (
            SoftPrompt(arch.soft_prompt_tokens, llm.config.hidden_size) if arch.soft_prompt_tokens else None
        )
        self.llm = llm
        self.temporal = self.text = None
        if arch.embed_dim:
            if text is None:
                raise ValueError("the architecture has contrastive towers (embed_dim) but no text transformer")
            self.temporal = TemporalEncoder(
                vision.config.hidden_size,
                arch.embed_dim,
                arch.num_frames,
                arch.temporal_layers,
                vision.config.num_attention_heads,
            )
            self.text = TextEncoder(text, arch.embed_dim)
        self.token_reduction: TokenReduction | None = None  # set per stage (CLIPA-style pretraining)

    def components(self) -> list[str]:
        """The parts with weights of their own, as exports store them."""
        return (
            ["vision", "projector", "llm"]
            + (["soft_prompt"] if self.soft_prompt is not None else [])
            + (["temporal", "text"] if self.temporal is not None else [])
        )

    @property
    def num_patches(self) -> int:
        """Patch tokens per frame the vision encoder produces (fewer under token reduction)."""
        if self.token_reduction is not None:
            return self.token_reduction.patches
        return (self.vision.config.image_size // self.vision.config.patch_size) ** 2

    def visual_spec(self, contrastive: bool = False) -> VisualSpec:
        """What the data reader must produce for this model; for a contrastive stage, whose text
        never meets the visual tokens, one placeholder token per clip or image."""
        if contrastive:
            return VisualSpec(
                num_frames=self.arch.num_frames, image_size=self._input_size(), tokens_per_video=1, tokens_per_image=1
            )
        return VisualSpec(
            num_frames=self.arch.num_frames,
            image_size=self._input_size(),
            tokens_per_video=self.projector.num_tokens(self.reducer.num_tokens(self.num_patches, self.arch.num_frames)),
            tokens_per_image=self.projector.num_tokens(self.reducer.num_tokens(self.num_patches, 1)),
        )

    def _input_size(self) -> int:
        return self.token_reduction.input_size if self.token_reduction else self.vision.config.image_size

    def frame_features(self, frames_BTCHW: torch.Tensor, frame_mask_BT: torch.Tensor, layer: int) -> torch.Tensor:
        """The vision tower's hidden states at `layer` for every frame, [B,T,1+P,D], from uint8
        frames (fewer patches P under token reduction); zeros for the frames a sample does not have.

        Only real frames go through the tower, every sample's together. A batch without any still
        runs it on one blank frame, whose features join the graph with weight zero: under ZeRO-3
        every rank must gather (and, when the tower trains, reduce) the tower's parameters."""
        batch, num_frames = frames_BTCHW.shape[:2]
        real_N = frame_mask_BT.flatten().nonzero().squeeze(1)
        run_N = real_N if len(real_N) else real_N.new_zeros(1)
        dtype = next(self.projector.parameters()).dtype
        mean = torch.tensor(self.arch.image_mean, dtype=dtype, device=frames_BTCHW.device).view(1, 3, 1, 1)
        std = torch.tensor(self.arch.image_std, dtype=dtype, device=frames_BTCHW.device).view(1, 3, 1, 1)
        pixels = (frames_BTCHW.flatten(0, 1)[run_N].to(dtype) / 255.0 - mean) / std
        reduction = self.token_reduction
        if reduction is not None and reduction.masks:
            kept_BK = reduction.kept_indices(batch, pixels.device)
            features = encode_kept_patches(self.vision, pixels, kept_BK.repeat_interleave(num_frames, 0)[run_N], layer)
        else:
            resized = reduction is not None  # a smaller input: position embeddings interpolated
            features = self.vision(
                pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=resized
            ).hidden_states[layer]
        every_frame = features.new_zeros(batch * num_frames, *features.shape[1:])
        if len(real_N):
            every_frame = every_frame.index_copy(0, real_N, features)
        else:
            every_frame = every_frame + 0.0 * features.sum()
        return every_frame.unflatten(0, (batch, num_frames))

    def encode_media(self, frames_BTCHW: torch.Tensor, frame_mask_BT: torch.Tensor):
        """Projected visual tokens [B,N,D_llm] and which of them are real [B,N], from uint8 frames."""
        features_BTND = self.frame_features(frames_BTCHW, frame_mask_BT, self.arch.vision_feature_layer)
        return self.projector(*self.reducer(features_BTND, frame_mask_BT))

    def embed_video(self, frames_BTCHW: torch.Tensor, frame_mask_BT: torch.Tensor) -> torch.Tensor:
        """One unit-length embedding per clip [B,E]: the temporal module over every frame's final
        tokens (after the tower's last layer norm, which CLIP applies to what it pools)."""
        tokens_BTND = self.frame_features(frames_BTCHW, frame_mask_BT, -1)
        return self.temporal(self.vision.post_layernorm(tokens_BTND), frame_mask_BT)

    def contrast(self, input_ids, labels, frames, frame_mask) -> ContrastiveOutput:
        """The contrastive objective on a batch: each clip against its sample's supervised text."""
        if self.temporal is None:
            raise ValleyForgeError("a contrastive stage needs the model's contrastive towers: set model.contrastive")
        ids, mask = caption_tokens(input_ids, labels, self.text.config.max_position_embeddings)
        video, text, scale = self.embed_video(frames, frame_mask), self.text(ids, mask), self.temporal.logit_scale()
        return ContrastiveOutput(info_nce(video, text, scale), video, text, scale)

    def embed(self, input_ids: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        visual_BND, valid_BN = self.encode_media(frames, frame_mask)
        embeds_BLD = self.llm.get_input_embeddings()(input_ids)
        slots_BL = input_ids == self.arch.visual_token_id
        if int(slots_BL.sum()) != int(valid_BN.sum()):
            raise ValueError(
                f"batch has {int(slots_BL.sum())} visual token slots but its media give "
                f"{int(valid_BN.sum())} visual tokens"
            )
        embeds_BLD = embeds_BLD.masked_scatter(slots_BL[..., None], visual_BND[valid_BN].to(embeds_BLD.dtype))
        # The vision path runs on every batch, text-only ones too, and stays in the graph with
        # zero weight: under ZeRO-3 every rank must gather and reduce the same parameters, or
        # a rank whose batch has no media would leave the others waiting forever.
        return embeds_BLD + 0.0 * visual_BND.sum()

    def _llm_inputs(self, input_ids, attention_mask, frames, frame_mask, labels=None):
        embeds = self.embed(input_ids, frames, frame_mask)
        if self.soft_prompt is not None:
            embeds, attention_mask, labels = self.soft_prompt.prepend(embeds, attention_mask, labels, IGNORE_INDEX)
        return embeds, attention_mask, labels

    def forward(
        self,
        input_ids,
        attention_mask,
        frames,
        frame_mask,
        labels=None,
        position_ids=None,
        num_items_in_batch: float | None = None,
        contrastive: bool = False,
    ):
        """`position_ids` marks a packed batch (several samples per row, positions restarting
        at each): the LLM then gets no attention mask and keeps attention inside each sample.
        The loss is the mean over the batch's supervised tokens, or with `num_items_in_batch` their
        sum divided by it (transformers' loss functions take it so). `contrastive`: the
        contrastive objective instead (`contrast`), the LLM unused."""
        if contrastive:
            return self.contrast(input_ids, labels, frames, frame_mask)
        if position_ids is not None and self.soft_prompt is not None:
            raise ValleyForgeError("packed batches and a soft prompt do not mix: set data.packing false")
        embeds, attention_mask, labels = self._llm_inputs(input_ids, attention_mask, frames, frame_mask, labels)
        if position_ids is not None:
            attention_mask = None
        extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        return self.llm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=False,
            **extra,
        )

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, frames, frame_mask, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Greedy continuation token ids (prompt excluded)."""
        embeds, attention_mask, _ = self._llm_inputs(input_ids, attention_mask, frames, frame_mask)
        return self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            **kwargs,
        )
