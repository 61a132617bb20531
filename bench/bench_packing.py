"""Sequence packing vs padding: effective (non-pad) tokens per second of training steps on a
LLaVA-like length distribution (BENCHMARKS.md, "Packing").

Sample lengths are drawn log-normally (median 300 tokens, long tail, capped at 1024), as
LLaVA-style instruction data with a few hundred visual tokens per sample is; each micro-batch
of 16 samples is either padded to its longest sample or packed into rows of 1024 tokens. The
LLM is a 4-layer Llama of width 256, trained with SDPA attention on CPU as our trainer runs it
(trainer/packed_attention.py: padded rows under a mask, each packed sample attended alone); only
the LLM runs (the vision path costs the same either way).

    python bench/bench_packing.py [--batches 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_shards.media import VisualSpec  # noqa: E402
from data_shards.read.batching import collate  # noqa: E402
from trainer import packed_attention  # noqa: E402

ROW = 1024
VISUAL = VisualSpec(num_frames=1, image_size=1, tokens_per_video=0, tokens_per_image=0)


def samples(rng: np.random.Generator, count: int) -> list[dict]:
    lengths = np.clip(rng.lognormal(np.log(300), 0.6, size=count).astype(int), 32, ROW)
    out = []
    for i, n in enumerate(lengths):
        ids = rng.integers(4, 1000, size=n).tolist()
        labels = [-100] * (n // 2) + ids[n // 2 :]  # the second half is the answer
        out.append({"key": str(i), "input_ids": ids, "labels": labels, "pixels": None})
    return out


def throughput(model, batches: list[dict]) -> tuple[float, float]:
    """(effective tokens/s, fraction of computed positions that are padding)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    real = computed = 0
    started = time.perf_counter()
    for batch in batches:
        inputs = {"input_ids": batch["input_ids"], "labels": batch["labels"]}
        if "position_ids" in batch:
            inputs["position_ids"] = batch["position_ids"]
        else:
            inputs["attention_mask"] = batch["attention_mask"]
        model(**inputs, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        real += int(batch["attention_mask"].sum())
        computed += batch["input_ids"].numel()
    return real / (time.perf_counter() - started), 1 - real / computed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    packed_attention.register()  # as our trainer builds the LLM where SDPA is chosen
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=1024,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=ROW,
            attn_implementation=packed_attention.NAME,
        )
    )
    rng = np.random.default_rng(0)
    groups = [samples(rng, args.batch_size) for _ in range(args.batches)]
    padded = [collate(g, 0, VISUAL) for g in groups]
    packed = [collate(g, 0, VISUAL, pack_length=ROW) for g in groups]
    throughput(model, padded[:2])  # warm-up
    padded_tps, padded_waste = throughput(model, padded)
    packed_tps, packed_waste = throughput(model, packed)
    rows = sum(b["input_ids"].shape[0] for b in packed) / len(packed)
    print(f"{args.batches} micro-batches of {args.batch_size} samples, median length 300, rows of {ROW}")
    print("| batches | effective tokens/s | padding share of computed positions | rows per micro-batch |")
    print("|---|---|---|---|")
    print(f"| padded | {padded_tps:,.0f} | {padded_waste:.0%} | {args.batch_size} |")
    print(f"| packed | {packed_tps:,.0f} | {packed_waste:.0%} | {rows:.1f} |")
    print(f"packed / padded: {packed_tps / padded_tps:.2f}x")


if __name__ == "__main__":
    main()
