"""Answer a prompt about a video or an image with an exported model."""

from __future__ import annotations

from pathlib import Path

import torch

from data_shards.conversation import IGNORE_INDEX, encode_prompt, get_template, stop_token_ids
from data_shards.errors import ValleyForgeError
from data_shards.frames import FrameSampling
from data_shards.media import IMAGE_EXTS, MEDIA_ERRORS, VIDEO_EXTS, decode_media, media_kind
from data_shards.read.batching import collate
from trainer.blueprint import load_export, read_export_spec


def media_members(path: str | Path) -> dict[str, bytes]:
    """A media file as a sample's members ({ext: bytes}); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ValleyForgeError(f"{path}: file not found")
    ext = path.suffix.lower().lstrip(".")
    if media_kind(ext) is None:
        raise ValleyForgeError(f"{path}: not a video ({', '.join(VIDEO_EXTS)}) or image ({', '.join(IMAGE_EXTS)})")
    return {ext: path.read_bytes()}


def media_for(model, members: dict[str, bytes] | None) -> tuple[str | None, torch.Tensor | None]:
    """A sample's media (members {ext: bytes}) decoded as `model` takes it: (kind, uint8 frames)."""
    visual = model.visual_spec()
    try:
        return decode_media(members or {}, visual, FrameSampling("uniform", visual.num_frames))
    except MEDIA_ERRORS as err:
        raise ValleyForgeError(f"could not decode the media ({type(err).__name__}: {err})") from err


@torch.no_grad()
def answer(
    model,
    tokenizer,
    template_name: str,
    prompt: str,
    media: tuple[str | None, torch.Tensor | None],
    max_new_tokens: int = 64,
    **generate_options,
) -> str:
    """The model's greedy answer to `prompt` about `media` (from `media_for`); `generate_options`
    go to transformers' generate."""
    visual = model.visual_spec()
    template = get_template(template_name)
    media_kind, frames = media
    input_ids = encode_prompt(tokenizer, template, prompt, media_kind, visual.tokens)
    batch = collate(
        [{"key": "prompt", "input_ids": input_ids, "labels": [IGNORE_INDEX] * len(input_ids), "pixels": frames}],
        tokenizer.pad_token_id,
        visual,
    )
    out = model.generate(
        batch["input_ids"],
        batch["attention_mask"],
        batch["frames"],
        batch["frame_mask"],
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_token_ids(tokenizer, template),
        pad_token_id=tokenizer.pad_token_id,
        **generate_options,
    )
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()


def generate_from_export(
    folder: str | Path, prompt: str, media_file: str | None, template: str | None, max_new_tokens: int
) -> str:
    model, tokenizer = load_export(folder)
    template = template or read_export_spec(folder).get("template") or "vicuna_v1"
    return answer(
        model,
        tokenizer,
        template,
        prompt,
        media_for(model, media_members(media_file) if media_file else None),
        max_new_tokens,
    )
