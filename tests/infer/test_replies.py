"""A generated answer splits into reasoning, text and tool calls in each template family's own format, and
goes back into the conversation as the assistant turn training would render."""

import pytest
import real_tokenizers
import torch

from tunelab.data.conversation import Conversation
from tunelab.data.encode import Encoder
from tunelab.data.formats import message_from_dict
from tunelab.infer.chat import ChatSession, show
from tunelab.infer.replies import parse_reply

pytestmark = pytest.mark.fast  # a pure unit: `make test-fast` runs it

CALL = {"name": "get_weather", "arguments": {"city": "Oslo"}}


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',  # Qwen / Hermes
        '{"name": "get_weather", "parameters": {"city": "Oslo"}}',  # Llama 3
        '[{"name": "get_weather", "arguments": {"city": "Oslo"}, "id": "abc123xyz"}]',  # Mistral, [TOOL_CALLS] dropped
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}]',
    ],
)
def test_tool_calls_in_each_family_format_come_back_as_openai_calls(text):
    reply = parse_reply(text)
    assert [c["function"] for c in reply.tool_calls] == [CALL] and reply.content == ""
    assert all(c["type"] == "function" and c["id"] for c in reply.tool_calls)


def test_reasoning_is_split_from_the_answer_also_when_the_prompt_opened_the_block():
    assert parse_reply("<think>\nadd\n</think>\n\nFour.").reasoning == "add"
    r1 = parse_reply("add them\n</think>\n\nFour.")  # DeepSeek-R1: the generation prompt wrote '<think>\n'
    assert (r1.reasoning, r1.content) == ("add them", "Four.")
    mixed = parse_reply(
        '<think>x</think>\n\nChecking.\n<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    )
    assert (mixed.reasoning, mixed.content, mixed.tool_calls[0]["function"]["name"]) == (
        "x",
        "Checking.",
        "get_weather",
    )


def test_several_calls_in_one_reply_get_distinct_ids():
    text = "".join(
        f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{c}"}}}}\n</tool_call>\n'
        for c in ("Oslo", "Rome", "Lima")
    )
    calls = parse_reply(text).tool_calls
    assert [c["function"]["arguments"]["city"] for c in calls] == ["Oslo", "Rome", "Lima"]
    assert len({c["id"] for c in calls}) == 3


def test_text_that_only_looks_like_a_call_stays_text():
    for text in ("{not json}", '{"answer": 4}', "<tool_call>oops</tool_call>", "Plain answer."):
        reply = parse_reply(text)
        assert reply.content == text and not reply.tool_calls


def test_the_terminal_shows_reasoning_apart_and_calls_as_json():
    shown = show(parse_reply('<think>plan</think>\n\n<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'))
    assert shown.startswith("[thinking]\nplan\n[answer]") and '"tool_calls"' in shown and '"a": 1' in shown


_real = real_tokenizers.load_or_skip


def test_no_think_renders_qwen3s_thinking_off_prompt(tmp_path):
    tok = _real("qwen3", tmp_path)
    messages = [{"role": "user", "content": "Hi"}]
    off = ChatSession(torch.nn.Linear(1, 1), tok, think=False).prompt_ids(messages)
    on = ChatSession(torch.nn.Linear(1, 1), tok, think=True).prompt_ids(messages)
    want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert off == tok(want, add_special_tokens=False)["input_ids"]
    assert tok.decode(off).endswith("<think>\n\n</think>\n\n") and tok.decode(on).endswith("assistant\n")
    # a run trained with reasoning: drop chats with thinking off unless told otherwise
    drop = Encoder(tok, reasoning="drop")
    assert ChatSession(torch.nn.Linear(1, 1), tok, encoder=drop).prompt_ids(messages) == off


def test_a_reply_with_a_call_goes_back_as_the_turn_training_renders(tmp_path):
    tok = _real("qwen2.5-instruct", tmp_path)
    reply = parse_reply('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    messages = [
        {"role": "user", "content": "Weather?"},
        reply.message(),
        {"role": "tool", "content": "-3", "tool_call_id": reply.tool_calls[0]["id"]},
    ]
    session = ChatSession(torch.nn.Linear(1, 1), tok)
    conv = Conversation([message_from_dict(m, "chat", i) for i, m in enumerate(messages)], source="chat")
    assert session.prompt_ids(messages) == Encoder(tok).prompt_ids(conv)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in tok.decode(
        session.prompt_ids(messages)
    )


def test_history_calls_with_json_string_arguments_render_as_the_object_form(tmp_path):
    """OpenAI clients send a call's arguments back as a JSON string; the template must not quote it twice."""
    tok = _real("qwen2.5-instruct", tmp_path)
    session = ChatSession(torch.nn.Linear(1, 1), tok)

    def history(arguments):
        return [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
                ],
            },
            {"role": "tool", "content": "-3", "tool_call_id": "c1"},
        ]

    as_text = session.prompt_ids(history('{"city": "Oslo"}'))
    assert as_text == session.prompt_ids(history({"city": "Oslo"}))
    assert '"arguments": {"city": "Oslo"}' in tok.decode(as_text)
