"""Tokenizers: a real one from a local path, or a word-level one built from a vocabulary file
(tiny test and demo models), both carrying the visual token the model splices media into."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Callable

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from data_shards.conversation import TEMPLATE_SPECIAL_TOKENS, VISUAL_TOKEN, template_texts
from data_shards.errors import ValleyForgeError

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` plus every word the conversation templates use."""
    pre = pre_tokenizers.Whitespace()
    vocab_words = set(words)
    for text in template_texts():
        for special in TEMPLATE_SPECIAL_TOKENS:
            text = text.replace(special, " ")
        vocab_words |= {w for w, _ in pre.pre_tokenize_str(text)}
    specials = [*SPECIAL_TOKENS.values(), VISUAL_TOKEN, *TEMPLATE_SPECIAL_TOKENS]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(vocab_words - set(specials)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
    tokenizer.add_special_tokens({"additional_special_tokens": [VISUAL_TOKEN, *TEMPLATE_SPECIAL_TOKENS]})
    return tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a saved tokenizer; adds the visual token (and a pad token) when it lacks them."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if VISUAL_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [VISUAL_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def word_tokenizer_from_file(vocab_file: str | Path) -> PreTrainedTokenizerFast:
    path = Path(vocab_file)
    if not path.is_file():
        raise ValleyForgeError(f"{path}: vocabulary file not found (one word per line)")
    return build_word_tokenizer([w for w in path.read_text().split() if w])


@lru_cache(maxsize=2)
def token_counter(tokenizer: str | None) -> Callable[[str], int]:
    """Counts a text's tokens with the tokenizer folder given, or its words when None."""
    if tokenizer is None:
        return lambda text: len(text.split())
    loaded = load_tokenizer(tokenizer)
    return lambda text: len(loaded(text, add_special_tokens=False)["input_ids"])
