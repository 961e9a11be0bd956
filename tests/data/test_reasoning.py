"""The reasoning rule (`reasoning: keep | last | drop`) on real thinking templates, checked against
`apply_chat_template` and against transformers' own assistant masks on TRL's `{% generation %}`-marked
Qwen3 training template."""

from __future__ import annotations

import pytest
import real_tokenizers

from tunelab.constants import IGNORE_INDEX
from tunelab.data.conversation import Conversation, Message
from tunelab.data.encode import Encoder

pytestmark = pytest.mark.fast  # a pure unit: `make test-fast` runs it


real = real_tokenizers.load_or_skip


def chat(reasoning=("Blue is calm.", "Count: seven.")) -> Conversation:
    return Conversation(
        [
            Message("system", "Be brief."),
            Message("user", "A colour?"),
            Message("assistant", "Blue.", reasoning_content=reasoning[0]),
            Message("user", "A number?"),
            Message("assistant", "Seven.", reasoning_content=reasoning[1]),
        ],
        source="r.jsonl:1",
    )


runs = real_tokenizers.trained_runs


def ids(tok, messages, **kw) -> list[int]:
    return tok(tok.apply_chat_template(messages, tokenize=False, **kw), add_special_tokens=False)["input_ids"]


def think(text):
    return f"<think>\n{text}\n</think>\n\n"


def test_keep_trains_every_turns_thinking_each_where_inference_shows_it(tmp_path):
    tok = real("qwen3", tmp_path)
    conv = chat()
    whole, first = Encoder(tok, reasoning="keep").samples(conv)
    assert runs(tok, whole) == [f"{think('Count: seven.')}Seven.<|im_end|>"]
    # Qwen3 drops history reasoning, so turn 2 trains in the conversation cut after it, as inference renders it
    assert first.source == "r.jsonl:1 turn 2" and first.own_turn
    assert first.input_ids == ids(tok, conv.template_messages()[:3])
    assert runs(tok, first) == [f"{think('Blue is calm.')}Blue.<|im_end|>"]


def test_last_trains_only_the_last_thinking_and_history_as_rendered(tmp_path):
    tok = real("qwen3", tmp_path)
    samples = Encoder(tok, reasoning="last").samples(chat())
    assert len(samples) == 1
    assert runs(tok, samples[0]) == ["Blue.<|im_end|>", f"{think('Count: seven.')}Seven.<|im_end|>"]


def test_drop_makes_the_empty_think_block_prompt_as_with_thinking_off(tmp_path):
    tok = real("qwen3", tmp_path)
    conv = chat()
    encoder = Encoder(tok, reasoning="drop")
    (sample,) = encoder.samples(conv)
    assert runs(tok, sample) == ["Blue.<|im_end|>", "Seven.<|im_end|>"]
    plain = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in conv.template_messages()]
    assert sample.input_ids == ids(tok, plain)
    prompt = encoder.prompt_ids(Conversation(conv.messages[:4]))
    assert prompt == ids(tok, plain[:4], add_generation_prompt=True, enable_thinking=False)
    assert sample.input_ids[: len(prompt)] == prompt


def test_a_turn_without_reasoning_is_taught_the_empty_think_block_its_template_writes(tmp_path):
    tok = real("qwen3", tmp_path)
    conv = Conversation([Message("user", "A colour?"), Message("assistant", "Blue.")], source="r:1")
    assert runs(tok, Encoder(tok).encode(conv)) == ["<think>\n\n</think>\n\nBlue.<|im_end|>"]


def test_inline_reasoning_for_a_template_without_a_reasoning_field(tmp_path):
    tok = real("qwen2.5-instruct", tmp_path)
    encoder = Encoder(tok, reasoning="keep")
    assert encoder.reasoning_mode == "inline"
    whole = encoder.encode(chat())
    assert runs(tok, whole) == [f"{think('Blue is calm.')}Blue.<|im_end|>", f"{think('Count: seven.')}Seven.<|im_end|>"]
    assert runs(tok, Encoder(tok, reasoning="drop").encode(chat())) == ["Blue.<|im_end|>", "Seven.<|im_end|>"]


def test_r1_reasoning_trains_in_the_form_the_model_writes_after_its_opened_think_block(tmp_path):
    """The R1 distills cut reasoning from every turn they render, but their generation prompt opens
    `<think>\n`: a kept turn trains as that prompt, then the reasoning, `</think>` and the answer."""
    tok = real("deepseek-r1-distill-qwen", tmp_path)
    encoder = Encoder(tok, reasoning="keep")
    assert encoder.reasoning_mode == "prompted"
    conv = chat()
    whole, first = encoder.samples(conv)
    messages = conv.template_messages()
    assert runs(tok, whole) == ["Count: seven.\n</think>\n\nSeven.<｜end▁of▁sentence｜>"]
    prompt = tok.apply_chat_template(messages[:4], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<｜Assistant｜><think>\n")
    assert (
        whole.input_ids
        == tok(prompt + "Count: seven.\n</think>\n\nSeven.<｜end▁of▁sentence｜>", add_special_tokens=False)["input_ids"]
    )
    assert whole.input_ids[: len(encoder.prompt_ids(Conversation(conv.messages[:4])))] == encoder.prompt_ids(
        Conversation(conv.messages[:4])
    )
    assert first.own_turn and runs(tok, first) == ["Blue is calm.\n</think>\n\nBlue.<｜end▁of▁sentence｜>"]
    assert sum(s.reasoning_lost for s in (whole, first)) == 0
    # history as the template renders it: the answer alone, as a client sends a reply back
    assert runs(tok, Encoder(tok, reasoning="last").encode(conv)) == [
        "Blue.<｜end▁of▁sentence｜>",
        "Count: seven.\n</think>\n\nSeven.<｜end▁of▁sentence｜>",
    ]
    assert runs(tok, Encoder(tok, reasoning="drop").encode(conv)) == [
        "Blue.<｜end▁of▁sentence｜>",
        "Seven.<｜end▁of▁sentence｜>",
    ]


def test_a_template_that_shows_reasoning_in_no_way_counts_the_turns_it_lost(tmp_path):
    tok = real("deepseek-r1-distill-qwen", tmp_path)
    tok.chat_template = tok.chat_template.replace("<｜Assistant｜><think>\\n", "<｜Assistant｜>")
    encoder = Encoder(tok, reasoning="keep")
    assert encoder.reasoning_mode == "none"
    assert sum(s.reasoning_lost for s in encoder.samples(chat())) == 2
    assert Encoder(tok, reasoning="last").encode(chat()).reasoning_lost == 1
    assert Encoder(tok, reasoning="drop").encode(chat()).reasoning_lost == 0


def trl_template(name: str) -> str:
    text = real_tokenizers.trl_template(name)
    if text is None:
        pytest.skip(f"trl (with its {name}) is not installed")
    return text


@pytest.mark.parametrize(
    "conv",
    [
        chat(),
        chat(reasoning=("", "")),
        Conversation(
            [
                Message("user", "Weather in Oslo?"),
                Message(
                    "assistant",
                    "",
                    reasoning_content="Use the tool.",
                    tool_calls=[
                        {
                            "type": "function",
                            "id": "c1",
                            "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
                        }
                    ],
                ),
                Message("tool", '{"temp_c": -3}', tool_call_id="c1"),
                Message("assistant", "-3 °C.", reasoning_content="Report it."),
            ],
            source="t:1",
        ),
    ],
    ids=["reasoning", "no-reasoning", "tool-call"],
)
def test_trained_text_agrees_with_transformers_assistant_masks_on_trls_qwen3_training_template(tmp_path, conv):
    """TRL's training template renders every turn as Qwen3 renders a last turn, so each turn's masked text there
    equals what tunelab trains for that turn (up to the newline after <|im_end|>, which TRL also masks in)."""
    tok = real("qwen3", tmp_path)
    ours = sorted(r for s in Encoder(tok, reasoning="keep").samples(conv) for r in runs(tok, s))
    trl = __import__("copy").deepcopy(tok)
    trl.chat_template = trl_template("qwen3_training.jinja")
    out = trl.apply_chat_template(
        conv.template_messages(), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    marked = {
        "input_ids": out["input_ids"],
        "labels": [t if m else IGNORE_INDEX for t, m in zip(out["input_ids"], out["assistant_masks"])],
    }
    theirs = sorted(r.removesuffix("\n") for r in runs(tok, type("S", (), marked)))
    assert ours == theirs and len(ours) == len(conv.assistant_indices)


def test_r1_trained_text_agrees_with_transformers_assistant_masks_on_trls_r1_training_template(tmp_path):
    """TRL's R1 training template keeps the think block in every assistant turn; each marked run, less what the
    generation prompt writes (`<｜Assistant｜><think>\n`), is what tunelab trains for that turn."""
    tok = real("deepseek-r1-distill-qwen", tmp_path)
    conv = chat()
    ours = sorted(r for s in Encoder(tok, reasoning="keep").samples(conv) for r in runs(tok, s))
    trl = __import__("copy").deepcopy(tok)
    trl.chat_template = trl_template("deepseek_r1_distill_training.jinja")
    messages = [
        {"role": m.role, "content": think(m.reasoning_content) + m.content if m.reasoning_content else m.content}
        for m in conv.messages
    ]
    out = trl.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = {
        "input_ids": out["input_ids"],
        "labels": [t if m else IGNORE_INDEX for t, m in zip(out["input_ids"], out["assistant_masks"])],
    }
    theirs = sorted(r.removeprefix("<｜Assistant｜><think>\n") for r in runs(tok, type("S", (), marked)))
    assert ours == theirs and len(ours) == 2
