"""One reading of an OpenAI-shaped message: the same history (a `<think>` block in the content, typed reasoning and
text parts, tool-call arguments as a JSON string) gives the same prompt ids through training's reader, the
server's request and chat's history; a part the templates cannot show is a 400, not dropped."""

from __future__ import annotations

import json

import pytest
import real_tokenizers
import torch

from tunelab.data.conversation import Conversation
from tunelab.data.encode import Encoder
from tunelab.data.formats import to_conversation
from tunelab.data.readers import Record
from tunelab.infer.chat import ChatSession
from tunelab.serve.app import _conversation
from tunelab.serve.protocol import ApiError, ChatRequest

pytestmark = pytest.mark.fast  # a pure unit: `make test-fast` runs it


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
HISTORY = [
    {"role": "user", "content": "Weather in Oslo?"},
    {
        "role": "assistant",
        "content": "<think>The tool knows.</think>I will look.",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": "Oslo"})},
            }
        ],
    },
    {"role": "tool", "content": "-3", "tool_call_id": "c1"},
    {"role": "assistant", "content": [{"type": "reasoning", "text": "Report it."}, {"type": "text", "text": "-3 °C."}]},
    {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"}]},
]


@pytest.fixture(params=["qwen2.5-instruct", "qwen3"])
def tok(request, tmp_path):
    return real_tokenizers.load_or_skip(request.param, tmp_path)


def test_a_history_reads_the_same_in_training_the_server_and_chat(tok):
    encoder = Encoder(tok)
    record = Record({"messages": HISTORY + [{"role": "assistant", "content": "Snow."}], "tools": TOOLS}, "h:1")
    trained = to_conversation(record, "messages")
    prompt = Conversation(trained.messages[:-1], tools=trained.tools, source="h:1")
    want = encoder.prompt_ids(prompt)
    text = tok.decode(want)
    shown = encoder.reasoning_mode == "inline"  # Qwen2.5 shows history reasoning inline; Qwen3 drops it
    assert ("The tool knows." in text) == ("Report it." in text) == shown
    assert '"city": "Oslo"' in text and "And tomorrow?" in text

    served = _conversation(ChatRequest(model="m", messages=HISTORY, tools=TOOLS))
    call_turn, parts_turn = served.messages[1], served.messages[3]
    assert (call_turn.reasoning_content, call_turn.content) == ("The tool knows.", "I will look.")
    assert call_turn.tool_calls[0]["function"]["arguments"] == {"city": "Oslo"}  # the JSON string read as an object
    assert (parts_turn.reasoning_content, parts_turn.content) == ("Report it.", "-3 °C.")
    assert encoder.prompt_ids(served) == want
    session = ChatSession(torch.nn.Linear(1, 1), tok, tools=TOOLS, encoder=encoder)
    assert session.prompt_ids(HISTORY) == want


def test_a_content_part_no_template_can_show_is_a_400_naming_the_message():
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}
    with pytest.raises(ApiError) as err:
        _conversation(ChatRequest(model="m", messages=[image]))
    assert err.value.status == 400 and "message 0" in str(err.value)
    with pytest.raises(ApiError):
        _conversation(ChatRequest(model="m", messages=[{"role": "wizard", "content": "hi"}]))


@pytest.mark.fast
def test_an_answer_that_calls_a_tool_finishes_with_tool_calls_and_json_arguments():
    from tunelab.serve.app import chat_choice

    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    choice = chat_choice(0, text, "stop")
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert chat_choice(1, "Sunny in Paris.", "length")["finish_reason"] == "length"
    assert chat_choice(2, "<think>\nhmm\n</think>\n\nSunny.", "stop")["message"]["reasoning_content"] == "hmm"
