"""An export's LLaVA-NeXT-Video twin: the same model as transformers'
LlavaNextVideoForConditionalGeneration with its processor, for the models that are one (a CLIP
vision tower, reducer `none` or `spatial_pool2`, projector `mlp2x_gelu`, a transformers causal
LM), so that plain transformers, vLLM or SGLang serve them without a conversion script.

The twin drops the [CLS] token (`vision_feature_select_strategy: default`) and pools each frame
2x2 (`spatial_pool2`) or not at all (`none`, pooling stride 1), as our reducers do. LLaVA-NeXT
shows images at several resolutions (anyres) where our model sees an image as a one-frame clip:
give the twin an image as a one-frame video for the same answer (the processor's `<image>` path is
anyres, which the twin's weights were never trained for). The video placeholder is our visual
token. The contrastive towers, which never feed the LM, are not part of the twin.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

from data_shards.conversation import VISUAL_TOKEN

FOLDER = "llava_next_video"
POOL_STRIDE = {"none": 1, "spatial_pool2": 2}


def mismatch(model) -> str | None:
    """Why `model` has no LLaVA-NeXT-Video twin; None when it has one."""
    arch, vision = model.arch, model.vision.config
    if vision.model_type != "clip_vision_model":
        return f"its vision tower is {vision.model_type}, not a CLIP vision tower"
    if arch.reducer not in POOL_STRIDE:
        return (
            f"reducer {arch.reducer!r}: LLaVA-NeXT-Video pools each frame 2x2 or not at all (`spatial_pool2`, `none`)"
        )
    grid = vision.image_size // vision.patch_size
    if arch.reducer == "spatial_pool2" and grid % 2:
        return (
            f"reducer 'spatial_pool2' over an odd patch grid ({grid}x{grid}): LLaVA-NeXT-Video's pooling drops the "
            f"last row"
        )
    if arch.reducer == "none" and vision.patch_size % 2:
        return (
            f"reducer 'none' with an odd patch size ({vision.patch_size}): LLaVA-NeXT-Video's processor cannot count "
            f"its tokens"
        )
    if arch.projector != "mlp2x_gelu":
        return f"projector {arch.projector!r}: LLaVA-NeXT-Video's projector is `mlp2x_gelu`"
    if arch.soft_prompt_tokens:
        return "a soft prompt: LLaVA-NeXT-Video has no prompt embeddings before the text"
    if not hasattr(model.llm, "model") or model.llm.get_output_embeddings() is None:
        return f"its LLM ({type(model.llm).__name__}) is not a transformers causal LM with a base model and a head"
    return None


def twin_config(model, tokenizer) -> LlavaNextVideoConfig:
    arch, llm = model.arch, model.llm.config
    visual_id = tokenizer.convert_tokens_to_ids(VISUAL_TOKEN)
    size = model.vision.config.image_size
    return LlavaNextVideoConfig(
        vision_config=model.vision.config.to_dict(),
        text_config=llm.to_dict(),
        vision_feature_layer=arch.vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        spatial_pool_mode="average",
        spatial_pool_stride=POOL_STRIDE[arch.reducer],
        video_token_index=visual_id,
        image_token_index=visual_id,
        image_grid_pinpoints=[[size, size]],
        tie_word_embeddings=llm.tie_word_embeddings,
    )


def twin_state(
    states: dict[str, dict[str, torch.Tensor]],
    llm_state: dict[str, torch.Tensor],
    tie_word_embeddings: bool,
    llm_width: int,
) -> dict[str, torch.Tensor]:
    """Our components' tensors under the twin's names."""
    tensors = {f"model.vision_tower.{k}": v for k, v in states["vision"].items()}
    for ours, theirs in (("fc1", "linear_1"), ("fc2", "linear_2")):
        for kind in ("weight", "bias"):
            tensors[f"model.multi_modal_projector.{theirs}.{kind}"] = states["projector"][f"{ours}.{kind}"]
    for key, value in llm_state.items():
        if key.startswith("model."):
            tensors["model.language_model." + key.removeprefix("model.")] = value
        elif key == "lm_head.weight" and not tie_word_embeddings:
            tensors[key] = value
    # LLaVA-NeXT's row separator for anyres images, which the twin is not shown (see above)
    dtype = next(v.dtype for v in llm_state.values() if v.is_floating_point())
    tensors["model.image_newline"] = torch.zeros(llm_width, dtype=dtype)
    return tensors


def write_twin(model, tokenizer, states: dict, llm_state: dict, folder: Path) -> None:
    """The twin's weights, config, tokenizer and processor files into `folder`."""
    config = twin_config(model, tokenizer)
    with torch.device("meta"):
        twin = LlavaNextVideoForConditionalGeneration(config)
    tensors = twin_state(states, llm_state, config.tie_word_embeddings, model.llm.config.hidden_size)
    saved = set(twin.state_dict())  # not the buffers rebuilt at load (position ids, rotary frequencies)
    rebuilt = {name for name, _ in twin.named_buffers()} - saved
    missing, unexpected = twin.load_state_dict(
        {k: v for k, v in tensors.items() if k not in rebuilt}, strict=False, assign=True
    )
    if unexpected or [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]:
        raise RuntimeError(
            f"the LLaVA-NeXT-Video twin's weights do not line up: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if config.tie_word_embeddings:  # the head, still on the meta device, becomes the embeddings again
        twin.tie_weights()
    twin.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps(processor_config(model), indent=2) + "\n")


def processor_config(model) -> dict:
    """LlavaNextVideoProcessor's saved form (transformers 5: the image and video processors nested),
    written as data: building the processor needs torchvision, which exporting does not.
    Frames are resized and centre-cropped to the tower's input size and normalised as ours are."""
    arch, vision = model.arch, model.vision.config
    size = vision.image_size
    common = {
        "do_resize": True,
        "size": {"shortest_edge": size},
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(arch.image_mean),
        "image_std": list(arch.image_std),
        "do_convert_rgb": True,
        "resample": 3,
    }
    # The processor counts a frame's tokens as (size / patch_size)^2 / 4, for 2x2 pooling; without
    # pooling, half the patch size makes that count the frame's patches.
    counted_patch = vision.patch_size * POOL_STRIDE[arch.reducer] // 2
    return {
        "processor_class": "LlavaNextVideoProcessor",
        "patch_size": counted_patch,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,
        "video_token": VISUAL_TOKEN,
        "image_token": "<image>",  # the processor refuses one token for both
        "image_processor": {
            **common,
            "image_processor_type": "LlavaNextImageProcessor",
            "image_grid_pinpoints": [[size, size]],
            "do_pad": True,
        },
        "video_processor": {
            **common,
            "video_processor_type": "LlavaNextVideoVideoProcessor",
            "do_sample_frames": False,
        },
    }
