"""Tool use: every dialect of tools and calls becomes one shape, each bad call is one error naming the record,
and on real templates a call trains like the assistant's text while tool results, system and user never train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import real_tokenizers

from tunelab.data.dataset import DataStats, read_conversations
from tunelab.data.encode import Encoder
from tunelab.data.formats import detect_format, to_conversation
from tunelab.data.readers import Record
from tunelab.errors import TunelabError

pytestmark = pytest.mark.fast  # a pure unit: `make test-fast` runs it


SRC = "calls.jsonl:4"
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "llama-factory"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def convert(data: dict, tools=None):
    record = Record(data, SRC)
    return to_conversation(record, detect_format(record), tools=tools)


def openai_record(arguments='{"city": "Oslo"}', tools=(WEATHER,), name="get_weather"):
    return {
        "tools": list(tools),
        "messages": [
            {"role": "system", "content": "You help with weather."},
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "abc123xyz", "type": "function", "function": {"name": name, "arguments": arguments}}
                ],
            },
            {"role": "tool", "tool_call_id": "abc123xyz", "content": '{"temp_c": -3}'},
            {"role": "assistant", "content": "It is -3 °C in Oslo."},
        ],
    }


def glaive_record():
    return {
        "tools": json.dumps([WEATHER["function"]]),
        "conversations": [
            {"from": "human", "value": "Weather in Oslo?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
            {"from": "observation", "value": '{"temp_c": -3}'},
            {"from": "gpt", "value": "It is -3 °C in Oslo."},
        ],
    }


def test_openai_calls_get_object_arguments_and_results_their_call_id():
    conv = convert(openai_record())
    call = conv.messages[2].tool_calls[0]
    assert call == {
        "id": "abc123xyz",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
    }
    assert conv.messages[3].tool_call_id == "abc123xyz" and conv.messages[3].name == "get_weather"
    assert conv.tools == [WEATHER]


def test_glaive_function_call_and_observation_turns_become_calls_and_results():
    conv = convert(glaive_record())
    assert [m.role for m in conv.messages] == ["user", "assistant", "tool", "assistant"]
    call = conv.messages[1].tool_calls[0]
    assert call["function"] == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert conv.messages[2].tool_call_id == call["id"] and len(call["id"]) == 9  # Mistral's template needs 9
    assert conv.tools == [WEATHER]  # bare function specs are wrapped as OpenAI tools


def test_typed_content_parts_carry_reasoning_and_calls():
    data = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "value": "Weather in Oslo?"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "reasoning", "value": "Need the tool."},
                    {"type": "tool_call", "value": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'},
                ],
            },
            {"role": "tool", "content": [{"type": "text", "value": "-3"}]},
            {"role": "assistant", "content": [{"type": "text", "value": "Cold: -3."}]},
        ],
        "tools": json.dumps([WEATHER]),
    }
    conv = convert(data)
    assert conv.messages[1].reasoning_content == "Need the tool."
    assert conv.messages[1].tool_calls[0]["function"]["name"] == "get_weather"
    assert conv.messages[3].content == "Cold: -3."


def test_a_think_block_opening_the_content_is_reasoning():
    conv = convert(
        {
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nFour."},
            ]
        }
    )
    assert (conv.messages[1].reasoning_content, conv.messages[1].content) == ("add them", "Four.")


def test_the_config_tools_file_serves_records_without_their_own():
    record = openai_record(tools=())
    del record["tools"]
    assert convert(record, tools=[WEATHER]).tools == [WEATHER]
    own = dict(WEATHER, function=dict(WEATHER["function"], description="own"))
    assert convert(openai_record(tools=(own,)), tools=[WEATHER]).tools == [own]


@pytest.mark.parametrize(
    "record, message",
    [
        (
            openai_record(arguments='{"city": "Oslo"'),
            "calls.jsonl:4: message 2 tool_calls: the arguments of tool call 'get_weather' is not valid JSON",
        ),
        (
            openai_record(arguments='["Oslo"]'),
            "calls.jsonl:4: message 2 tool_calls: the arguments of tool call "
            "'get_weather' must be a JSON object, got list",
        ),
        (
            openai_record(name="get_time"),
            "calls.jsonl:4: message 2 calls tool 'get_time', which is not among the record's tools (get_weather)",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "tool", "content": "42"},
                    {"role": "assistant", "content": "ok"},
                ]
            },
            "calls.jsonl:4: message 1 is a tool result with no tool call before it",
        ),
        (
            {
                "conversations": [
                    {"from": "human", "value": "hi"},
                    {"from": "function_call", "value": "get_weather(Oslo)"},
                    {"from": "gpt", "value": "ok"},
                ]
            },
            "calls.jsonl:4: message 1 (function_call) is not valid JSON",
        ),
        (
            {
                "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
                "tools": '[{"description": "no name"}]',
            },
            "calls.jsonl:4: tools[0] must be a function definition",
        ),
    ],
)
def test_a_bad_tool_call_is_one_error_naming_the_record(record, message):
    with pytest.raises(TunelabError) as info:
        convert(record)
    assert str(info.value).startswith(message), str(info.value)


def test_bad_records_skip_counts_and_names_what_it_left_out(write_data):
    bad = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "tool", "content": "42"},
            {"role": "assistant", "content": "ok"},
        ]
    }
    path = write_data("mixed.jsonl", [openai_record(), bad, openai_record()])
    with pytest.raises(TunelabError, match=r"mixed.jsonl:2: message 1 is a tool result"):
        read_conversations(path)
    stats = DataStats()
    convs = read_conversations(path, stats=stats, skip_bad=True)
    assert len(convs) == 2 and stats.dropped == {"bad record (bad_records: skip)": 1}
    assert stats.skipped == [f"{path}:2: message 1 is a tool result with no tool call before it"]


trained_runs = real_tokenizers.trained_runs


real = real_tokenizers.load_or_skip


CALL_TEXT = {
    "qwen2.5-instruct": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
    "qwen3": '<think>\n\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
    "</tool_call><|im_end|>",
    "llama-3.2-3b-instruct": '{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>',
    # this golden template of mistral-common HTML-escapes the quotes of the JSON it builds itself
    "mistral-v3": '[TOOL_CALLS] [{&#34;name&#34;: &#34;get_weather&#34;, &#34;arguments&#34;: {"city": "Oslo"}, '
    "&#34;id&#34;: &#34;abc123xyz&#34;}]</s>",
}
ANSWER_END = {
    "qwen2.5-instruct": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "llama-3.2-3b-instruct": "<|eot_id|>",
    "mistral-v3": "</s>",
}


@pytest.mark.parametrize("family", sorted(CALL_TEXT))
def test_a_call_trains_like_text_and_its_result_never_does(family, tmp_path):
    """Decoded trained spans are exactly the call as the template writes it and the final answer, each with
    its end of turn; across every sample, no token of the system, user or tool turns is trained."""
    tok = real(family, tmp_path)
    conv = convert(openai_record())
    samples = Encoder(tok).samples(conv)
    runs = [r.strip(" ") for s in samples for r in trained_runs(tok, s)]
    assert sorted(runs) == sorted(
        [
            CALL_TEXT[family],
            ("<think>\n\n</think>\n\n" if family == "qwen3" else "") + f"It is -3 °C in Oslo.{ANSWER_END[family]}",
        ]
    )
    trained = "".join(runs)
    for text in ("You help with weather.", "Weather in Oslo?", "temp_c"):
        assert text not in trained


@pytest.mark.parametrize("family", ["qwen2.5-instruct", "qwen3", "llama-3.2-3b-instruct"])
def test_tools_are_rendered_as_the_template_puts_them(family, tmp_path):
    tok = real(family, tmp_path)
    sample = Encoder(tok).encode(convert(openai_record()))
    text = tok.decode(sample.input_ids)
    assert "Weather of a city" in text
    assert text == tok.decode(
        tok(
            tok.apply_chat_template(convert(openai_record()).template_messages(), tools=[WEATHER], tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
    )


@pytest.mark.parametrize("family", ["deepseek-r1-distill-qwen", "phi-4", "phi-3-mini-4k-instruct"])
@pytest.mark.parametrize("mention", [False, True])
def test_a_template_without_tool_support_says_so(family, mention, tmp_path):
    """Also when the turn's text or thinking names the tool: a name in prose is not the call rendered."""
    tok = real(family, tmp_path)
    record = openai_record(tools=())  # with tools, the tools are refused first (next test)
    if mention:
        record["messages"][2].update(content="Calling get_weather now.", reasoning_content="Use get_weather.")
    with pytest.raises(
        TunelabError,
        match=r"calls.jsonl:4: the chat template does not render the tool calls of "
        r"assistant message 2 \(no 'get_weather' in its answer\)",
    ):
        Encoder(tok).samples(convert(record))


@pytest.mark.parametrize("family", ["deepseek-r1-distill-qwen", "phi-4"])
def test_tools_a_template_cannot_show_are_an_error_not_a_silent_loss(family, tmp_path):
    tok = real(family, tmp_path)
    record = {
        "tools": [WEATHER],
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
    }
    with pytest.raises(TunelabError, match=r"calls.jsonl:4: the chat template does not render tools"):
        Encoder(tok).encode(convert(record))


SETS = {
    "glaive_toolcall_en_demo.json": (300, 0),
    "glaive_toolcall_zh_demo.json": (298, 2),
    "reason_tool_use_demo_50.jsonl": (50, 0),
}


@pytest.mark.parametrize("name", sorted(SETS))
def test_the_shared_tool_sets_read_with_their_bad_records_counted(name):
    if not (SHARED / name).exists():
        pytest.skip(f"../shared/datasets/llama-factory/{name} not present")
    stats = DataStats()
    convs = read_conversations(str(SHARED / name), stats=stats, skip_bad=True)
    kept, skipped = SETS[name]
    assert (len(convs), sum(stats.dropped.values())) == (kept, skipped)
    assert all("tool result with no tool call before it" in m for m in stats.skipped)
    calls = sum(len(m.tool_calls or ()) for c in convs for m in c.messages)
    results = sum(m.role == "tool" for c in convs for m in c.messages)
    assert calls >= results > 0


def test_results_link_to_the_call_their_tool_call_id_names_in_any_order():
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    calls = [
        {"id": "w1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
        {"id": "t1", "type": "function", "function": {"name": "get_time", "arguments": {}}},
    ]
    conv = convert(
        {
            "tools": [WEATHER, clock],
            "messages": [
                {"role": "user", "content": "Weather and time in Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": calls},
                {"role": "tool", "content": "12:00", "tool_call_id": "t1"},  # the second call answered first
                {"role": "tool", "content": "-3", "tool_call_id": "w1"},
                {"role": "assistant", "content": "-3 °C at noon."},
            ],
        }
    )
    results = [(m.tool_call_id, m.name) for m in conv.messages if m.role == "tool"]
    assert results == [("t1", "get_time"), ("w1", "get_weather")]


def test_tool_definitions_holding_control_token_text_encode_it_as_plain_text(tmp_path):
    tok = real_tokenizers.load_or_skip("qwen2.5-instruct", tmp_path)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    tricky = json.loads(json.dumps(WEATHER))
    tricky["function"]["description"] = "Weather of a city<|im_end|>"
    plain = json.loads(json.dumps(WEATHER))
    plain["function"]["description"] = "Weather of a city"

    def sample(tool):
        conv = convert(
            {
                "tools": [tool],
                "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
            }
        )
        return Encoder(tok).encode(conv)

    literal, control = sample(tricky), sample(plain)
    assert literal.literal_text and literal.input_ids.count(end) == control.input_ids.count(end)
    assert "Weather of a city<|im_end|>" in tok.decode(literal.input_ids)
