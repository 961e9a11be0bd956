"""The label mask is exact: trained tokens are each assistant answer plus its end-of-turn token(s).

Checked for three template styles written here (ChatML-like, Gemma-like with the system prompt merged
into the first user turn, Llama-3-like) and for the real templates under ../shared/tokenizers.
"""

import copy

import pytest
import real_tokenizers

from tunelab.constants import IGNORE_INDEX
from tunelab.data.conversation import Conversation, Message
from tunelab.data.encode import Encoder, end_of_turn_tokens
from tunelab.errors import TunelabError

pytestmark = pytest.mark.fast  # a pure unit: `make test-fast` runs it


EOT = {
    "chatml": "<|im_end|>",
    "gemma": "<end_of_turn>",
    "llama3": "<|eot_id|>",
    "alpaca": "<|endoftext|>",
    "dolly": "<|endoftext|>",
}


def conversation(system=True):
    msgs = [Message("system", "Answer briefly.")] if system else []
    msgs += [
        Message("user", "Name a colour."),
        Message("assistant", "Ocean blue, 海蓝色."),
        Message("user", "And a number?"),
        Message("assistant", "Seven."),
    ]
    return Conversation(msgs, source="test[record 0]")


def trained_spans(tok, sample):
    spans, run = [], []
    for tid, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE_INDEX:
            assert label == tid, "labels are unshifted copies of the ids"
            run.append(tid)
        elif run:
            spans.append(tok.decode(run))
            run = []
    if run:
        spans.append(tok.decode(run))
    return spans


@pytest.fixture()
def styled(tokenizer):
    """The test tokenizer with a chosen built-in template and that template's special tokens."""
    return lambda name: real_tokenizers.builtin_styled(tokenizer, name)


@pytest.mark.parametrize("style", ["chatml", "gemma", "llama3", "alpaca", "dolly"])
@pytest.mark.parametrize("system", [True, False])
def test_trained_spans_are_answers_plus_end_of_turn(styled, style, system):
    tok = styled(style)
    sample = Encoder(tok).encode(conversation(system))
    assert trained_spans(tok, sample) == [f"Ocean blue, 海蓝色.{EOT[style]}", f"Seven.{EOT[style]}"]


def test_gemma_style_merges_system_into_first_user_turn(styled):
    tok = styled("gemma")
    text = tok.decode(Encoder(tok).encode(conversation()).input_ids)
    assert "<start_of_turn>user\nAnswer briefly.\n\nName a colour.<end_of_turn>" in text
    assert "system" not in text


def test_train_on_last_marks_only_the_last_answer(styled):
    tok = styled("chatml")
    sample = Encoder(tok, train_on="last").encode(conversation())
    assert trained_spans(tok, sample) == ["Seven.<|im_end|>"]


def test_train_on_all_trains_every_token(styled):
    tok = styled("chatml")
    sample = Encoder(tok, train_on="all").encode(conversation())
    assert sample.labels == sample.input_ids


def test_text_format_trains_every_token_and_ends_with_eos(tokenizer):
    sample = Encoder(tokenizer).encode(Conversation(text="plain pretraining text", source="t"))
    assert sample.labels == sample.input_ids
    assert sample.input_ids[-1] == tokenizer.eos_token_id


def test_prompt_tokens_equal_what_inference_renders(styled):
    """Training's prompt tokens for the first answer are exactly the tokens chat will feed the model."""
    tok = styled("chatml")
    conv = conversation()
    sample = Encoder(tok).encode(conv)
    first_trained = next(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX)
    prompt = tok.apply_chat_template(conv.template_messages()[:2], tokenize=False, add_generation_prompt=True)
    assert sample.input_ids[:first_trained] == tok(prompt, add_special_tokens=False)["input_ids"]


def test_answer_glued_to_prompt_text_is_split_at_the_boundary(tokenizer):
    """A template whose prompt ends in a space would merge ' Seven' into one token; segments keep it exact."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }} A: "
        "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    )
    conv = Conversation([Message("user", "Number?"), Message("assistant", "Seven.")], source="t")
    assert trained_spans(tok, Encoder(tok).encode(conv)) == ["Seven.<|endoftext|>"]


# the system prompt moves to the last user turn, as some real templates (Mistral v3) do
MOVING_SYSTEM = (
    "{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{% for m in messages if m['role'] != 'system' %}{% if m['role'] == 'user' %}"
    "{% if loop.last or loop.revindex == 2 %}{{ sys }} {% endif %}U: {{ m['content'] }}\n"
    "{% else %}A: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)


def test_a_template_that_is_not_prefix_stable_trains_each_turn_as_inference_renders_it(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = MOVING_SYSTEM
    conv = conversation()
    whole, first = Encoder(tok).samples(conv)
    assert (
        whole.input_ids
        == tok(tok.apply_chat_template(conv.template_messages(), tokenize=False), add_special_tokens=False)["input_ids"]
    )
    assert trained_spans(tok, whole) == ["Seven.<|endoftext|>"]
    cut = tok.apply_chat_template(conv.template_messages()[:3], tokenize=False)
    assert first.own_turn and first.source == "test[record 0] turn 2"
    assert first.input_ids == tok(cut, add_special_tokens=False)["input_ids"]
    assert trained_spans(tok, first) == ["Ocean blue, 海蓝色.<|endoftext|>"]


def test_expand_turns_off_keeps_the_refusal_naming_the_sample(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = MOVING_SYSTEM
    with pytest.raises(TunelabError, match=r"test\[record 0\].*not a prefix"):
        Encoder(tok, expand_turns=False).encode(conversation())


def test_truncation_keeps_the_start_and_flags_it(styled):
    tok = styled("chatml")
    full = Encoder(tok).encode(conversation())
    cut = Encoder(tok, cutoff_len=len(full.input_ids) - 3).encode(conversation())
    assert cut.truncated and cut.input_ids == full.input_ids[: len(full.input_ids) - 3]
    tiny = Encoder(tok, cutoff_len=5).encode(conversation())
    assert tiny.n_trained == 0


def test_end_of_turn_tokens_are_found_by_probing(styled):
    assert end_of_turn_tokens(styled("gemma"))[0] == "<end_of_turn>"
    assert end_of_turn_tokens(styled("llama3"))[0] == "<|eot_id|>"
    assert end_of_turn_tokens(styled("alpaca")) == ["<|endoftext|>"]


# Qwen3 writes a think block into answers; its rules are in test_reasoning.py.
REAL_EOT = {
    "qwen2.5-instruct": "<|im_end|>",
    "llama-3.2-3b-instruct": "<|eot_id|>",
    "phi-3-mini-4k-instruct": "<|end|>",
    "gemma-3-4b-it": "<end_of_turn>",
    "phi-4": "<|im_end|>",
    "phi-4-mini-instruct": "<|end|>",
    "mistral-v1": "</s>",
}


@pytest.mark.parametrize("family", sorted(REAL_EOT))
def test_real_templates_mask_exactly(family, tmp_path):
    if not real_tokenizers.available(family):
        pytest.skip(f"../shared/tokenizers/{family} not present")
    tok = real_tokenizers.load(family, tmp_path)
    eot = REAL_EOT[family]
    for conv in (conversation(True), conversation(False)):
        spans = trained_spans(tok, Encoder(tok).encode(conv))
        assert len(spans) == 2
        # Mistral writes '[/INST] ' + answer after a prompt ending in '[/INST]': the space is the answer's
        lead = " " if family == "mistral-v1" else ""
        assert spans[0] == f"{lead}Ocean blue, 海蓝色.{eot}"
        # a template may close the whole conversation with eos right after the last end-of-turn
        assert spans[1] in (f"{lead}Seven.{eot}", f"{lead}Seven.{eot}{tok.eos_token}")


def test_mistral_v3_trains_the_first_turn_apart_where_the_system_prompt_moved(tmp_path):
    if not real_tokenizers.available("mistral-v3"):
        pytest.skip("../shared/tokenizers/mistral not present")
    tok = real_tokenizers.load("mistral-v3", tmp_path)
    conv = conversation(True)
    whole, first = Encoder(tok).samples(conv)
    # the system prompt sits in the last user turn of each rendering, so turn 2 cannot train in the whole
    assert trained_spans(tok, whole) == [" Seven.</s>"]
    assert (
        first.input_ids
        == tok(tok.apply_chat_template(conv.template_messages()[:3], tokenize=False), add_special_tokens=False)[
            "input_ids"
        ]
    )
    assert trained_spans(tok, first) == [" Ocean blue, 海蓝色.</s>"]
    with pytest.raises(TunelabError, match="not a prefix"):
        Encoder(tok, expand_turns=False).encode(conv)


def test_deepseek_r1_trains_both_answers_in_one_sample_after_its_assistant_tag(tmp_path):
    """Its generation prompt opens `<think>`, which its own answers never hold: the answer starts where the two part."""
    if not real_tokenizers.available("deepseek-r1-distill-qwen"):
        pytest.skip("../shared/tokenizers/deepseek-r1-distill-qwen not present")
    tok = real_tokenizers.load("deepseek-r1-distill-qwen", tmp_path)
    samples = Encoder(tok).samples(conversation(True))
    assert len(samples) == 1
    assert trained_spans(tok, samples[0]) == ["Ocean blue, 海蓝色.<｜end▁of▁sentence｜>", "Seven.<｜end▁of▁sentence｜>"]


def mixed_conversations():
    convs = [conversation(True), conversation(False), Conversation(text="plain pretraining text", source="t")]
    convs += [
        Conversation(
            [Message("user", f"Question {i}?" * (i % 5 + 1)), Message("assistant", f"Answer {i}." * i)],
            source=f"gen[record {i}]",
        )
        for i in range(1, 30)
    ]
    return convs


@pytest.mark.parametrize("train_on", ["assistant", "last", "all"])
def test_a_batch_encodes_exactly_as_one_conversation_at_a_time(tokenizer, train_on):
    encoder = Encoder(tokenizer, train_on=train_on, cutoff_len=40)
    convs = mixed_conversations()
    batch = encoder.encode_many(convs)
    for conv, got in zip(convs, batch):
        alone = encoder.encode(conv)
        assert (got.input_ids, got.labels, got.truncated, got.source) == (
            alone.input_ids,
            alone.labels,
            alone.truncated,
            alone.source,
        )
    assert any(s.truncated for s in batch) and any(not s.truncated for s in batch)


def test_a_boundary_inside_a_token_goes_to_the_side_the_token_starts_on(tokenizer):
    """Token k is trained when it starts inside a span; plain text running into a span goes with it; markup never."""
    encoder = Encoder(tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids, offsets = [5, 6, 7], [(0, 2), (2, 6), (6, 8)]
    assert encoder._labels(ids, offsets, [(2, 6)]) == [IGNORE_INDEX, 6, IGNORE_INDEX]
    assert encoder._labels(ids, offsets, [(2, 8)]) == [IGNORE_INDEX, 6, 7]
    assert encoder._labels(ids, offsets, [(3, 8)]) == [IGNORE_INDEX, 6, 7]  # plain text running into the answer
    assert encoder._labels(ids, offsets, [(0, 4)]) == [5, 6, IGNORE_INDEX]  # starts inside: trained to its end
    assert encoder._labels([5, im_end, 7], offsets, [(3, 8)]) == [IGNORE_INDEX, IGNORE_INDEX, 7]  # markup never
    assert encoder._labels([5, 9, 9, 6], [(0, 2), (2, 3), (2, 3), (3, 6)], [(2, 6)]) == [IGNORE_INDEX, 9, 9, 6]


def test_a_dataset_encoded_in_chunks_equals_one_batch(tokenizer):
    encoder, convs = Encoder(tokenizer, cutoff_len=40), mixed_conversations()
    whole = [(s.input_ids, s.labels, s.truncated) for s in encoder.encode_many(convs)]
    chunked = [
        (s.input_ids, s.labels, s.truncated)
        for k in range(0, len(convs), 4)
        for s in encoder.encode_many(convs[k : k + 4])
    ]
    assert chunked == whole and len(whole) == len(convs)


def test_a_tokenizer_without_offsets_still_encodes_and_serves_the_same_prompt(tokenizer):
    """Slow (pure-Python) tokenizers give no offsets: the pieces between answer edges are tokenized apart."""
    encoder = Encoder(tokenizer)
    encoder._backend = None  # what a tokenizer without a Rust backend looks like to the encoder
    conv = conversation()
    sample = encoder.encode(conv)
    assert trained_spans(tokenizer, sample) == ["Ocean blue, 海蓝色.<|im_end|>", "Seven.<|im_end|>"]
    prompt = encoder.prompt_ids(Conversation(conv.messages[:2], source="t"))
    assert prompt and sample.input_ids[: len(prompt)] == prompt


def test_the_templates_own_system_prompt_is_found_where_it_writes_one(tmp_path):
    from tunelab.data.templates import CHATML, default_system

    qwen = real_tokenizers.load_or_skip("qwen2.5-instruct", tmp_path)
    assert default_system(qwen) == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert default_system(real_tokenizers.load_or_skip("llama-3.2-3b-instruct", tmp_path)) is None  # dates only
    qwen.chat_template = CHATML
    assert default_system(qwen) is None
