"""The export's LLaVA-NeXT-Video twin: transformers' LlavaNextVideoForConditionalGeneration loads it
and gives the same next-token logits as our model, for a video and for an image (a one-frame
video); models it cannot be say why, in the export log and spec, and get no folder."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM, LlavaNextVideoForConditionalGeneration

from data_shards.conversation import VISUAL_TOKEN
from data_shards.tokenizer import word_tokenizer_from_file
from data_shards.write.synth import vocabulary
from trainer.blueprint import blueprint_from_config, build_model, fill_weights
from trainer.config import ModelConfig
from trainer.export import export_model
from trainer.llava_next_video import FOLDER
from trainer.storage import Storage

pytestmark = pytest.mark.unit
FRAMES = 4


def vocab_file(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(vocabulary()))
    return tmp_path / "vocab.txt"


def exported(tmp_path, llm: dict | None = None, dtype=torch.float32, **model_options):
    cfg = ModelConfig(
        vision={"tiny": {}},
        llm=llm or {"tiny": {}},
        word_vocab=str(vocab_file(tmp_path)),
        num_frames=FRAMES,
        **model_options,
    )
    blueprint = blueprint_from_config(cfg)
    model = build_model(blueprint, "sdpa")
    fill_weights(model, blueprint, 0.05, seed=0)
    model.to(dtype)
    export_model(model, blueprint.tokenizer, Storage(str(tmp_path / "export")), "vicuna_v1")
    return model.eval(), blueprint.tokenizer, tmp_path / "export"


def prompt_ids(tokenizer, visual_tokens: int) -> torch.Tensor:
    before = tokenizer("USER :", add_special_tokens=False)["input_ids"]
    after = tokenizer("what colour is the shape ? ASSISTANT :", add_special_tokens=False)["input_ids"]
    visual = tokenizer.convert_tokens_to_ids(VISUAL_TOKEN)
    return torch.tensor([[tokenizer.bos_token_id, *before, *[visual] * visual_tokens, *after]])


def pixels(model, frames_BTCHW: torch.Tensor) -> torch.Tensor:
    """What LLaVA-NeXT-Video's processor makes of frames already at the tower's size: rescaled and
    normalised with the export's mean and std."""
    mean = torch.tensor(model.arch.image_mean).view(1, 1, 3, 1, 1)
    std = torch.tensor(model.arch.image_std).view(1, 1, 3, 1, 1)
    return (frames_BTCHW.float() / 255 - mean) / std


@pytest.mark.parametrize("reducer", ["spatial_pool2", "none"])
def test_the_twin_gives_our_logits_for_a_video_and_an_image(tmp_path, reducer):
    model, tokenizer, export = exported(tmp_path, reducer=reducer, projector="mlp2x_gelu")
    spec = json.loads((export / "valleyforge_model.json").read_text())
    assert spec["llava_next_video"] == {"folder": FOLDER}
    twin = LlavaNextVideoForConditionalGeneration.from_pretrained(export / FOLDER).eval()
    visual = model.visual_spec()
    torch.manual_seed(1)
    clip = torch.randint(0, 256, (1, FRAMES, 3, visual.image_size, visual.image_size), dtype=torch.uint8)
    for frames, tokens in ((clip, visual.tokens_per_video), (clip[:, :1], visual.tokens_per_image)):
        ids = prompt_ids(tokenizer, tokens)
        mask = torch.ones_like(ids)
        ours_frames = torch.zeros_like(clip)  # our reader's layout: every sample has num_frames slots
        ours_frames[:, : frames.shape[1]] = frames
        frame_mask = torch.zeros(1, FRAMES, dtype=torch.bool)
        frame_mask[:, : frames.shape[1]] = True
        with torch.no_grad():
            ours = model(ids, mask, ours_frames, frame_mask).logits
            theirs = twin(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels(model, frames)).logits
        assert ours.shape == theirs.shape
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_the_processor_prepares_what_our_model_is_given(tmp_path):
    pytest.importorskip("torchvision", reason="transformers' video processors need torchvision")
    from transformers import AutoProcessor

    model, tokenizer, export = exported(tmp_path, reducer="spatial_pool2", projector="mlp2x_gelu")
    processor = AutoProcessor.from_pretrained(export / FOLDER)
    visual = model.visual_spec()
    clip = torch.randint(0, 256, (1, FRAMES, 3, visual.image_size, visual.image_size), dtype=torch.uint8)
    inputs = processor(
        text=f"<s> USER : {VISUAL_TOKEN} what colour is the shape ? ASSISTANT :",
        videos=[clip[0].permute(0, 2, 3, 1).numpy()],
        return_tensors="pt",
    )
    assert inputs["input_ids"].tolist() == prompt_ids(tokenizer, visual.tokens_per_video).tolist()
    torch.testing.assert_close(inputs["pixel_values_videos"], pixels(model, clip), atol=1e-5, rtol=1e-5)


def test_a_model_that_is_no_llava_next_video_says_why(tmp_path, capsys):
    _, _, export = exported(tmp_path, reducer="valley", projector="mlp2x_gelu")
    reason = json.loads((export / "valleyforge_model.json").read_text())["llava_next_video"]["unavailable"]
    assert reason.startswith("reducer 'valley': LLaVA-NeXT-Video pools each frame 2x2 or not at all")
    assert not (export / FOLDER).exists()
    assert f"export: no LLaVA-NeXT-Video twin: {reason}\n" in capsys.readouterr().out


def test_a_twin_of_a_model_with_tied_embeddings_keeps_its_dtype_and_its_tied_head(tmp_path):
    """A bf16 model whose LLM ties its output head to its embeddings: the twin is written (its
    head tied again, not left unset) with every tensor in bf16, and loads with our head."""
    tokenizer = word_tokenizer_from_file(vocab_file(tmp_path))
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            tie_word_embeddings=True,
        )
    ).save_pretrained(tmp_path / "llm")
    model, _, export = exported(
        tmp_path, llm={"path": str(tmp_path / "llm")}, dtype=torch.bfloat16, reducer="none", projector="mlp2x_gelu"
    )
    with safe_open(export / FOLDER / "model.safetensors", "pt") as twin:
        dtypes = {key: twin.get_slice(key).get_dtype() for key in twin.keys()}
    assert any(key.endswith("image_newline") for key in dtypes) and not any(
        key.endswith("lm_head.weight") for key in dtypes
    )
    assert set(dtypes.values()) == {"BF16"}, {k: v for k, v in dtypes.items() if v != "BF16"}
    twin = LlavaNextVideoForConditionalGeneration.from_pretrained(export / FOLDER)
    assert torch.equal(twin.lm_head.weight, model.llm.get_output_embeddings().weight)
