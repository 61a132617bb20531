"""Config errors end before anything starts, in one line that names the key."""

import subprocess
import sys
from pathlib import Path

import pytest

from launch.config import ConfigError, TrackingConfig, load_config
from launch.stage_on_ray import ray_address
from launch.tracking import resolve_tracking_uri

pytestmark = pytest.mark.unit
DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("stages.pretrain.steps=0", "stages.1.steps: Input should be greater than 0"),
        (
            "stages.instruct.optimizer.learning_rate=1",
            "stages.2.optimizer.learning_rate: unknown key (allowed here: lr, ",
        ),
        (
            "model.reducer=avgpool",
            "model.reducer: Input should be 'none', 'valley', 'spatial_pool2' or 'temporal_diff' (got 'avgpool')",
        ),
        (
            "stages.pretrain.trainable=[brain]",
            "stages.1.trainable.0: Input should be 'vision', 'projector', 'llm', 'embeddings', 'soft_prompt', "
            "'lora', 'temporal' or 'text' (got 'brain')",
        ),
        ("stages.nosuch.steps=3", "stages has no item 'nosuch'"),
        ("stages.pretrain.template=alpaca", "unknown template 'alpaca'"),
        ("model.vision.path=/some/clip", "model.vision: set exactly one of `path`"),
        ("clusterr.num_workers=4", "clusterr: unknown key (allowed here: name, output_dir"),
        (
            "cluster.num_workers=[3, 1]",
            "cluster: num_workers: [3, 1]: a count >= 1, or [min, max] with 1 <= min <= max",
        ),
        (
            "data.streams=3",
            "stages.contrastive: a global batch of 2 micro-batches from 3 data streams does not split step by "
            "step over 2 ranks: data.streams must be a multiple of 2",
        ),
    ],
)
def test_bad_override_is_one_line_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_reports_config_error_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO.read_text().replace("micro_batch_size: 8", "micro_batch_size: 8\n  frames_per_clip: 4"))
    result = run_cli("run", str(bad), "--set", "stages.pretrain.steps=2")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "data.frames_per_clip: unknown key" in lines[0] and str(bad) in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_reports_invalid_yaml_and_missing_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nstages: [\n")
    result = run_cli("run", str(broken))
    assert result.returncode == 2 and "not valid YAML" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("run", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2 and "config file not found" in result.stderr


def test_missing_data_split_fails_before_workers_start(tmp_path):
    result = run_cli(
        "run",
        str(DEMO),
        "--set",
        f"stages.contrastive.train_data={tmp_path}/nothing",
        "--set",
        f"output_dir={tmp_path}/run",
    )
    assert result.returncode == 2
    assert f"{tmp_path}/nothing: not found (expected a split directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_overrides_parse_yaml_values_and_stage_names():
    cfg = load_config(
        DEMO,
        [
            "stages.instruct.optimizer.lr=5e-4",
            "stages.2.steps=7",
            "cluster.num_workers=1",
            "stages.pretrain.trainable=[projector, llm]",
        ],
    )
    assert cfg.stages[2].optimizer.lr == 5e-4 and cfg.stages[2].steps == 7
    assert cfg.cluster.num_workers == 1 and cfg.stages[1].trainable == ["projector", "llm"]


def test_elastic_worker_range_sets_streams_and_global_batch():
    cfg = load_config(
        DEMO,
        [
            "cluster.num_workers=[2, 3]",
            *(f"stages.{name}.grad_accum=2" for name in ("contrastive", "pretrain", "instruct")),
        ],
    )
    assert cfg.cluster.worker_range == (2, 3)
    assert [cfg.micro_batches_per_step(stage) for stage in cfg.stages] == [6, 6, 6]  # grad_accum x the most ranks
    assert [cfg.data_streams(stage) for stage in cfg.stages] == [6, 6, 6]  # 2 and 3 both divide it


@pytest.mark.parametrize(
    ("workers", "loader_workers", "streams"),
    [("[8, 16]", 1, 16), ("[3, 5]", 1, 5), ("[3, 5]", 2, 10), ("[8, 16]", 6, 96)],
)
def test_any_elastic_range_is_accepted_with_the_fewest_streams_that_split_step_by_step(
    workers, loader_workers, streams
):
    """No rank count needs to divide the global batch: the default streams are a multiple of it
    (or of every count), at least one per loader worker of each of the most ranks."""
    cfg = load_config(DEMO, [f"cluster.num_workers={workers}", f"data.num_workers={loader_workers}"])
    assert {cfg.data_streams(stage) for stage in cfg.stages} == {streams}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["cluster.num_workers=[3, 5]", "data.streams=7"], "from 7 data streams does not split step by step over 3"),
        (["cluster.num_workers=[2, 4]", "data.num_workers=2", "data.streams=4"], "cannot feed 3 ranks of 2 loader"),
    ],
)
def test_a_layout_that_cannot_run_on_some_rank_count_is_refused_naming_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message) as refused:
        load_config(DEMO, overrides)
    assert "data.streams" in str(refused.value)


@pytest.mark.parametrize(
    "path", sorted(p.relative_to(DEMO.parent) for p in DEMO.parent.rglob("*.yaml") if p.name != "common.yaml"), ids=str
)
def test_every_shipped_config_validates(path):
    cfg = load_config(DEMO.parent / path)
    if cfg.evaluation:  # generation asks in the template the model was last trained with
        assert cfg.evaluation.template == cfg.stages[-1].template
    if path.parent.name == "tiny":  # a twin overrides its recipe's stages by name and adds none
        assert [s.name for s in cfg.stages] == [s.name for s in load_config(DEMO.parent / path.name).stages]


def test_demo_refuses_a_mixture_in_one_line():
    result = run_cli("demo", "--set", "stages.contrastive.train_data=[{url: a}, {url: b}]")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "stages.0.train_data" in result.stderr


def test_config_comes_before_the_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    monkeypatch.setenv("RAY_ADDRESS", "env-head:6379")
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="sqlite:///cfg.db")) == "sqlite:///cfg.db"
    assert resolve_tracking_uri(TrackingConfig()) == "sqlite:///env.db"
    assert ray_address(load_config(DEMO, ["cluster.address=cfg-head:6379"])) == "cfg-head:6379"
    assert ray_address(load_config(DEMO)) == "env-head:6379"


def test_workers_get_absolute_model_paths():
    cfg = load_config(DEMO, ["model.vision={path: ckpt/clip}", "model.llm={path: ckpt/llm}"]).with_absolute_paths()
    assert cfg.model.vision.path == str(Path("ckpt/clip").absolute())
    assert cfg.model.llm.path == str(Path("ckpt/llm").absolute())


def test_config_names_are_the_registries_keys():
    """The config modules name each registry's choices as Literals without importing it: the
    names must stay what the registries hold."""
    from typing import get_args

    from data_shards.config import TEMPLATE_NAMES, FrameSampling, Mixing
    from data_shards.conversation import TEMPLATES
    from data_shards.frames import SAMPLERS
    from data_shards.read.stream import MIXING
    from trainer.config import Module, Projector, Reducer
    from trainer.trainable import TRAINABLE_MODULES
    from trainer.visual import PROJECTORS, REDUCERS

    assert get_args(FrameSampling) == tuple(SAMPLERS)
    assert get_args(Mixing) == tuple(MIXING)
    assert TEMPLATE_NAMES == tuple(TEMPLATES)
    assert get_args(Module) == tuple(TRAINABLE_MODULES)
    assert get_args(Reducer) == tuple(REDUCERS)
    assert get_args(Projector) == tuple(PROJECTORS)


def test_loading_a_config_imports_neither_torch_nor_pyav():
    """Config modules are leaves: reading and validating every shipped config loads neither torch
    nor PyAV (nor the other heavy libraries)."""
    configs = sorted(str(p) for p in DEMO.parent.rglob("*.yaml") if p.parent.name != "tiny" or p.name != "common.yaml")
    script = (
        "import sys\nfrom launch.config import load_config\n"
        f"for path in {configs!r}:\n    load_config(path)\n"
        "print(sorted(m for m in ('torch', 'av', 'transformers', 'deepspeed', 'ray', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=DEMO.parents[1]
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
