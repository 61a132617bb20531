"""Model FLOPs of a training step, and model FLOPs utilization (MFU).

A transformer of N matrix parameters (embedding tables excluded), L layers and width d, run over a sequence of S
tokens, costs in the forward pass 2*N*S (matrix multiplies) + 4*L*d*S^2 (attention scores and
their weighted sum, without causal halving). A training step multiplies that by
    1  when nothing at or before the module trains (forward only),
    2  when something before it trains (the backward pass computes input gradients),
    3  when the module itself trains (input and weight gradients; LoRA counts as the LLM training).
The model's FLOPs are the vision encoder's over every real frame (S = 1 + patches) plus the
LLM's over every sample (S = its token count, visual tokens included); padding and the
all-zero frames of text-only samples are not useful work and are not counted. The projector
is small and left out. In a contrastive stage the text tower takes the LLM's place (S = the
caption's tokens) and the small temporal module is left out too.

MFU = model FLOPs per second per device / the device's peak: `cluster.peak_flops_per_device`,
else the dense bf16 (or TF32 for fp32) peak of a known GPU; unknown devices (CPU) get none.
"""

from __future__ import annotations

import resource

import torch

from data_shards.conversation import IGNORE_INDEX

# dense peak FLOP/s per device: (bf16, tf32)
KNOWN_PEAKS = {
    "H200": (989e12, 494e12),
    "H100 SXM": (989e12, 494e12),
    "H100 NVL": (835e12, 418e12),
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "A10G": (70e12, 35e12),
    "L4": (121e12, 60e12),
}


def peak_flops(configured: float | None, bf16: bool) -> float | None:
    if configured:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, (bf16_peak, tf32_peak) in KNOWN_PEAKS.items():  # most specific names first
        if key in name:
            return bf16_peak if bf16 else tf32_peak
    return None


def _dense_params(module) -> int:
    """Parameters that multiply: matrices outside embedding tables (norm scales and biases add)."""
    embeddings = {id(p) for m in module.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(
        getattr(p, "ds_numel", p.numel())
        for p in module.parameters()
        if id(p) not in embeddings and len(getattr(p, "ds_shape", p.shape)) >= 2
    )


class FlopCounter:
    """Model FLOPs of one micro-batch, from its attention and frame masks."""

    def __init__(self, model, trainable: list[str], contrastive: bool = False):
        vision_cfg = model.vision.config
        self.vision = (_dense_params(model.vision), vision_cfg.num_hidden_layers, vision_cfg.hidden_size)
        self.frame_tokens = 1 + model.num_patches  # fewer under token reduction
        vision_trains = "vision" in trainable
        self.vision_factor = 3 if vision_trains else 1
        self.contrastive = contrastive
        language = model.text if contrastive else model.llm
        self.language = (_dense_params(language), language.config.num_hidden_layers, language.config.hidden_size)
        if contrastive:  # the text tower runs beside the vision tower, not after it
            self.language_factor = 3 if "text" in trainable else 1
        else:
            upstream_of_llm = vision_trains or bool({"projector", "soft_prompt"} & set(trainable))
            self.language_factor = (
                3 if {"llm", "lora", "embeddings"} & set(trainable) else (2 if upstream_of_llm else 1)
            )

    @staticmethod
    def _forward(params: int, layers: int, width: int, lengths: torch.Tensor) -> float:
        lengths = lengths.double()
        return float(2 * params * lengths.sum() + 4 * layers * width * (lengths**2).sum())

    def batch_flops(self, batch: dict) -> float:
        frames = int(batch["frame_mask"].sum())
        vision = self._forward(*self.vision, torch.full((frames,), self.frame_tokens))
        # per sample: packing saves the cross terms
        lengths = (batch["labels"] != IGNORE_INDEX).sum(1) if self.contrastive else batch["lengths"]
        return self.vision_factor * vision + self.language_factor * self._forward(*self.language, lengths)


def peak_memory_metrics() -> dict[str, float]:
    """Peak accelerator memory where there is one, and the process's peak resident memory."""
    metrics = {"system/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        metrics["system/peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return metrics


class StepMeter:
    """Counts one optimizer step's micro-batches; turns the counts summed over ranks into the
    throughput metrics."""

    FIELDS = ("loss", "tokens", "samples", "visual_tokens", "data_wait_s", "flops")

    def __init__(self, flops: FlopCounter, visual_token_id: int, peak: float | None):
        self.flops, self.visual_token_id, self.peak = flops, visual_token_id, peak
        self.counts = dict.fromkeys(self.FIELDS, 0.0)

    def begin(self) -> None:
        self.counts = dict.fromkeys(self.FIELDS, 0.0)

    def add(self, batch: dict, loss: float, data_wait_s: float) -> None:
        c = self.counts
        c["loss"] += loss
        c["tokens"] += int(batch["attention_mask"].sum())
        c["samples"] += len(batch["lengths"])  # a packed row holds several
        c["visual_tokens"] += int((batch["input_ids"] == self.visual_token_id).sum())
        c["data_wait_s"] += data_wait_s
        c["flops"] += self.flops.batch_flops(batch)

    def local(self) -> list[float]:
        return [self.counts[f] for f in self.FIELDS]

    def metrics(self, summed: list[float], loss_parts: int, world: int, elapsed: float) -> dict[str, float]:
        """From the counts summed over ranks: train/loss is the summed losses over `loss_parts`."""
        total = dict(zip(self.FIELDS, summed))
        flops_per_device = total["flops"] / world / elapsed
        metrics = {
            "train/loss": total["loss"] / loss_parts,
            "train/tokens_per_s": total["tokens"] / elapsed,
            "train/samples_per_s": total["samples"] / elapsed,
            "train/visual_tokens_per_sample": total["visual_tokens"] / max(total["samples"], 1),
            "train/data_wait_fraction": total["data_wait_s"] / world / elapsed,
            "train/model_tflops_per_s_per_device": flops_per_device / 1e12,
            **peak_memory_metrics(),
        }
        if self.peak:
            metrics["train/mfu"] = flops_per_device / self.peak
        return metrics
