"""Training ids are inference ids: checked against transformers' own tokenization of `apply_chat_template`.

The reference is the tokenizer run on the whole rendered text, the way every inference stack feeds a
chat model. Every real template under ../shared/tokenizers that renders turn by turn is tried on
multi-turn chats with and without a system prompt, answers that start or end with whitespace, and
Chinese text. Message text holding control-token text (`<|im_end|>` typed by a user) is the one
place tunelab departs from that reference, on purpose: those characters stay text.
"""

from __future__ import annotations

import pytest
import real_tokenizers

from tunelab.constants import IGNORE_INDEX
from tunelab.data.conversation import Conversation, Message
from tunelab.data.encode import Encoder
from tunelab.data.templates import BUILTIN

pytestmark = pytest.mark.fast  # a pure unit: `make test-fast` runs it


# Templates that move text between turns train such turns in samples of their own (see test_turns.py); every
# sample is still the tokenizer's own ids of a rendering.
TURN_BY_TURN = list(real_tokenizers.ALL)

CHATS = [
    [
        ("system", "You are terse."),
        ("user", "Name a colour."),
        ("assistant", "Ocean blue."),
        ("user", "And a number?"),
        ("assistant", "Seven."),
    ],
    [("user", "Name a colour."), ("assistant", "Ocean blue."), ("user", "And a number?"), ("assistant", "Seven.")],
    [
        ("user", "你好，请介绍一下你自己。"),
        ("assistant", "我是一个助手，乐于帮忙。"),
        ("user", "谢谢"),
        ("assistant", "不客气！"),
    ],
    [
        ("system", "系统提示：简短回答。"),
        ("user", "Leading space?"),
        ("assistant", "  starts with two spaces"),
        ("user", "Trailing?"),
        ("assistant", "ends with a space and a newline \n"),
    ],
    [("user", " padded question "), ("assistant", "\nstarts with a newline, then text. ")],
]


def conversation(chat) -> Conversation:
    return Conversation([Message(role, text) for role, text in chat], source="chat")


def reference_ids(tok, messages, generation_prompt=False) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tok(text, add_special_tokens=False)["input_ids"]


def tokenizer_for(family, tmp_path, test_tokenizer):
    if family in BUILTIN:
        return real_tokenizers.builtin_styled(test_tokenizer, family)
    if not real_tokenizers.available(family):
        pytest.skip(f"../shared/tokenizers/{family} not present")
    return real_tokenizers.load(family, tmp_path)


@pytest.mark.parametrize("family", TURN_BY_TURN + sorted(BUILTIN))
def test_training_ids_are_the_tokenizers_own_ids_of_the_rendered_chat(family, tmp_path, tokenizer):
    tok = tokenizer_for(family, tmp_path, tokenizer)
    encoder = Encoder(tok)
    for chat in CHATS:
        conv = conversation(chat)
        decoded, ends = "", 0
        for sample in encoder.samples(conv):
            # the whole conversation, or (a turn trained apart) the conversation cut after that turn
            cut = int(sample.source.rsplit(" turn ", 1)[1]) + 1 if sample.own_turn else len(conv.messages)
            assert sample.input_ids == reference_ids(tok, conv.template_messages()[:cut]), chat
            trained = [t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX]
            ends += sum(t in encoder.eot_ids for t in trained)
            decoded += tok.decode(trained, skip_special_tokens=True)
        assert ends >= len(conv.assistant_indices), "every answer ends its turn"
        # each answer's text (as the template renders it, maybe trimmed) is inside the trained tokens
        for i in conv.assistant_indices:
            assert conv.messages[i].content.strip() in decoded, (family, conv.messages[i].content)


@pytest.mark.parametrize("family", TURN_BY_TURN + sorted(BUILTIN))
def test_the_served_prompt_is_the_tokenizers_own_and_a_prefix_of_the_trained_ids(family, tmp_path, tokenizer):
    """For answers that start with text (not whitespace the prompt's last token could absorb).

    The prompt leads into the sample that trains its answer: the whole conversation, or the turn's own.
    Not for the DeepSeek-R1 distills: their generation prompt opens a think block (`<think>\n`) that
    their own rendering of an answer never holds, so no rendering of the template starts with it.
    """
    tok = tokenizer_for(family, tmp_path, tokenizer)
    encoder = Encoder(tok)
    for chat in CHATS[:3]:
        conv = conversation(chat)
        samples = encoder.samples(conv)
        for i in conv.assistant_indices:
            prompt = encoder.prompt_ids(Conversation(conv.messages[:i], source="chat"))
            assert prompt == reference_ids(tok, conv.template_messages()[:i], generation_prompt=True)
            if family == "deepseek-r1-distill-qwen":
                continue
            sample = next((s for s in samples[1:] if s.source.endswith(f" turn {i}")), samples[0])
            assert sample.input_ids[: len(prompt)] == prompt
            assert sample.labels[len(prompt) - 1] == IGNORE_INDEX, "the prompt's last token is not trained"


def test_phi3_trains_no_token_that_inference_never_shows(tmp_path):
    """Phi-3's <|end|> and <|assistant|> swallow the newline after them: no stray '▁' or '\\n' tokens appear."""
    if not real_tokenizers.available("phi-3-mini-4k-instruct"):
        pytest.skip("../shared/tokenizers/phi-3-mini-4k-instruct not present")
    tok = real_tokenizers.load("phi-3-mini-4k-instruct", tmp_path)
    conv = conversation(CHATS[0])
    sample = Encoder(tok).encode(conv)
    pieces = tok.convert_ids_to_tokens(sample.input_ids)
    for k, piece in enumerate(pieces[:-1]):
        if piece in ("<|end|>", "<|assistant|>"):
            assert pieces[k + 1] not in ("▁", "<0x0A>"), pieces[k : k + 3]
    trained = [p for p, label in zip(pieces, sample.labels) if label != IGNORE_INDEX]
    assert trained[:2] == ["O", "cean"] and "▁" not in trained, trained


LITERALS = {
    "qwen2.5-instruct": "<|im_end|>",
    "llama-3.2-3b-instruct": "<|eot_id|>",
    "gemma-3-4b-it": "<end_of_turn>",
    "phi-4": "<|im_end|>",
    "phi-3-mini-4k-instruct": "<|end|>",
    "chatml": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "gemma": "<end_of_turn>",
}


@pytest.mark.parametrize("family", sorted(LITERALS))
def test_control_token_text_in_messages_is_plain_text(family, tmp_path, tokenizer):
    tok = tokenizer_for(family, tmp_path, tokenizer)
    encoder = Encoder(tok)
    eot = tok.convert_tokens_to_ids(LITERALS[family])
    literal = LITERALS[family]
    plain = conversation(
        [
            ("system", f"Never print {literal} yourself."),
            ("user", f"What does {literal} mean in a chat template?"),
            ("assistant", f"{literal} closes a turn; write it as {literal}\n<|im_start|>user too."),
            ("user", "Thanks."),
            ("assistant", "You're welcome."),
        ]
    )
    clean = conversation(
        [(m.role, m.content.replace(literal, "X").replace("<|im_start|>", "Y")) for m in plain.messages]
    )
    sample, reference = encoder.encode(plain), encoder.encode(clean)
    assert sample.literal_text and not reference.literal_text
    assert sample.input_ids.count(eot) == reference.input_ids.count(eot), "control ids come from the template only"
    naive = reference_ids(tok, plain.template_messages())  # the tokenizer alone reads the literal as control
    assert naive.count(eot) > sample.input_ids.count(eot)
    ours, theirs = (tok.decode(ids, skip_special_tokens=False) for ids in (sample.input_ids, naive))
    # the same characters (Phi-3's control tokens also swallow the whitespace after them, hence the split)
    assert "".join(ours.split()) == "".join(theirs.split()), "the same characters, as text"
    trained = tok.decode(
        [t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX], skip_special_tokens=False
    )
    assert plain.messages[-3].content.strip() in trained, "the literal text is trained like any answer text"
    prompt = encoder.prompt_ids(Conversation(plain.messages[:2], source="chat"))
    assert sample.input_ids[: len(prompt)] == prompt, "inference renders the same tokens as training"
    assert prompt.count(eot) == reference.input_ids[: len(prompt)].count(eot)


def test_a_message_of_only_control_token_text_is_trained_as_its_characters(tokenizer):
    encoder = Encoder(tokenizer)
    conv = conversation([("user", "<|im_end|>"), ("assistant", "<|im_end|>")])
    sample = encoder.encode(conv)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sample.input_ids.count(im_end) == 2  # the template's two, not the messages'
    trained = [t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "<|im_end|><|im_end|>" and trained[-1] == im_end and trained.count(im_end) == 1
