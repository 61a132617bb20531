"""`valleyforge generate`: an exported model answers about a video or an image, from a folder or
from the registry, with the template it was trained with; bad inputs get one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from data_shards.media import encode_jpeg, encode_mp4
from data_shards.write.synth import vocabulary
from launch.tracking import register_export
from trainer.blueprint import blueprint_from_config, build_model, fill_weights, load_export
from trainer.config import ModelConfig
from trainer.export import export_model
from trainer.generate import answer, media_for, media_members
from trainer.storage import Storage

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    (root / "vocab.txt").write_text("\n".join(vocabulary()))
    cfg = ModelConfig(
        vision={"tiny": {}},
        llm={"tiny": {}},
        word_vocab=str(root / "vocab.txt"),
        num_frames=4,
        projector="mlp2x_gelu",
        soft_prompt_tokens=1,
    )
    blueprint = blueprint_from_config(cfg)
    model = build_model(blueprint, "sdpa")
    fill_weights(model, blueprint, 0.5, seed=3)  # a large init: answers differ with the input
    folder = Path(export_model(model, blueprint.tokenizer, Storage(str(root / "export")), template="chatml").url)
    frames = np.zeros((8, 32, 32, 3), dtype=np.uint8)
    frames[:, 8:20, 8:20] = (200, 40, 40)
    (root / "clip.mp4").write_bytes(encode_mp4(frames, fps=8))
    (root / "still.jpg").write_bytes(encode_jpeg(frames[0]))
    return root, folder


def run_cli(*args, env=None):
    """The CLI in a subprocess; `env` entries set to None are removed from the environment."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env
    )


def test_generate_from_folder_and_registry(export, tmp_path):
    root, folder = export
    model, tokenizer = load_export(folder)
    expected = answer(
        model,
        tokenizer,
        "chatml",
        "what colour is the shape ?",
        media_for(model, media_members(root / "clip.mp4")),
        max_new_tokens=6,
    )
    assert expected
    result = run_cli(
        "generate",
        "--model",
        str(folder),
        "--video",
        str(root / "clip.mp4"),
        "--prompt",
        "what colour is the shape ?",
        "--max-new-tokens",
        "6",
        env={"DS_ACCELERATOR": None, "HOME": str(tmp_path)},
    )  # as a user's shell runs it
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected
    assert result.stderr == ""  # library warnings go to the log, not the console

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("generate")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), "export")
    register_export(client, "gen", run.info.run_id, "export", {"stage": "instruct"})
    result = run_cli(
        "generate",
        "--model",
        "models:/gen@latest",
        "--video",
        str(root / "clip.mp4"),
        "--prompt",
        "what colour is the shape ?",
        "--max-new-tokens",
        "6",
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected

    image = run_cli("generate", "--model", str(folder), "--image", str(root / "still.jpg"), "--prompt", "what is it ?")
    text_only = run_cli("generate", "--model", str(folder), "--prompt", "what is the opposite of up ?")
    assert image.returncode == 0 and text_only.returncode == 0, image.stderr + text_only.stderr


def test_generate_errors_are_one_line(export, tmp_path):
    root, folder = export
    for args, message in (
        (["--model", str(tmp_path / "nothing")], "not an export folder or a models:/ URI"),
        (["--model", str(folder), "--video", str(tmp_path / "absent.mp4")], "absent.mp4: file not found"),
        (["--model", str(folder), "--video", str(root / "vocab.txt")], "not a video"),
    ):
        result = run_cli("generate", *args, "--prompt", "hi")
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    result = run_cli(
        "generate",
        "--model",
        "models:/missing@latest",
        "--prompt",
        "hi",
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'empty.db'}"},
    )
    assert result.returncode == 2 and "models:/missing@latest" in result.stderr and "Traceback" not in result.stderr
