"""Held-out evaluation by generation: ask each probe's question about its clip and score the
answer against the attribute's choices, per attribute, beside chance."""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Callable

from data_shards.manifest import read_manifest
from data_shards.read.tarstream import iter_samples
from trainer.generate import answer, media_for


def first_choice(reply: str, choices: list[str]) -> str | None:
    """The first word of the reply that is one of the choices (None when there is none)."""
    words = reply.lower().replace(".", " ").replace(",", " ").split()
    return next((w for w in words if w in choices), None)


def attribute_accuracy(model, tokenizer, split: str, template_name: str, max_new_tokens: int = 8,
                       progress: Callable[[int, int], None] = lambda done, total: None) -> dict:
    """Metrics `eval/attribute_accuracy[/<attribute>]` and `eval/attribute_chance` on `split`."""
    model.eval()
    manifest = read_manifest(split)
    correct, asked, chance = defaultdict(int), defaultdict(int), {}
    samples = (sample for url in manifest.urls for sample in iter_samples(url))
    for done, raw in enumerate(samples, 1):
        try:
            media = media_for(model, raw.members)  # once per clip, whatever the number of probes
        except ValueError as err:
            raise ValueError(f"{raw.url}: sample {raw.key}: {err}") from err
        for probe in json.loads(raw.members["json"]).get("probes", []):
            reply = answer(model, tokenizer, template_name, probe["question"], media, max_new_tokens)
            attribute = probe["attribute"]
            asked[attribute] += 1
            correct[attribute] += first_choice(reply, probe["choices"]) == probe["answer"]
            chance[attribute] = 1.0 / len(probe["choices"])
        progress(done, manifest.num_samples)
    if not asked:
        raise ValueError(f"{split}: no samples with probes to evaluate")
    metrics = {f"eval/attribute_accuracy/{a}": correct[a] / asked[a] for a in asked}
    metrics["eval/attribute_accuracy"] = sum(correct.values()) / sum(asked.values())
    metrics["eval/attribute_chance"] = sum(chance.values()) / len(chance)
    return metrics
