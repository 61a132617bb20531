"""Our trainer against transformers' Trainer + DeepSpeed ZeRO-3 training the same model as
LlavaNextVideoForConditionalGeneration (BENCHMARKS.md, "Against transformers' Trainer").

The model: a CLIP tower (64 px, patch 16: 16 patches a frame, kept whole, 8 frames; frozen), an
mlp2x_gelu projector and a 4-layer Llama of width 256, random weights; our export of it holds the
same weights as a LlavaNextVideoForConditionalGeneration (its LLaVA-NeXT-Video twin), which the
peer trains. Both train the projector and the LLM for one epoch over the same samples, held in
memory as decoded frames and token ids: LLaVA-like lengths (log-normal text, long-tailed, cut at
1024 tokens), three in five 8-frame videos, one in five images, one in five text-only
conversations (those four times longer, as ShareGPT's are beside LLaVA's image chats). An image is
a one-frame video for both, so both compute the same tokens.

Each runs as its users run it, on 2 gloo ranks of one thread, DeepSpeed ZeRO-3, fp32, SDPA:
- ours: the stage runner (trainer.stage.StageRunner) with its defaults; each rank takes its
  micro-batches of samples in turn from a shuffled order and packs them into rows of 1024 tokens;
- the peer: transformers' Trainer with LLaVA's ZeRO-3 file (scripts/zero3.json) and LLaVA's
  sampler (`group_by_modality_length`): megabatches of ranks x micro-batch samples of one modality
  (video, image or text-only here, since a batch's videos must have one frame count), sorted by
  length and split evenly over the ranks; each micro-batch padded to its longest sample.
  LLaVA merges the modalities' last megabatches into a mixed one, which would leave a rank
  without media under ZeRO-3 here: each modality's sample count is a multiple of the megabatch,
  so every megabatch is full and none is merged.

Timed: every step after the first `--warmup`, on rank 0 (the ranks step together). Counted:
non-pad tokens (visual tokens included), summed over the ranks. Before timing, the bench checks
that both models give the same loss on a video, an image and a text-only sample.

    python bench/bench_trainer.py [--samples 320] [--micro-batch-size 8] [--peer-bucket-defaults]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORLD = 2
ROW = 1024  # our packed rows; also the longest sample (LLaVA's model_max_length)
VISION = {
    "image_size": 64,
    "patch_size": 16,
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_layers": 4,
    "num_heads": 8,
}
LLM = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_layers": 4,
    "num_heads": 8,
    "num_kv_heads": 8,
    "max_position_embeddings": ROW,
}
MIX = {"video": 3, "image": 1, "text": 1}  # parts of five
TEXT_MEDIAN = {"video": 80, "image": 80, "text": 320}  # text tokens besides the visual ones
LR = 2e-5
# LLaVA's scripts/zero3.json, as its training scripts pass it to the Trainer
LLAVA_ZERO3 = {
    "fp16": {
        "enabled": "auto",
        "loss_scale": 0,
        "loss_scale_window": 1000,
        "initial_scale_power": 16,
        "hysteresis": 2,
        "min_loss_scale": 1,
    },
    "bf16": {"enabled": "auto"},
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 1e9,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}

# what the Trainer sizes by the model's width ("auto": 10 x width for the persistence threshold);
# without them DeepSpeed's defaults apply, as they do to ours
SIZED_BY_WIDTH = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def model_config(work: Path):
    from trainer.config import ModelConfig

    return ModelConfig(
        vision={"tiny": VISION},
        llm={"tiny": LLM},
        word_vocab=str(work / "vocab.txt"),
        num_frames=8,
        reducer="none",
        projector="mlp2x_gelu",
        attn_implementation="sdpa",
    )


def prepare(work: Path) -> Path:
    """The model's export (with its twin) and the text-only split the stage config names (the
    runner builds its own reader from it; the bench hands it the in-memory batches instead)."""
    from data_shards.write.synth import SynthSpec, make_sample, vocabulary
    from data_shards.write.writer import SplitWriter
    from trainer.blueprint import blueprint_from_config, build_model, fill_weights
    from trainer.export import export_model
    from trainer.llava_next_video import FOLDER
    from trainer.storage import Storage

    work.mkdir(parents=True, exist_ok=True)
    (work / "vocab.txt").write_text("\n".join(vocabulary()))
    writer = SplitWriter(work / "declared", samples_per_shard=2)
    for i in range(2 * WORLD):
        writer.write(make_sample(i, 0, "text", SynthSpec(), with_probes=False))
    writer.close()
    blueprint = blueprint_from_config(model_config(work))
    model = build_model(blueprint, "sdpa")
    fill_weights(model, blueprint, 0.02, seed=0)
    export_model(model, blueprint.tokenizer, Storage(str(work / "export")), "vicuna_v1")
    if not (work / "export" / FOLDER).is_dir():
        raise SystemExit(f"the export has no {FOLDER}/: see {work / 'export' / 'valleyforge_model.json'}")
    return work / "export"


def modality_counts(count: int, megabatch: int) -> dict[str, int]:
    """About `count` samples in MIX, each modality's count a multiple of `megabatch`."""
    return {kind: max(1, round(count * part / sum(MIX.values()) / megabatch)) * megabatch for kind, part in MIX.items()}


def make_samples(tokenizer, visual, count: int, megabatch: int, seed: int = 0) -> list[dict]:
    """`modality_counts` samples in a shuffled order: token ids (visual placeholders first, then a
    prompt the loss skips and an answer it takes) and uint8 frames."""
    from data_shards.conversation import IGNORE_INDEX, VISUAL_TOKEN

    rng = np.random.default_rng(seed)
    counts = modality_counts(count, megabatch)
    visual_id = tokenizer.convert_tokens_to_ids(VISUAL_TOKEN)
    words = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids and i != visual_id]
    samples = []
    for kind, number in counts.items():
        slots = {"video": visual.tokens_per_video, "image": visual.tokens_per_image, "text": 0}[kind]
        frames = {"video": visual.num_frames, "image": 1, "text": 0}[kind]
        for _ in range(number):
            text = int(np.clip(rng.lognormal(np.log(TEXT_MEDIAN[kind]), 0.8), 16, ROW - slots - 1))
            prompt = max(4, text // 4)
            ids = [tokenizer.bos_token_id] + [visual_id] * slots + rng.choice(words, text).tolist()
            labels = [IGNORE_INDEX] * (1 + slots + prompt) + ids[1 + slots + prompt :]
            pixels = (
                torch.from_numpy(
                    rng.integers(0, 256, (frames, 3, visual.image_size, visual.image_size), dtype=np.uint8)
                )
                if frames
                else None
            )
            samples.append(
                {"key": f"{kind}-{len(samples)}", "kind": kind, "input_ids": ids, "labels": labels, "pixels": pixels}
            )
    order = rng.permutation(len(samples))  # the keys stay unique; the order is the sampler's business
    return [samples[i] for i in order]


def processor_pixels(frames: torch.Tensor) -> torch.Tensor:
    """What LLaVA-NeXT-Video's processor gives for uint8 frames [N,T,3,S,S] already at the tower's
    size: rescaled and normalised with CLIP's mean and std (as ours are in the model)."""
    from trainer.model import CLIP_MEAN, CLIP_STD

    mean, std = torch.tensor(CLIP_MEAN).view(1, 1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 1, 3, 1, 1)
    return (frames.float() / 255 - mean) / std


def join_process_group(rank: int, port: int) -> None:
    """As Ray Train (or torchrun) sets up a worker: one intra-op thread per rank on 2 cores."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(WORLD),
    )
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def record(out: Path, side: str, rank: int, **fields) -> None:
    (out / f"{side}-rank{rank}.json").write_text(json.dumps(fields))


def zero_sizes(engine) -> dict:
    """The ZeRO-3 sizes a DeepSpeed engine runs with."""
    return {
        "reduce_bucket_size": engine.zero_reduce_bucket_size(),
        "prefetch_bucket_size": engine.zero_prefetch_bucket_size(),
        "param_persistence_threshold": engine.zero_param_persistence_threshold(),
    }


def ours(rank: int, args, port: int) -> None:
    """Our stage runner on this rank's share of a shuffled order, packed as our reader packs."""
    from data_shards.config import ReaderConfig
    from data_shards.read.batching import collate
    from data_shards.read.reader import Topology, shard_lists
    from trainer.config import EngineConfig, StageConfig
    from trainer.job import StageJob
    from trainer.stage import StageRunner

    join_process_group(rank, port)
    stage = StageConfig(
        name="instruct",
        train_data=str(args.work / "declared"),
        template="vicuna_v1",
        trainable=["projector", "llm"],
        steps=args.steps,
        optimizer={"lr": LR},
        schedule={"warmup_steps": 0, "min_lr_ratio": 1.0},
    )
    job = StageJob(
        model=model_config(args.work),
        engine=EngineConfig(),
        data=ReaderConfig(micro_batch_size=args.micro_batch_size, num_workers=0, max_length=ROW, packing=True),
        stage=stage,
        train_shards=shard_lists(stage.train_data),
        eval_shards=None,
        init_export_url=None,
        export_dir=str(args.work / "ours-export"),
        checkpoint_dir=str(args.work / "ours-ckpt"),
        seed=0,
    )
    runner = StageRunner(job, Topology(rank, WORLD), init_folder=args.work / "export")
    samples = make_samples(runner.tokenizer, runner.model.visual_spec(), args.samples, WORLD * args.micro_batch_size)
    step_tokens, step_positions, step_ends, losses = [], [], [], []

    def batches():
        for step in range(args.steps):
            start = (step * WORLD + rank) * args.micro_batch_size
            batch = collate(
                samples[start : start + args.micro_batch_size],
                runner.tokenizer.pad_token_id,
                runner.model.visual_spec(),
                pack_length=ROW,
            )
            batch.update(seen=args.micro_batch_size, rejected={}, rejected_by_shard={})  # as the reader counts
            step_tokens.append(int(batch["attention_mask"].sum()))
            step_positions.append(batch["input_ids"].numel())
            yield batch

    def log(metrics: dict, step: int) -> None:
        step_ends.append(time.perf_counter())
        losses.append(metrics["train/loss"])

    runner.train(log, batches())
    record(
        args.work,
        "ours",
        rank,
        step_ends=step_ends,
        tokens=step_tokens,
        positions=step_positions,
        losses=losses,
        zero=zero_sizes(runner.engine),
    )


def peer(rank: int, args, port: int) -> None:
    """transformers' Trainer on the twin, with LLaVA's ZeRO-3 file and modality-length sampler."""
    from accelerate import PartialState
    from transformers import (
        AutoTokenizer,
        LlavaNextVideoForConditionalGeneration,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from data_shards.media import VisualSpec

    join_process_group(rank, port)
    # What `accelerate launch` with DeepSpeed sets up; on a host without GPUs the backend is named
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    twin_folder = args.work / "export" / "llava_next_video"
    zero3 = json.loads(json.dumps(LLAVA_ZERO3))
    if args.peer_bucket_defaults:
        for key in SIZED_BY_WIDTH:
            del zero3["zero_optimization"][key]
    training = TrainingArguments(
        output_dir=str(args.work / "peer-out"),
        deepspeed=zero3,
        per_device_train_batch_size=args.micro_batch_size,
        max_steps=args.steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=0,
        disable_tqdm=True,
        accelerator_config={"use_configured_state": True},
    )
    model = LlavaNextVideoForConditionalGeneration.from_pretrained(twin_folder, attn_implementation="sdpa")
    model.model.vision_tower.requires_grad_(False)  # LLaVA's instruction tuning: projector + LLM
    model.model.image_newline.requires_grad_(False)  # anyres images only: unused here
    tokenizer = AutoTokenizer.from_pretrained(twin_folder)
    config = model.config
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    visual = VisualSpec(
        num_frames=8, image_size=config.vision_config.image_size, tokens_per_video=8 * patches, tokens_per_image=patches
    )
    samples = make_samples(tokenizer, visual, args.samples, WORLD * args.micro_batch_size)
    step_tokens, step_positions, step_ends, losses = [], [], [], []

    def collator(batch: list[dict]) -> dict:
        """LLaVA's: right-padded to the batch's longest sample; the media as the processor gives them."""
        length = max(len(s["input_ids"]) for s in batch)
        ids = torch.full((len(batch), length), tokenizer.pad_token_id)
        labels = torch.full((len(batch), length), -100)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, s in enumerate(batch):
            n = len(s["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(s["input_ids"]), torch.tensor(s["labels"]), 1
        inputs = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        media = [s["pixels"] for s in batch if s["pixels"] is not None]
        if media:
            inputs["pixel_values_videos"] = processor_pixels(torch.stack(media))
        step_tokens.append(int(mask.sum()))
        step_positions.append(ids.numel())
        return inputs

    class ModalityLengthTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return ModalityLengthSampler(
                [s["kind"] for s in samples], [len(s["input_ids"]) for s in samples], args.micro_batch_size, WORLD
            )

    class StepClock(TrainerCallback):
        def on_step_end(self, training_args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

        def on_log(self, training_args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    trainer = ModalityLengthTrainer(
        model=model, args=training, train_dataset=samples, data_collator=collator, callbacks=[StepClock()]
    )
    trainer.train()
    # the loader reads a batch ahead: keep those of the steps taken
    record(
        args.work,
        "peer",
        rank,
        step_ends=step_ends,
        tokens=step_tokens[: args.steps],
        positions=step_positions[: args.steps],
        losses=losses,
        zero=zero_sizes(trainer.model_wrapped),
    )


class ModalityLengthSampler(torch.utils.data.Sampler):
    """LLaVA's LengthGroupedSampler with group_by_modality: per modality, random megabatches of
    ranks x micro-batch samples, each sorted by length and split into one micro-batch per rank of
    about even total length; the megabatches of every modality then shuffled together. Yields the
    global order; the Trainer's loader hands micro-batch i to rank i mod ranks."""

    def __init__(self, kinds: list[str], lengths: list[int], micro_batch: int, world: int, seed: int = 0):
        self.kinds, self.lengths, self.micro_batch, self.world = kinds, lengths, micro_batch, world
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        megabatch = self.micro_batch * self.world
        megabatches = []
        for kind in dict.fromkeys(self.kinds):
            members = [i for i, k in enumerate(self.kinds) if k == kind]
            shuffled = [members[i] for i in torch.randperm(len(members), generator=self.generator)]
            for start in range(0, len(shuffled) - megabatch + 1, megabatch):
                ordered = sorted(shuffled[start : start + megabatch], key=lambda i: -self.lengths[i])
                megabatches.append(self._even_chunks(ordered))
        order = torch.randperm(len(megabatches), generator=self.generator)
        return iter([i for m in order for chunk in megabatches[m] for i in chunk])

    def _even_chunks(self, ordered: list[int]) -> list[list[int]]:
        """LLaVA's split_to_even_chunks: longest first, each to the shortest chunk not yet full."""
        chunks, totals = [[] for _ in range(self.world)], [0] * self.world
        for i in ordered:
            target = min((c for c in range(self.world) if len(chunks[c]) < self.micro_batch), key=lambda c: totals[c])
            chunks[target].append(i)
            totals[target] += self.lengths[i]
        return chunks


def same_loss_check(export: Path, args) -> tuple[float, float]:
    """Both models' mean loss over a video, an image and a text-only sample of the bench's, each
    alone; first, that the twin's tokenizer gives the samples the same token ids as ours."""
    from transformers import AutoTokenizer, LlavaNextVideoForConditionalGeneration

    from data_shards.read.batching import collate
    from trainer.blueprint import load_export
    from trainer.model import model_inputs

    model, tokenizer = load_export(export)
    twin = LlavaNextVideoForConditionalGeneration.from_pretrained(
        export / "llava_next_video", attn_implementation="sdpa"
    )
    samples = make_samples(tokenizer, model.visual_spec(), args.samples, WORLD * args.micro_batch_size)
    theirs = make_samples(
        AutoTokenizer.from_pretrained(export / "llava_next_video"),
        model.visual_spec(),
        args.samples,
        WORLD * args.micro_batch_size,
    )
    if [s["input_ids"] for s in theirs] != [s["input_ids"] for s in samples]:
        raise SystemExit("the twin's tokenizer makes other token ids of the bench's samples than ours")
    losses = {"ours": [], "peer": []}
    with torch.no_grad():
        for kind in MIX:
            sample = next(s for s in samples if s["kind"] == kind)
            batch = collate([sample], tokenizer.pad_token_id, model.visual_spec())
            losses["ours"].append(float(model.eval()(**model_inputs(batch)).loss))
            videos = None if sample["pixels"] is None else processor_pixels(sample["pixels"][None])
            losses["peer"].append(
                float(
                    twin.eval()(
                        input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        labels=batch["labels"],
                        pixel_values_videos=videos,
                    ).loss
                )
            )
    return statistics.mean(losses["ours"]), statistics.mean(losses["peer"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_side(side, args) -> dict:
    import torch.multiprocessing as mp

    started = time.perf_counter()
    for stale in args.work.glob(f"{side.__name__}-rank*.json"):
        stale.unlink()
    mp.start_processes(side, args=(args, free_port()), nprocs=WORLD, start_method="spawn")
    ranks = [json.loads((args.work / f"{side.__name__}-rank{r}.json").read_text()) for r in range(WORLD)]
    ends, timed = ranks[0]["step_ends"], slice(args.warmup, args.steps)
    if len(ends) != args.steps:
        raise SystemExit(f"{side.__name__}: {len(ends)} steps timed of {args.steps}")
    tokens = sum(sum(r["tokens"][timed]) for r in ranks)
    positions = sum(sum(r["positions"][timed]) for r in ranks)
    seconds = ends[-1] - ends[args.warmup - 1]
    return {
        "tokens_per_s": tokens / seconds,
        "step_s": seconds / (args.steps - args.warmup),
        "padding": 1 - tokens / positions,
        "mean_loss": statistics.mean(ranks[0]["losses"]),
        "zero": ranks[0]["zero"],
        "wall_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=320, help="samples in the epoch (rounded per modality)")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="samples per rank and step, both sides")
    parser.add_argument(
        "--warmup", type=int, default=2, choices=range(1, 100), metavar="N", help="steps not timed (at least 1)"
    )
    parser.add_argument(
        "--peer-bucket-defaults",
        action="store_true",
        help="the peer without the ZeRO-3 bucket and persistence sizes the Trainer derives from the "
        "model's width: DeepSpeed's defaults, as ours has",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/vf-bench-trainer"))
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(2)
    export = prepare(args.work)
    megabatch = WORLD * args.micro_batch_size
    args.steps = sum(modality_counts(args.samples, megabatch).values()) // megabatch
    if args.steps <= args.warmup:
        raise SystemExit(
            f"--samples {args.samples}: {args.steps} steps of {megabatch} samples, not more than --warmup {args.warmup}"
        )
    ours_loss, peer_loss = same_loss_check(export, args)
    print(
        f"same model: mean loss over a video, an image and a text-only sample: ours {ours_loss:.6f}, "
        f"peer {peer_loss:.6f}",
        flush=True,
    )
    if abs(ours_loss - peer_loss) > 1e-4 * abs(ours_loss):
        raise SystemExit("the peer's model is not ours: the comparison would not be like for like")
    results = {}
    for side in (ours, peer):
        results[side.__name__] = run_side(side, args)
        r = results[side.__name__]
        print(
            f"{side.__name__}: {r['tokens_per_s']:,.0f} tokens/s, {r['step_s']:.2f} s per step, padding "
            f"{r['padding']:.0%} of computed positions, mean train loss {r['mean_loss']:.4f} "
            f"({r['wall_s']:.0f} s in all); ZeRO-3 " + ", ".join(f"{k} {v:,}" for k, v in r["zero"].items()),
            flush=True,
        )
    print(
        f"{args.steps} steps of {megabatch} samples ({args.micro_batch_size} per rank), the first {args.warmup} "
        f"not timed"
    )
    (args.work / "summary.json").write_text(json.dumps(results, indent=1))
    ratio = results["ours"]["tokens_per_s"] / results["peer"]["tokens_per_s"]
    print(
        f"ours_tokens_per_s={results['ours']['tokens_per_s']:.0f} "
        f"peer_tokens_per_s={results['peer']['tokens_per_s']:.0f} ratio={ratio:.2f}"
    )


if __name__ == "__main__":
    main()
