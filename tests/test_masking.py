"""Labels sit on assistant tokens only, for every template, with the placeholder expanded."""

import pytest

from data_shards.conversation import (
    IGNORE_INDEX,
    TEMPLATE_SPECIAL_TOKENS,
    TEMPLATES,
    VISUAL_TOKEN,
    SampleError,
    encode_conversation,
    get_template,
    template_texts,
)
from data_shards.tokenizer import build_word_tokenizer
from data_shards.write.synth import vocabulary

pytestmark = pytest.mark.unit
VISUAL = {"video": 5, "image": 3}
CONVERSATION = [
    {"from": "human", "value": "<video>\nwhat colour is the shape ?"},
    {"from": "gpt", "value": "it is red ."},
    {"from": "human", "value": "which way does it move ?"},
    {"from": "gpt", "value": "it moves left ."},
]


def byte_bpe_tokenizer():
    """A real byte-level BPE (GPT/Llama-3 style) trained here on the templates and the task's words:
    merges across segment boundaries are where label masks usually go wrong."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", VISUAL_TOKEN, *TEMPLATE_SPECIAL_TOKENS]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = template_texts() + [turn["value"] for turn in CONVERSATION] + [" ".join(vocabulary())] * 3
    core.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=[VISUAL_TOKEN, *TEMPLATE_SPECIAL_TOKENS],
    )


@pytest.fixture(scope="module", params=["word", "byte-bpe"])
def tokenizer(request):
    return build_word_tokenizer(vocabulary()) if request.param == "word" else byte_bpe_tokenizer()


def visual_id(tokenizer):
    return tokenizer.convert_tokens_to_ids(VISUAL_TOKEN)


def labelled_spans(input_ids, labels):
    """Runs of consecutive supervised positions, as lists of ids."""
    spans, current = [], []
    for token, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


@pytest.mark.parametrize("template_name", sorted(TEMPLATES))
def test_only_assistant_turns_are_labelled(tokenizer, template_name):
    conversation = (
        CONVERSATION
        if template_name != "plain"
        else [{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "a red circle moving left ."}]
    )
    ids, labels = encode_conversation(tokenizer, get_template(template_name), conversation, "video", VISUAL, 512)
    template = get_template(template_name)
    end = template.stop or tokenizer.eos_token
    answers = [turn["value"] for turn in conversation if turn["from"] == "gpt"]
    decoded = [tokenizer.decode(span) for span in labelled_spans(ids, labels)]
    squeeze = lambda text: "".join(text.split())  # noqa: E731 - tokenizers differ in spacing only
    assert [squeeze(d) for d in decoded] == [squeeze(answer + end) for answer in answers]
    # everything unlabelled decodes to the prompt side: system, user turns, role headers
    unlabelled = tokenizer.decode(
        [t for t, label in zip(ids, labels) if label == IGNORE_INDEX and t != visual_id(tokenizer)]
    )
    assert "what colour is the shape" in unlabelled or template_name == "plain"
    assert all(squeeze(answer) not in squeeze(unlabelled) for answer in answers)
    assert ids.count(visual_id(tokenizer)) == VISUAL["video"]
    assert all(label == IGNORE_INDEX for token, label in zip(ids, labels) if token == visual_id(tokenizer))
    assert ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE_INDEX


def test_text_only_and_image_samples(tokenizer):
    template = get_template("vicuna_v1")
    ids, _ = encode_conversation(
        tokenizer,
        template,
        [{"from": "human", "value": "does a circle have corners ?"}, {"from": "gpt", "value": "no ."}],
        None,
        VISUAL,
        512,
    )
    assert tokenizer.convert_tokens_to_ids(VISUAL_TOKEN) not in ids
    image = [{"from": "human", "value": "<image>\nwhat shape is it ?"}, {"from": "gpt", "value": "it is a square ."}]
    ids, _ = encode_conversation(tokenizer, template, image, "image", VISUAL, 512)
    assert ids.count(tokenizer.convert_tokens_to_ids(VISUAL_TOKEN)) == VISUAL["image"]


@pytest.mark.parametrize(
    "conversation, media, reason",
    [
        (CONVERSATION, "image", "placeholder mismatch"),
        (CONVERSATION, None, "placeholder mismatch"),
        (CONVERSATION[:1], "video", "bad turn order"),
        ([CONVERSATION[1], CONVERSATION[0]], "video", "bad turn order"),
        ([CONVERSATION[0], {"from": "gpt", "value": "  "}], "video", "empty assistant turn"),
    ],
)
def test_unusable_conversations_are_rejected_with_a_reason(tokenizer, conversation, media, reason):
    with pytest.raises(SampleError) as err:
        encode_conversation(tokenizer, get_template("vicuna_v1"), conversation, media, VISUAL, 512)
    assert err.value.reason == reason


def test_truncation_never_leaves_an_unsupervised_sample(tokenizer):
    template = get_template("vicuna_v1")
    _, labels = encode_conversation(tokenizer, template, CONVERSATION, "video", VISUAL, 512)
    first_answer = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    with pytest.raises(SampleError) as err:  # cut right before the first answer
        encode_conversation(tokenizer, template, CONVERSATION, "video", VISUAL, first_answer)
    assert err.value.reason == "no supervised tokens"
    with pytest.raises(SampleError) as err:  # cut through the visual tokens
        encode_conversation(tokenizer, template, CONVERSATION, "video", {"video": 400, "image": 3}, 100)
    assert err.value.reason == "visual tokens truncated"


def test_answers_are_scored_by_their_first_choice_word():
    from trainer.evaluation import first_choice

    choices = ["left", "right", "up", "down"]
    assert first_choice("it moves left .", choices) == "left"
    assert first_choice("Up, then down.", choices) == "up"
    assert first_choice("it is red .", choices) is None
