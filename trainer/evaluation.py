"""Held-out evaluation by generation: ask each probe's question about its clip and score the
answer against the attribute's choices, per attribute, beside chance. On the driver over a whole
split, or during training on every rank's share of the clips, in step (under ZeRO-3 every
generated token is a collective of all ranks)."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice
from typing import Callable, Iterable, Iterator

from data_shards.errors import ValleyForgeError
from data_shards.manifest import read_manifest
from data_shards.read.tarstream import RawSample, iter_samples
from trainer.generate import answer, media_for
from trainer.ranks import gather


def first_choice(reply: str, choices: list[str]) -> str | None:
    """The first word of the reply that is one of the choices (None when there is none)."""
    words = reply.lower().replace(".", " ").replace(",", " ").split()
    return next((w for w in words if w in choices), None)


def probed_clips(urls: Iterable[str]) -> Iterator[tuple[RawSample, list[dict]]]:
    """Every sample of the shards at `urls`, with its probes (none for a sample without)."""
    for url in urls:
        for raw in iter_samples(url):
            yield raw, json.loads(raw.members["json"]).get("probes", [])


class AccuracyTally:
    """Probes asked and answered right, per attribute, and each attribute's chance."""

    def __init__(self):
        self.correct, self.asked, self.chance = Counter(), Counter(), {}

    def score(self, probe: dict, reply: str) -> None:
        attribute = probe["attribute"]
        self.asked[attribute] += 1
        self.correct[attribute] += first_choice(reply, probe["choices"]) == probe["answer"]
        self.chance[attribute] = 1.0 / len(probe["choices"])

    def add(self, other: AccuracyTally) -> None:
        self.correct.update(other.correct)
        self.asked.update(other.asked)
        self.chance.update(other.chance)

    def metrics(self, where: str) -> dict:
        """`eval/attribute_accuracy[/<attribute>]` and `eval/attribute_chance`."""
        if not self.asked:
            raise ValleyForgeError(f"{where}: no samples with probes to evaluate")
        metrics = {f"eval/attribute_accuracy/{a}": self.correct[a] / self.asked[a] for a in self.asked}
        metrics["eval/attribute_accuracy"] = sum(self.correct.values()) / sum(self.asked.values())
        metrics["eval/attribute_chance"] = sum(self.chance.values()) / len(self.chance)
        return metrics


def _clip_media(model, raw: RawSample):
    try:
        return media_for(model, raw.members)
    except ValleyForgeError as err:
        raise ValleyForgeError(f"{raw.url}: sample {raw.key}: {err}") from err


def attribute_accuracy(
    model,
    tokenizer,
    split: str,
    template_name: str,
    max_new_tokens: int = 8,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> dict:
    """The metrics of one process asking every probe of `split`."""
    model.eval()
    manifest = read_manifest(split)
    tally = AccuracyTally()
    for done, (raw, probes) in enumerate(probed_clips(manifest.urls), 1):
        media = _clip_media(model, raw) if probes else None  # once per clip, whatever the number of probes
        for probe in probes:
            tally.score(probe, answer(model, tokenizer, template_name, probe["question"], media, max_new_tokens))
        progress(done, manifest.num_samples)
    return tally.metrics(split)


def sharded_attribute_accuracy(
    model,
    tokenizer,
    urls: Iterable[str],
    template_name: str,
    max_new_tokens: int,
    max_clips: int | None,
    rank: int,
    world_size: int,
) -> dict:
    """The metrics of every rank asking the probes of its share of the first `max_clips` probed
    clips (clip i to rank i mod world_size), on every rank. The ranks generate in step: each answer
    runs until every rank's is done (transformers' synced_gpus), and a rank with fewer questions
    asks its last one again, unscored, until every rank is through."""
    model.eval()
    clips = [(raw, probes) for raw, probes in islice((c for c in probed_clips(urls) if c[1]), max_clips)]
    questions = [(raw, probe) for raw, probes in clips[rank::world_size] for probe in probes]
    rounds = max(gather(len(questions)))
    spare = questions[-1] if questions else (None, {"question": "?"})  # a rank without clips asks a text prompt
    tally, media, media_of = AccuracyTally(), (None, None), None
    for index in range(rounds):
        raw, probe = questions[index] if index < len(questions) else spare
        if raw is not None and raw is not media_of:
            media, media_of = _clip_media(model, raw), raw
        reply = answer(
            model,
            tokenizer,
            template_name,
            probe["question"],
            media if raw else (None, None),
            max_new_tokens,
            synced_gpus=world_size > 1,
        )
        if index < len(questions):
            tally.score(probe, reply)
    merged = AccuracyTally()
    for part in gather(tally):
        merged.add(part)
    return merged.metrics(f"{len(clips)} probed clips")
