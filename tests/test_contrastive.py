"""The contrastive objective's parts on their own: which text a clip is paired with, the retrieval
figures, the config rules, and an export of the towers that loads back the same. (Its loss
under ZeRO-3 on 2 ranks: tests/test_parity.py; a recipe that runs it: tests/test_recipes.py.)"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data_shards.conversation import IGNORE_INDEX
from data_shards.errors import ValleyForgeError
from launch.config import ConfigError, load_config
from trainer.blueprint import blueprint_from_config, build_model, fill_weights, load_export
from trainer.config import ModelConfig
from trainer.contrastive import caption_tokens, info_nce, retrieval_metrics
from trainer.export import export_model
from trainer.model import model_inputs
from trainer.storage import Storage

pytestmark = pytest.mark.unit
CLIPA = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "clipa.yaml"


def test_a_clip_is_paired_with_its_supervised_text_left_aligned_and_cut():
    ids = torch.tensor([[1, 9, 9, 5, 6, 2, 0], [1, 9, 7, 8, 3, 4, 2]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 3:6] = ids[0, 3:6]  # "5 6 </s>"
    labels[1, 2:7] = ids[1, 2:7]  # "7 8 3 4 </s>"
    text, mask = caption_tokens(ids, labels, max_length=4)
    assert text.tolist() == [[5, 6, 2, 0], [7, 8, 3, 4]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    labels[1] = IGNORE_INDEX
    with pytest.raises(ValleyForgeError, match="has none"):
        caption_tokens(ids, labels, max_length=4)


def test_retrieval_counts_only_strictly_better_candidates():
    video = F.normalize(torch.eye(6)[:, :4] + 0.01, dim=-1)  # rows 4 and 5 identical: a tie
    perfect = retrieval_metrics(video, video, logit_scale=10.0)
    assert perfect["eval/retrieval/video_to_text_r1"] == perfect["eval/retrieval/text_to_video_r1"] == 1.0
    shifted = retrieval_metrics(video, video.roll(1, dims=0), logit_scale=10.0)  # every caption one clip off
    assert shifted["eval/retrieval/video_to_text_r1"] < 0.5 < shifted["eval/retrieval/video_to_text_r5"]
    assert perfect["eval/loss"] < shifted["eval/loss"]


def test_info_nce_in_one_process_is_symmetric_cross_entropy():
    video, text = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    logits = 7.0 * video @ text.T
    expected = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
    torch.testing.assert_close(info_nce(video, text, torch.tensor(7.0)), expected)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.contrastive=", "objective contrastive needs model.contrastive"),
        ("stages.contrastive.trainable=[vision, llm]", "a contrastive stage trains only"),
        ("stages.contrastive.probe_eval={data: x}", "probe_eval asks questions by generation"),
        ("data.packing=true", "data.packing puts several samples in a row"),
        ("stages.instruct.trainable=[projector, text]", "only in a stage with `objective: contrastive`"),
    ],
)
def test_config_refuses_what_a_stage_cannot_run(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CLIPA, [override])


def test_the_towers_export_and_load_back_the_same(synth_data, tmp_path):
    cfg = ModelConfig(
        vision={"tiny": {}},
        llm={"tiny": {}},
        word_vocab=str(synth_data / "vocab.txt"),
        num_frames=2,
        contrastive={"embed_dim": 16, "temporal_layers": 1, "text": {"max_length": 16}},
    )
    blueprint = blueprint_from_config(cfg)
    model = build_model(blueprint, "sdpa")
    fill_weights(model, blueprint, 0.02, seed=3)
    export_model(model, blueprint.tokenizer, Storage(str(tmp_path / "export")), "plain")
    loaded, _ = load_export(tmp_path / "export")
    assert loaded.components() == ["vision", "projector", "llm", "temporal", "text"]
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids,
        "frames": torch.randint(0, 255, (1, 2, 3, 32, 32), dtype=torch.uint8),
        "frame_mask": torch.ones(1, 2, dtype=torch.bool),
    }
    with torch.no_grad():
        ours, theirs = (
            model.eval()(**model_inputs(batch), contrastive=True),
            loaded(**model_inputs(batch), contrastive=True),
        )
    torch.testing.assert_close(ours.video_embeds, theirs.video_embeds)
    torch.testing.assert_close(ours.text_embeds, theirs.text_embeds)
    assert float(theirs.logit_scale) == pytest.approx(1 / 0.07)  # the temperature starts as CLIP's
