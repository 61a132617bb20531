"""Config sections owned by the trainer: model, engine, the stages. A leaf: it imports no
implementation (the registries its names select from are checked against them in
tests/test_config.py); the runtime job a worker gets is trainer/job.py."""

from __future__ import annotations

import re
import warnings
from typing import Literal

from pydantic import Field, model_validator

from data_shards.config import DataSource, Strict, TemplateName

# a stage's `trainable`: trainer/trainable.py TRAINABLE_MODULES
Module = Literal["vision", "projector", "llm", "embeddings", "soft_prompt", "lora", "temporal", "text"]
# model.reducer: trainer/visual.py REDUCERS
Reducer = Literal["none", "valley", "spatial_pool2", "temporal_diff"]
# model.projector: trainer/visual.py PROJECTORS
Projector = Literal["linear", "mlp2x_gelu", "abstractor"]


class TinyVision(Strict):
    """A random CLIP vision tower built from these sizes (tests, demo)."""

    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4


class TinyLLM(Strict):
    """A random Llama built from these sizes (tests, demo)."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 1024


class TinyText(Strict):
    """A random CLIP text tower built from these sizes, on the model's tokenizer."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_length: int = Field(64, ge=2, description="caption tokens kept (the rest cut)")


class ContrastiveTowers(Strict):
    """What a contrastive stage trains besides the vision tower: the temporal module attending
    across every frame's tokens and the text tower, meeting in a shared embedding space. The text
    tower is trained from scratch on the model's tokenizer, as CLIPA trains both towers."""

    embed_dim: int = Field(256, ge=1, description="the shared embedding space's size")
    temporal_layers: int = Field(2, ge=1, description="transformer layers across each clip's frames")
    text: TinyText = TinyText()


class ComponentSource(Strict):
    """A pretrained component (`path`, a local checkpoint folder) or a random one (`tiny`)."""

    path: str | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.tiny is None):
            raise ValueError("set exactly one of `path` (a checkpoint folder) or `tiny` (random sizes)")
        return self


class VisionSource(ComponentSource):
    tiny: TinyVision | None = None


class LLMSource(ComponentSource):
    tiny: TinyLLM | None = None


class ModelConfig(Strict):
    vision: VisionSource
    llm: LLMSource
    tokenizer: str | None = Field(None, description="tokenizer folder; default: the LLM path")
    word_vocab: str | None = Field(None, description="word list for a word-level tokenizer (tiny models)")
    reducer: Reducer = "valley"
    projector: Projector = "linear"
    abstractor_queries: int = Field(32, ge=1, description="abstractor: learned queries = visual tokens per sample")
    abstractor_layers: int = Field(2, ge=1)
    soft_prompt_tokens: int = Field(0, ge=0, description="eP-ALM: trainable prompt embeddings before the text")
    vision_feature_layer: int = -2
    num_frames: int = Field(8, ge=1)
    contrastive: ContrastiveTowers | None = Field(
        None, description="the towers of `objective: contrastive` stages (temporal module, text tower)"
    )
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"
    init_std: float = Field(0.02, gt=0, description="std of random init (tiny parts and the projector)")

    @model_validator(mode="after")
    def _tokenizer_source(self):
        if self.tokenizer is None and self.word_vocab is None and self.llm.path is None:
            raise ValueError("a tiny LLM needs `word_vocab` (a word list) or `tokenizer` (a folder)")
        return self


class EngineConfig(Strict):
    zero_stage: Literal[0, 1, 2, 3] = 3
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32", description="auto: bf16 where the accelerator supports it, else fp32"
    )
    gradient_checkpointing: list[Literal["llm", "vision"]] = Field(
        [], description="recompute these modules' activations in the backward pass"
    )
    param_persistence_threshold: int = Field(
        100_000, ge=0, description="ZeRO-3 keeps parameters smaller than this unpartitioned"
    )
    offload_optimizer: bool = False


class OptimizerConfig(Strict):
    lr: float = Field(1e-3, gt=0)
    module_lr: dict[Module, float] = Field({}, description="learning rate per trained module; others use lr")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


class ScheduleConfig(Strict):
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr * this")


class LoraConfig(Strict):
    """LoRA adapters on the LLM (peft); train them with `lora` in the stage's `trainable`."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class TokenReductionConfig(Strict):
    """CLIPA-style: fewer patch tokens through the vision encoder during this stage."""

    mode: Literal["random", "grid", "block", "resize"]
    keep: float = Field(0.5, gt=0, le=1, description="masking modes: fraction of patches kept")
    image_size: int | None = Field(None, ge=1, description="resize mode: the smaller input size")

    @model_validator(mode="after")
    def _size_for_resize(self):
        if (self.mode == "resize") != (self.image_size is not None):
            raise ValueError("`image_size` goes with mode `resize` (and only with it)")
        return self


class ProbeEvalConfig(Strict):
    """Evaluation by generation during a stage: the attribute probes of a held-out split asked
    every `eval_every` steps and at the end, each rank asking about its share of the clips."""

    data: str = Field(
        description="a held-out split whose samples carry probes (`valleyforge shards synth` writes them)"
    )
    max_new_tokens: int = Field(8, ge=1)
    max_clips: int | None = Field(None, ge=1, description="the first this many probed clips; unset: all")


# The stage field `register` shadows ABCMeta.register on the class, which no config uses.
warnings.filterwarnings("ignore", message='Field name "register" in "StageConfig" shadows', category=UserWarning)


CHECKPOINT_URI = (
    r"^models:/m-[0-9a-f]+$"  # a recorded checkpoint: an MLflow logged model (launch/checkpoint_registry.py)
)


def is_checkpoint_uri(source: str) -> bool:
    return re.match(CHECKPOINT_URI, source) is not None


CONTRASTIVE_MODULES = ("vision", "temporal", "text")


class StageConfig(Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    objective: Literal["language_modeling", "contrastive"] = Field(
        "language_modeling",
        description="contrastive: video-text InfoNCE over the global batch (trainer/contrastive.py)",
    )
    train_data: str | list[DataSource] = Field(
        description="a split directory, shard URLs (globs, {000..099} ranges, s3://, gs://, https://, pipe:), "
        "or a weighted mixture: a list of {url, weight}"
    )
    eval_data: str | None = None
    template: TemplateName = "vicuna_v1"
    trainable: list[Module] = Field(min_length=1)
    lora: LoraConfig | None = None
    token_reduction: TokenReductionConfig | None = None
    init_from: str = Field(
        "auto",
        description="auto | config | models:/NAME@ALIAS | models:/NAME/VERSION | models:/m-... (a recorded "
        "checkpoint) | an export folder",
    )
    steps: int = Field(gt=0, description="optimizer steps")
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    eval_every: int = Field(0, ge=0, description="steps between evaluations; 0: at the end only")
    eval_batches: int = Field(4, ge=1)
    probe_eval: ProbeEvalConfig | None = None
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints (and one at the end); 0: none")
    resume: bool = Field(True, description="start from the stage's newest checkpoint when there is one")
    resume_from: str | None = Field(
        None,
        pattern=CHECKPOINT_URI,
        description="a recorded checkpoint (models:/m-..., `valleyforge checkpoints` lists them) this stage "
        "continues from when it has no checkpoint of its own; same ranks and data",
    )
    register: Literal["last", "best"] = Field(
        "last",
        description="the export registered at the end: the last step's weights, or the checkpoint with "
        "the lowest eval/loss (kept in storage until then)",
    )

    @model_validator(mode="after")
    def _objective_consistent(self):
        if self.objective == "contrastive":
            other = set(self.trainable) - set(CONTRASTIVE_MODULES)
            if other:
                raise ValueError(
                    f"a contrastive stage trains only {list(CONTRASTIVE_MODULES)}; it does not run {sorted(other)}"
                )
            if self.probe_eval is not None:
                raise ValueError("probe_eval asks questions by generation: it goes with a language-modelling stage")
        elif {"temporal", "text"} & set(self.trainable):
            raise ValueError(
                "the temporal module and the text tower train only in a stage with "
                "`objective: contrastive` (a language-modelling stage does not run them)"
            )
        return self

    @model_validator(mode="after")
    def _lora_consistent(self):
        if ("lora" in self.trainable) != (self.lora is not None):
            raise ValueError("`lora` in trainable and a `lora` section go together")
        if "lora" in self.trainable and "llm" in self.trainable:
            raise ValueError("train either the whole `llm` or its `lora` adapters, not both")
        untrained = set(self.optimizer.module_lr) - set(self.trainable)
        if untrained:
            raise ValueError(f"optimizer.module_lr names modules this stage does not train: {sorted(untrained)}")
        if self.register == "best" and not (self.eval_data and self.checkpoint_every):
            raise ValueError(
                "`register: best` picks among checkpoints by eval/loss: it needs `eval_data` and `checkpoint_every`"
            )
        return self
