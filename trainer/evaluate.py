"""Held-out evaluation by generation: ask each probe's question about its clip and score the
answer against the attribute's choices, per attribute, beside chance."""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Callable

import torch

from data_shards.conversation import IGNORE_INDEX, encode_prompt, get_template, stop_token_ids
from data_shards.frames import FrameSampling
from data_shards.manifest import read_manifest
from data_shards.batching import collate
from data_shards.reader import decode_media
from data_shards.tarstream import iter_samples


def first_choice(answer: str, choices: list[str]) -> str | None:
    """The first word of the answer that is one of the choices (None when there is none)."""
    words = answer.lower().replace(".", " ").replace(",", " ").split()
    return next((w for w in words if w in choices), None)


@torch.no_grad()
def attribute_accuracy(model, tokenizer, split: str, template_name: str, max_new_tokens: int = 8,
                       progress: Callable[[int, int], None] = lambda done, total: None) -> dict:
    """Metrics `eval/attribute_accuracy[/<attribute>]` and `eval/attribute_chance` on `split`."""
    model.eval()
    template = get_template(template_name)
    visual = model.visual_spec()
    manifest = read_manifest(split)
    sampling = FrameSampling("uniform", visual.num_frames)
    correct, asked, chance = defaultdict(int), defaultdict(int), {}
    samples = (sample for url in manifest.urls for sample in iter_samples(url))
    for done, raw in enumerate(samples, 1):
        media_kind, pixels = decode_media(raw.members, visual, sampling)
        for probe in json.loads(raw.members["json"]).get("probes", []):
            input_ids = encode_prompt(tokenizer, template, probe["question"], media_kind, visual.tokens)
            batch = collate([{"key": raw.key, "input_ids": input_ids, "labels": [IGNORE_INDEX] * len(input_ids),
                              "pixels": pixels}], tokenizer.pad_token_id, visual)
            out = model.generate(batch["input_ids"], batch["attention_mask"], batch["frames"], batch["frame_mask"],
                                 max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tokenizer, template),
                                 pad_token_id=tokenizer.pad_token_id)
            answer = tokenizer.decode(out[0], skip_special_tokens=True)
            attribute = probe["attribute"]
            asked[attribute] += 1
            correct[attribute] += first_choice(answer, probe["choices"]) == probe["answer"]
            chance[attribute] = 1.0 / len(probe["choices"])
        progress(done, manifest.num_samples)
    if not asked:
        raise ValueError(f"{split}: no samples with probes to evaluate")
    metrics = {f"eval/attribute_accuracy/{a}": correct[a] / asked[a] for a in asked}
    metrics["eval/attribute_accuracy"] = sum(correct.values()) / sum(asked.values())
    metrics["eval/attribute_chance"] = sum(chance.values()) / len(chance)
    return metrics
