"""The job config: the components' own sections composed into one document, read from YAML,
then `--set a.b=c` overrides, validated before anything starts."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from data_shards.config import ReaderConfig, Strict, TemplateName
from data_shards.errors import ValleyForgeError
from trainer.config import EngineConfig, ModelConfig, StageConfig
from trainer.layout import check_layout, default_streams


class ConfigError(ValleyForgeError):
    """A config problem, told in one line naming the file and the key."""


class ClusterConfig(Strict):
    address: str | None = Field(None, description="Ray cluster address; unset: RAY_ADDRESS, else an embedded Ray")
    storage: str | None = Field(
        None,
        description="checkpoints, exports, Ray's own files: a URL (s3://, gs://, ...) or a path every node "
        "sees; {name} is the job name; unset: output_dir",
    )
    num_workers: int | tuple[int, int] = Field(
        2,
        description="training workers (ranks, one per GPU); [min, max]: elastic, each stage runs on as many as "
        "the cluster has room for, and after a lost node goes on with fewer (at least min)",
    )
    max_failures: int = Field(
        0,
        ge=-1,
        description="times a stage's worker group is restarted after a failed or "
        "lost worker, resuming from its newest checkpoint; -1: always",
    )
    worker_start_timeout_s: float = Field(
        30,
        gt=0,
        description="how long Ray Train waits for a new worker group to start before it decides again; "
        "after a lost node its first try may still count the node's workers (its view of the "
        "cluster is up to 20 s old), so this bounds how long an elastic stage waits for them",
    )
    resize_check_s: float = Field(
        60,
        ge=0,
        description="elastic: how often Ray Train looks for room for more workers while a stage runs on fewer "
        "than the most (a lost node back, a new one joined); it then restarts the stage's group larger, "
        "from the newest checkpoint",
    )
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    num_cpus: int | None = Field(None, ge=1, description="CPUs an embedded Ray may use (default: all)")
    torch_threads: int = Field(1, ge=1, description="intra-op threads per worker process")
    peak_flops_per_device: float | None = Field(
        None, gt=0, description="peak FLOP/s of one device for MFU; unset: known GPUs from a table"
    )
    preemption_grace_s: int = Field(
        60,
        ge=1,
        description="how long a node has between a preemption notice and its end: a KubeRay worker pod's "
        "terminationGracePeriodSeconds, its preStop hook draining its Ray node with what is left as the deadline; "
        "also how long a submitted job's driver has after `jobs stop` before SIGKILL; must cover finishing a step "
        "and writing a checkpoint",
    )
    checkpoint_sources: list[str] = Field(
        [],
        description="storage folders (URLs or paths), besides this job's cluster.storage, whose recorded "
        "checkpoints a stage may start (init_from) or resume (resume_from) from",
    )

    @model_validator(mode="after")
    def _worker_range(self):
        low, high = self.worker_range
        if not 1 <= low <= high:
            raise ValueError(
                f"num_workers: {list(self.worker_range)}: a count >= 1, or [min, max] with 1 <= min <= max"
            )
        return self

    @property
    def worker_range(self) -> tuple[int, int]:
        return (self.num_workers, self.num_workers) if isinstance(self.num_workers, int) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.worker_range[1]

    @property
    def worker_counts(self) -> range:
        """Every rank count a stage may run on."""
        low, high = self.worker_range
        return range(low, high + 1)


class TrackingConfig(Strict):
    tracking_uri: str | None = Field(None, description="unset: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here")
    experiment: str = "valleyforge"
    registered_model_prefix: str = Field("valleyforge", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    max_outage_s: float = Field(
        3600,
        gt=0,
        description="how long the driver waits out an unreachable tracking "
        "server (training goes on meanwhile) before it stops the job",
    )
    promote_alias: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$",
        description="an alias (e.g. champion) moved to each stage's new version when its evaluation beats the "
        "version holding it (launch/versions.py)",
    )

    @model_validator(mode="after")
    def _alias_not_reserved(self):
        if self.promote_alias == "latest" or re.fullmatch(r"v\d+", self.promote_alias or ""):
            raise ValueError(f"promote_alias {self.promote_alias!r} is reserved by MLflow (latest, v<number>)")
        return self


class EvaluationConfig(Strict):
    data: str = Field(description="held-out split whose samples carry probes")
    template: TemplateName = "vicuna_v1"
    max_new_tokens: int = Field(8, ge=1)


class JobConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    output_dir: str = Field(
        "runs/{name}",
        description="the driver's files: resolved config, logs; a submitted job's relative one is under ~/valleyforge/",
    )
    seed: int = 0
    data: ReaderConfig = ReaderConfig()
    model: ModelConfig
    engine: EngineConfig = EngineConfig()
    stages: list[StageConfig] = Field(min_length=1)
    cluster: ClusterConfig = ClusterConfig()
    tracking: TrackingConfig = TrackingConfig()
    evaluation: EvaluationConfig | None = None

    @model_validator(mode="after")
    def _unique_stage_names(self):
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return self

    @model_validator(mode="after")
    def _contrastive_stages_have_their_towers(self):
        for stage in self.stages:
            if stage.objective != "contrastive":
                continue
            if self.model.contrastive is None:
                raise ValueError(
                    f"stages.{stage.name}: objective contrastive needs model.contrastive (the temporal "
                    f"module and the text tower)"
                )
            if self.data.packing:
                raise ValueError(
                    f"stages.{stage.name}: objective contrastive pairs each clip with its own sample's "
                    f"text; data.packing puts several samples in a row: set it false"
                )
        return self

    @model_validator(mode="after")
    def _layouts_run_on_every_rank_count(self):
        """Each stage's data streams and global batch run on every rank count the cluster allows
        (trainer/layout.py, the rule the workers apply to a resumed layout too)."""
        for stage in self.stages:
            for world in self.cluster.worker_counts:
                try:
                    check_layout(
                        stage.name,
                        self.data_streams(stage),
                        self.micro_batches_per_step(stage),
                        world,
                        self.data.num_workers,
                    )
                except ValleyForgeError as err:
                    raise ValueError(str(err)) from None
        return self

    def data_streams(self, stage: StageConfig) -> int:
        """`data.streams`, or the fewest that run the stage on every rank count the cluster allows."""
        return self.data.streams or default_streams(
            self.micro_batches_per_step(stage), self.cluster.worker_counts, self.data.num_workers
        )

    def micro_batches_per_step(self, stage: StageConfig) -> int:
        """A stage's global batch in micro-batches: its grad_accum on each of the most ranks."""
        return stage.grad_accum * self.cluster.max_workers

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name)).expanduser().absolute()

    def resolved_storage(self) -> str:
        """`cluster.storage` with the job name filled in, a path made absolute; the output
        directory when unset."""
        if self.cluster.storage is None:
            return str(self.resolved_output_dir())
        storage = self.cluster.storage.format(name=self.name)
        return storage if "://" in storage else str(Path(storage).absolute())

    def with_absolute_paths(self) -> JobConfig:
        """The same job with its local input paths made absolute: workers and submitted jobs run
        in other directories. URLs, `pipe:` sources, `models:/` URIs and the output directory
        (the driver's own) stay as they are."""

        def absolute(p: str | None) -> str | None:
            return p if p is None or "://" in p or p.startswith("pipe:") else str(Path(p).absolute())

        def absolute_sources(data):
            if isinstance(data, str):
                return absolute(data)
            return [s.model_copy(update={"url": absolute(s.url)}) for s in data]

        def absolute_init(source: str) -> str:
            return source if source in ("auto", "config") or source.startswith("models:/") else absolute(source)

        model = self.model.model_copy(
            update={
                "tokenizer": absolute(self.model.tokenizer),
                "word_vocab": absolute(self.model.word_vocab),
                "vision": self.model.vision.model_copy(update={"path": absolute(self.model.vision.path)}),
                "llm": self.model.llm.model_copy(update={"path": absolute(self.model.llm.path)}),
            }
        )

        def absolute_probes(probe):
            return probe and probe.model_copy(update={"data": absolute(probe.data)})

        stages = [
            s.model_copy(
                update={
                    "train_data": absolute_sources(s.train_data),
                    "eval_data": absolute(s.eval_data),
                    "init_from": absolute_init(s.init_from),
                    "probe_eval": absolute_probes(s.probe_eval),
                }
            )
            for s in self.stages
        ]
        evaluation = self.evaluation and self.evaluation.model_copy(update={"data": absolute(self.evaluation.data)})
        cluster = self.cluster.model_copy(
            update={"checkpoint_sources": [absolute(source) for source in self.cluster.checkpoint_sources]}
        )
        return self.model_copy(update={"model": model, "stages": stages, "evaluation": evaluation, "cluster": cluster})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def digest(self) -> str:
        """Short hash of the resolved config: tags runs and registered versions."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]


def _set_path(doc: dict, dotted: str, value, source: str) -> None:
    """Set `a.b.c` in a nested document; list items by index or, for stages, by name."""
    keys = dotted.split(".")
    node = doc
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            index = next((i for i, item in enumerate(node) if isinstance(item, dict) and item.get("name") == key), None)
            if index is None:
                if not key.isdigit() or int(key) >= len(node):
                    where = ".".join(keys[:depth]) or "<root>"
                    raise ConfigError(
                        f"{source}: {dotted}: {where} has no item {key!r} (use an index < {len(node)} or a stage name)"
                    )
                index = int(key)
            key = index
        elif not isinstance(node, dict):
            raise ConfigError(f"{source}: {dotted}: {'.'.join(keys[:depth])} is not a section")
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and (key not in node or node[key] is None):
                node[key] = {}
            node = node[key]


def _error_line(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = _section_at(JobConfig, e["loc"][:-1])
            allowed = ", ".join(parent.model_fields) if parent else "?"
            msg = f"unknown key (allowed here: {allowed})"
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e['input']!r})"
        parts.append(f"{loc}: {msg}")
    return f"{source}: " + "; ".join(parts)


def _section_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class found at `loc` inside `model` (list indices skipped)."""
    for key in loc:
        if isinstance(key, int):
            continue
        field = model.model_fields.get(key)
        if field is None:
            return None
        model = _model_in(field.annotation)
        if model is None:
            return None
    return model


def _model_in(annotation) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `X`, `X | None` or `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_model_in, getattr(annotation, "__args__", ()))), None)


def _read_yaml(path: Path, depth: int = 0) -> dict:
    """A config document; `extends: OTHER.yaml` (or a list of files, relative to this one) is
    read first, in order, and this document merged over it."""
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    if "extends" not in doc:
        return doc
    if depth >= 8:
        raise ConfigError(f"{path}: `extends` chain deeper than 8 files (a cycle?)")
    bases = doc.pop("extends")
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _merged(merged, _read_yaml(path.parent / str(base), depth + 1))
    return _merged(merged, doc)


def _merged(base, over):
    """`over` on top of `base`: mappings key by key, lists of named items (stages) by name,
    anything else replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _merged(base[k], v) if k in base else v for k, v in over.items()}}
    named = lambda items: isinstance(items, list) and all(isinstance(i, dict) and "name" in i for i in items)  # noqa: E731
    if named(base) and named(over):
        overrides = {item["name"]: item for item in over}
        result = [_merged(item, overrides.pop(item["name"])) if item["name"] in overrides else item for item in base]
        return result + list(overrides.values())
    return over


def load_config(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    """Read YAML (and what it `extends`), apply `key.path=value` overrides (values parsed as
    YAML), validate."""
    path = Path(path)
    doc = _read_yaml(path)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {override!r}: expected key.path=value")
        _set_path(doc, key.strip(), yaml.safe_load(raw) if raw.strip() else None, f"--set {key}")
    try:
        return JobConfig.model_validate(doc)
    except ValidationError as err:
        raise ConfigError(_error_line(err, str(path))) from None


def save_resolved(config: JobConfig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_yaml())
    return path
