"""Turn a model config, or an exported model, into a blueprint, and a blueprint into a model.

A blueprint names the two HF configs, the architecture, the tokenizer and where each
component's weights come from (a folder, or a random init). Building from config and starting
from an export are the same path.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, CLIPTextConfig, CLIPVisionConfig, LlamaConfig

from data_shards.conversation import VISUAL_TOKEN
from data_shards.errors import ValleyForgeError
from data_shards.tokenizer import load_tokenizer, word_tokenizer_from_file
from trainer import packed_attention
from trainer.config import ModelConfig, TokenReductionConfig
from trainer.model import Architecture, VideoLanguageModel
from trainer.partitioned import SafetensorsFolder, init_random_weights, load_weights
from trainer.token_reduction import token_reduction_for

EXPORT_SPEC = "valleyforge_model.json"


@dataclass
class Blueprint:
    tokenizer: object
    vision_config: object
    llm_config: object
    arch: Architecture
    weights: dict[str, Path | None]  # component -> folder with its safetensors; None: random init
    text_config: object = None  # the contrastive text tower's, when the architecture has one


def pick_attention(requested: str) -> str:
    """flash_attention_2 where flash-attn imports and CUDA is present, else SDPA."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _vision_config_from(path: str):
    config = AutoConfig.from_pretrained(path)
    return getattr(config, "vision_config", config)  # a full CLIP checkpoint: take its vision tower


def blueprint_from_config(cfg: ModelConfig) -> Blueprint:
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
    elif cfg.word_vocab:
        tokenizer = word_tokenizer_from_file(cfg.word_vocab)
    else:
        tokenizer = load_tokenizer(cfg.llm.path)
    if cfg.vision.tiny:
        t = cfg.vision.tiny
        vision_config = CLIPVisionConfig(
            image_size=t.image_size,
            patch_size=t.patch_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads,
        )
    else:
        vision_config = _vision_config_from(cfg.vision.path)
    if cfg.llm.tiny:
        t = cfg.llm.tiny
        llm_config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads,
            num_key_value_heads=t.num_kv_heads,
            max_position_embeddings=t.max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    else:
        llm_config = AutoConfig.from_pretrained(cfg.llm.path)
        llm_config.vocab_size = max(llm_config.vocab_size, len(tokenizer))
    towers = cfg.contrastive
    arch = Architecture(
        reducer=cfg.reducer,
        projector=cfg.projector,
        vision_feature_layer=cfg.vision_feature_layer,
        num_frames=cfg.num_frames,
        visual_token_id=tokenizer.convert_tokens_to_ids(VISUAL_TOKEN),
        abstractor_queries=cfg.abstractor_queries,
        abstractor_layers=cfg.abstractor_layers,
        soft_prompt_tokens=cfg.soft_prompt_tokens,
        embed_dim=towers.embed_dim if towers else 0,
        temporal_layers=towers.temporal_layers if towers else 0,
    )
    text_config = None
    if towers:
        t = towers.text
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads,
            max_position_embeddings=t.max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    weights = {
        "vision": Path(cfg.vision.path) if cfg.vision.path else None,
        "llm": Path(cfg.llm.path) if cfg.llm.path else None,
    }  # the rest: random init
    return Blueprint(tokenizer, vision_config, llm_config, arch, weights, text_config)


def read_export_spec(folder: str | Path, what: str = "a ValleyForge export") -> dict:
    """The spec of the export in `folder` (trainer/export.py writes it); `what` names the folder
    in the error when it has none."""
    spec_path = Path(folder) / EXPORT_SPEC
    if not spec_path.is_file():
        raise ValleyForgeError(f"{folder}: not {what} (no {EXPORT_SPEC})")
    return json.loads(spec_path.read_text())


def blueprint_from_export(folder: str | Path) -> Blueprint:
    folder = Path(folder)
    spec = read_export_spec(folder)
    return Blueprint(
        tokenizer=load_tokenizer(folder / "llm"),
        vision_config=AutoConfig.from_pretrained(folder / "vision"),
        llm_config=AutoConfig.from_pretrained(folder / "llm"),
        arch=Architecture.from_json(spec["architecture"]),
        weights={name: folder / name for name in spec["components"]},
        text_config=CLIPTextConfig.from_pretrained(folder / "text") if "text" in spec["components"] else None,
    )


def build_model(
    blueprint: Blueprint, attn_implementation: str = "auto", token_reduction: TokenReductionConfig | None = None
) -> VideoLanguageModel:
    """The module tree with uninitialised weights (call under `deepspeed.zero.Init` to shard it),
    showing the vision encoder fewer patches when a stage asks for `token_reduction`."""
    attn = pick_attention(attn_implementation)
    vision = AutoModel.from_config(blueprint.vision_config, attn_implementation=attn)
    if attn == "sdpa":  # the LLM gets packed rows: each sample attended alone
        packed_attention.register()
    llm = AutoModelForCausalLM.from_config(
        blueprint.llm_config, attn_implementation=packed_attention.NAME if attn == "sdpa" else attn
    )
    text = AutoModel.from_config(blueprint.text_config, attn_implementation=attn) if blueprint.text_config else None
    model = VideoLanguageModel(vision, llm, blueprint.arch, text)
    if token_reduction is not None:
        model.token_reduction = token_reduction_for(model, token_reduction)
    return model


def fill_weights(model: VideoLanguageModel, blueprint: Blueprint, init_std: float, seed: int) -> None:
    """Load each component from its folder, or initialise it randomly. All ranks must call."""
    for name in model.components():
        module = getattr(model, name)
        folder = blueprint.weights.get(name)
        if folder is None:
            init_random_weights(module, init_std, seed)
        else:
            load_weights(module, SafetensorsFolder(folder))


def load_export(folder: str | Path) -> tuple[VideoLanguageModel, object]:
    """A plain (unsharded) model and its tokenizer from an export folder, for inference."""
    blueprint = blueprint_from_export(folder)
    model = build_model(blueprint)
    fill_weights(model, blueprint, init_std=0.0, seed=0)
    return model.eval(), blueprint.tokenizer
