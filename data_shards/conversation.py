"""Conversation templates and tokenization with label masking.

A conversation is rendered as segments, each tokenized on its own and tagged supervised or
not; labels are the token ids of supervised segments (assistant answers and their end token)
and IGNORE_INDEX elsewhere. Tokenizing per segment keeps the mask boundaries exact for any
tokenizer, instead of locating answers again in a re-tokenized whole.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from data_shards.errors import ValleyForgeError

IGNORE_INDEX = -100
VISUAL_TOKEN = "<visual>"
PLACEHOLDERS = ("<video>", "<image>")
_PLACEHOLDER_RE = re.compile("(" + "|".join(map(re.escape, PLACEHOLDERS)) + ")")


class SampleError(ValueError):
    """A sample that cannot be trained on; `reason` is a short, countable category."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Template:
    name: str
    system: str  # text before the first turn
    user: str  # a human turn, `{text}` is the message (unsupervised)
    assistant: str  # an assistant turn, `{text}` is the answer, `{eos}` the end token (supervised)
    assistant_suffix: str = ""  # text after an assistant turn that is not learned (a newline)
    stop: str | None = None  # the token that ends an answer when it is not the tokenizer's eos


TEMPLATES = {
    # LLaVA/Valley pretraining: the media, then its caption; the loss is on the caption only.
    "plain": Template("plain", system="", user="{text}", assistant="{text}{eos}"),
    # Vicuna v1, as used by Valley and LLaVA for instruction tuning.
    "vicuna_v1": Template(
        "vicuna_v1",
        system="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions. ",
        user="USER: {text} ASSISTANT:",
        assistant=" {text}{eos}",
    ),
    # mPLUG-Owl: "Human:" / "AI:" turns, one per line.
    "mplug_owl": Template(
        "mplug_owl",
        system="The following is a conversation between a curious human and AI assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions.\n",
        user="Human: {text}\nAI: ",
        assistant="{text}{eos}",
        assistant_suffix="\n",
    ),
    # Llama 3 chat: header tokens around each role, <|eot_id|> ends every turn.
    "llama3": Template(
        "llama3",
        system="<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant that understands "
        "videos and images.<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant="{text}<|eot_id|>",
        stop="<|eot_id|>",
    ),
    # ChatML (Qwen and others): <|im_start|>role ... <|im_end|>, a newline between turns.
    "chatml": Template(
        "chatml",
        system="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
        user="<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
        assistant="{text}<|im_end|>",
        assistant_suffix="\n",
        stop="<|im_end|>",
    ),
}

TEMPLATE_SPECIAL_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>")


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValleyForgeError(f"unknown conversation template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def render_segments(template: Template, conversations: list[dict], eos: str) -> list[tuple[str, bool]]:
    """[(text, supervised)] for a conversation of alternating human/gpt turns."""
    if not conversations or len(conversations) % 2:
        raise SampleError("bad turn order", "expected human/gpt turn pairs")
    segments: list[tuple[str, bool]] = []
    for i in range(0, len(conversations), 2):
        human, gpt = conversations[i], conversations[i + 1]
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            raise SampleError(
                "bad turn order", f"turn {i} is {human.get('from')!r}, turn {i + 1} is {gpt.get('from')!r}"
            )
        if not str(gpt.get("value", "")).strip():
            raise SampleError("empty assistant turn", f"turn {i + 1}")
        segments.append((_human_turn(template, human["value"], first=i == 0), False))
        segments.append((template.assistant.format(text=gpt["value"], eos=eos), True))
        if template.assistant_suffix:
            segments.append((template.assistant_suffix, False))
    return segments


def _human_turn(template: Template, text: str, first: bool) -> str:
    return (template.system if first else "") + template.user.format(text=text)


def template_texts() -> list[str]:
    """Every fixed string the templates add (a word-level tokenizer must cover them)."""
    return [
        t.system + t.user.format(text="") + t.assistant.format(text="", eos="") + t.assistant_suffix
        for t in TEMPLATES.values()
    ]


def stop_token_ids(tokenizer, template: Template) -> list[int]:
    """Token ids that end a generated answer: eos, and the template's own end token."""
    ids = [tokenizer.eos_token_id]
    if template.stop and template.stop in tokenizer.get_vocab():
        ids.append(tokenizer.convert_tokens_to_ids(template.stop))
    return ids


def encode_conversation(
    tokenizer,
    template: Template,
    conversations: list[dict],
    media_kind: str | None,
    visual_tokens: dict[str, int],
    max_length: int,
) -> tuple[list[int], list[int]]:
    """Token ids and labels; the media placeholder expands to the model's visual token count.

    `media_kind` is "video", "image" or None (text-only); the conversation must hold exactly
    one placeholder of that kind, or none when there is no media.
    """
    text = " ".join(str(turn.get("value", "")) for turn in conversations)
    found = _PLACEHOLDER_RE.findall(text)
    expected = [f"<{media_kind}>"] if media_kind else []
    if found != expected:
        raise SampleError(
            "placeholder mismatch", f"media is {media_kind or 'none'}, text has {found or 'no placeholder'}"
        )
    input_ids, labels = _encode_segments(
        tokenizer, render_segments(template, conversations, tokenizer.eos_token), visual_tokens
    )
    visual_id = tokenizer.convert_tokens_to_ids(VISUAL_TOKEN)
    if len(input_ids) > max_length:
        if visual_id in input_ids[max_length:]:
            raise SampleError("visual tokens truncated", f"{len(input_ids)} tokens > max_length {max_length}")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise SampleError("no supervised tokens", "nothing left to learn after truncation")
    return input_ids, labels


def _encode_segments(tokenizer, segments: list[tuple[str, bool]], visual_tokens: dict[str, int]):
    visual_id = tokenizer.convert_tokens_to_ids(VISUAL_TOKEN)
    input_ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels = [IGNORE_INDEX] * len(input_ids)
    for segment, supervised in segments:
        for piece in _PLACEHOLDER_RE.split(segment):
            if piece in PLACEHOLDERS:
                ids = [visual_id] * visual_tokens[piece[1:-1]]
            elif piece:
                ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            else:
                continue
            input_ids += ids
            labels += ids if supervised else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def encode_prompt(
    tokenizer, template: Template, question: str, media_kind: str | None, visual_tokens: dict[str, int]
) -> list[int]:
    """Token ids of a first human turn, ending where the assistant's answer would begin."""
    text = f"<{media_kind}>\n{question}" if media_kind else question
    input_ids, _ = _encode_segments(tokenizer, [(_human_turn(template, text, first=True), False)], visual_tokens)
    return input_ids


def conversations_of(members: dict[str, bytes], media_kind: str | None) -> list[dict]:
    """The sample's conversation: its json `conversations`, else a caption pair built from a
    json `caption` or a .txt member (video2dataset shards carry captions that way)."""
    meta = json.loads(members["json"]) if "json" in members else {}
    if not isinstance(meta, dict):
        raise SampleError("bad json", "the .json member is not an object")
    if "conversations" in meta:
        turns = meta["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) and "value" in t for t in turns):
            raise SampleError("bad conversation", "conversations must be a list of {from, value} objects")
        return turns
    caption = meta.get("caption")
    if caption is None and "txt" in members:
        caption = members["txt"].decode("utf-8")
    if not caption or not str(caption).strip():
        raise SampleError("no text", "neither conversations, a json caption nor a .txt member")
    prompt = f"<{media_kind}>" if media_kind else ""
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": str(caption).strip()}]
