"""Every data format becomes the same `Conversation`; bad records are one TunelabError naming the record.

Also: `read_conversations` (via `config_conversations`) over files (format detected per file unless
`dataset_format` says) and `split`.
"""

from collections import Counter
from pathlib import Path

import pytest

from tunelab.config import from_dict
from tunelab.data.conversation import Conversation
from tunelab.data.dataset import DataStats, config_conversations, split
from tunelab.data.formats import detect_format, to_conversation
from tunelab.data.readers import Record
from tunelab.errors import TunelabError

pytestmark = pytest.mark.fast  # a pure unit: `make test-fast` runs it

SRC = "train.json[record 3]"
SHARED_DATASETS = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


def rec(**data) -> Record:
    return Record(data, SRC)


def convert(data: dict, fmt: str | None = None, columns=None, system=None) -> Conversation:
    record = Record(data, SRC)
    return to_conversation(record, fmt or detect_format(record, columns), columns, system)


def roles_and_contents(conv: Conversation) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in conv.messages]


def error_of(data: dict, fmt: str | None = None, columns=None) -> str:
    with pytest.raises(TunelabError) as info:
        convert(data, fmt, columns)
    return str(info.value)


def config(dataset, **kw):
    return from_dict({"model": "x", "dataset": dataset, "output_dir": "y", **kw})


# --- detection ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, fmt",
    [
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"instruction": "i", "output": "o"}, "alpaca"),
        ({"instruction": "i", "context": "", "response": "r", "category": "general"}, "dolly"),
        ({"id": "1", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "messages"),
        ({"messages": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
        ({"text": "raw corpus text"}, "text"),
    ],
    ids=["alpaca", "alpaca-no-input", "dolly", "sharegpt", "messages", "sharegpt-under-messages", "text"],
)
def test_format_is_detected_from_the_keys(data, fmt):
    assert detect_format(rec(**data)) == fmt


def test_chat_keys_win_over_a_text_key_in_detection():
    data = {"text": "t", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert detect_format(rec(**data)) == "messages"


def test_detection_follows_the_columns_mapping():
    assert detect_format(rec(question="q", answer="a"), {"instruction": "question", "output": "answer"}) == "alpaca"


def test_undetectable_keys_name_the_record_the_keys_and_the_formats():
    with pytest.raises(TunelabError) as info:
        detect_format(rec(prompt="p", completion="c"))
    msg = str(info.value)
    assert msg.startswith(f"{SRC}: cannot tell the data format from keys ['completion', 'prompt']")
    assert "alpaca (instruction, output)" in msg and "set dataset_format and columns" in msg


# --- conversion ---------------------------------------------------------------------------------------------


def test_alpaca_keeps_input_apart_from_the_instruction():
    conv = convert({"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"})
    assert roles_and_contents(conv) == [("user", "Translate to French."), ("assistant", "Bonjour")]
    user = conv.messages[0]
    assert user.input == "Good morning"
    assert user.text == "Translate to French.\n\nGood morning"
    assert conv.messages[1].input is None
    assert conv.source == SRC and conv.text is None


def test_alpaca_with_an_empty_input_has_no_input():
    conv = convert({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert conv.messages[0].input is None
    assert conv.messages[0].text == "Say hi."


def test_alpaca_system_and_history_come_before_the_last_turn():
    conv = convert(
        {
            "system": "Be brief.",
            "history": [["q1", "a1"], ["q2", "a2"]],
            "instruction": "q3",
            "input": "ctx",
            "output": "a3",
        }
    )
    assert roles_and_contents(conv) == [
        ("system", "Be brief."),
        ("user", "q1"),
        ("assistant", "a1"),
        ("user", "q2"),
        ("assistant", "a2"),
        ("user", "q3"),
        ("assistant", "a3"),
    ]
    assert [m.input for m in conv.messages] == [None, None, None, None, None, "ctx", None]
    assert conv.assistant_indices == [2, 4, 6]


def test_alpaca_history_that_is_not_pairs_is_an_error():
    assert (
        error_of({"instruction": "q", "output": "a", "history": [["q1"]]})
        == f"{SRC}: history[0] must be a [user, assistant] pair of strings"
    )
    assert (
        error_of({"instruction": "q", "output": "a", "history": "q1 a1"})
        == f"{SRC}: field 'history' must be a list of [user, assistant] pairs"
    )


def test_dolly_context_becomes_input_and_other_keys_are_ignored():
    conv = convert(
        {"instruction": "Summarise.", "context": "A long text.", "response": "Short.", "category": "summarization"}
    )
    assert roles_and_contents(conv) == [("user", "Summarise."), ("assistant", "Short.")]
    assert conv.messages[0].input == "A long text."
    assert conv.messages[0].text == "Summarise.\n\nA long text."
    empty = convert({"instruction": "Hi?", "context": "", "response": "Hi.", "category": "open_qa"})
    assert empty.messages[0].input is None


def test_sharegpt_roles_map_to_system_user_assistant():
    conv = convert(
        {
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "human", "value": "q1"},
                {"from": "gpt", "value": "a1"},
                {"from": "human", "value": "q2"},
                {"from": "gpt", "value": "a2"},
            ]
        }
    )
    assert roles_and_contents(conv) == [
        ("system", "S"),
        ("user", "q1"),
        ("assistant", "a1"),
        ("user", "q2"),
        ("assistant", "a2"),
    ]


def test_sharegpt_top_level_system_goes_first():
    conv = convert(
        {"system": "Top.", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    )
    assert roles_and_contents(conv) == [("system", "Top."), ("user", "q"), ("assistant", "a")]


def test_sharegpt_turns_under_a_messages_key_are_converted():
    conv = convert({"messages": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
    assert roles_and_contents(conv) == [("user", "q"), ("assistant", "a")]


def test_role_content_turns_under_a_conversations_key_are_converted():
    conv = convert({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    assert roles_and_contents(conv) == [("user", "q"), ("assistant", "a")]


def test_messages_multi_turn_keeps_order_and_extras():
    conv = convert(
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1", "reasoning_content": "because"},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2"},
            ]
        }
    )
    assert roles_and_contents(conv) == [
        ("system", "S"),
        ("user", "q1"),
        ("assistant", "a1"),
        ("user", "q2"),
        ("assistant", "a2"),
    ]
    assert conv.messages[2].reasoning_content == "because"
    assert conv.assistant_indices == [2, 4]


def test_openai_content_given_as_text_parts_is_joined():
    conv = convert(
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Hi"}]},
            ]
        }
    )
    assert roles_and_contents(conv) == [("user", "Hello, world"), ("assistant", "Hi")]


def test_content_parts_other_than_text_are_an_error():
    data = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]},
            {"role": "assistant", "content": "a"},
        ]
    }
    assert error_of(data) == (
        f"{SRC}: message 0 content must be a string or a list of parts typed text, reasoning, tool_call"
    )


def test_text_format_sets_text_and_no_messages():
    conv = convert({"text": "Once upon a time."}, system="ignored for raw text")
    assert conv.text == "Once upon a time."
    assert conv.messages == []
    assert conv.source == SRC


def test_default_system_is_prepended_when_the_conversation_has_none():
    conv = convert({"instruction": "q", "output": "a"}, system="Default.")
    assert roles_and_contents(conv) == [("system", "Default."), ("user", "q"), ("assistant", "a")]


def test_default_system_does_not_replace_the_records_own_system():
    alpaca = convert({"system": "Own.", "instruction": "q", "output": "a"}, system="Default.")
    assert roles_and_contents(alpaca) == [("system", "Own."), ("user", "q"), ("assistant", "a")]
    messages = convert(
        {
            "messages": [
                {"role": "system", "content": "Own."},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
            ]
        },
        system="Default.",
    )
    assert roles_and_contents(messages) == [("system", "Own."), ("user", "q"), ("assistant", "a")]


def test_columns_map_alpaca_fields_to_the_files_names():
    conv = convert({"question": "2+2?", "answer": "4"}, columns={"instruction": "question", "output": "answer"})
    assert roles_and_contents(conv) == [("user", "2+2?"), ("assistant", "4")]


def test_columns_map_the_message_keys():
    data = {"messages": [{"speaker": "user", "text": "q"}, {"speaker": "assistant", "text": "a"}]}
    conv = convert(data, "messages", columns={"role": "speaker", "content": "text"})
    assert roles_and_contents(conv) == [("user", "q"), ("assistant", "a")]


def test_columns_map_the_messages_list_key():
    data = {"dialog": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    conv = convert(data, columns={"messages": "dialog"})
    assert roles_and_contents(conv) == [("user", "q"), ("assistant", "a")]


# --- conversion errors --------------------------------------------------------------------------------------


def test_a_missing_field_names_the_field_and_the_record():
    assert (
        error_of({"instruction": "q"}, "alpaca")
        == f"{SRC}: missing field 'output' (alpaca records need instruction, output)"
    )
    assert (
        error_of({"instruction": "q", "context": ""}, "dolly")
        == f"{SRC}: missing field 'response' (dolly records need instruction, response)"
    )
    assert error_of({"text": "t"}, "messages") == f"{SRC}: missing field 'messages' (messages records need messages)"


def test_an_unknown_role_names_the_role_and_the_allowed_ones():
    msg = error_of({"messages": [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}]})
    assert msg == f"{SRC}: message 0 has unknown role 'human'; allowed: system, user, assistant, tool"
    msg = error_of({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]})
    assert (
        msg == f"{SRC}: message 1 has unknown role 'bot'; allowed: system, human, gpt (or user, assistant, observation)"
    )


def test_a_message_without_a_role_key_is_an_error():
    msg = error_of({"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]})
    assert msg == f"{SRC}: message 0 must be an object with 'role' and 'content'"


def test_a_conversation_must_end_with_an_assistant_message():
    msg = error_of(
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "q2"},
            ]
        }
    )
    assert msg == f"{SRC}: the conversation must end with an assistant message"


def test_a_conversation_must_start_with_a_user_message():
    msg = error_of({"messages": [{"role": "assistant", "content": "a"}]})
    assert msg == f"{SRC}: the conversation must start with a user message (after an optional system)"


def test_a_system_message_may_only_come_first():
    msg = error_of(
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "system", "content": "S"},
                {"role": "assistant", "content": "a"},
            ]
        }
    )
    assert msg == f"{SRC}: a system message may only come first"


def test_an_empty_assistant_message_is_an_error():
    msg = error_of(
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "  \n"},
            ]
        }
    )
    assert msg == f"{SRC}: message 2 (assistant) is empty"
    assert error_of({"instruction": "q", "input": "", "output": ""}) == f"{SRC}: message 1 (assistant) is empty"


def test_an_empty_message_list_is_an_error():
    assert error_of({"messages": []}, "messages") == f"{SRC}: expected a non-empty list of messages"


def test_a_non_string_field_names_the_field_and_its_type():
    assert error_of({"instruction": 5, "output": "a"}) == f"{SRC}: field 'instruction' must be a string, got int"
    assert (
        error_of({"instruction": "q", "input": ["x"], "output": "a"})
        == f"{SRC}: field 'input' must be a string, got list"
    )
    assert error_of({"text": {"a": 1}}) == f"{SRC}: field 'text' must be a string, got dict"


# --- read_conversations -------------------------------------------------------------------------------------


def test_read_conversations_detects_the_format_per_file_and_counts_it(write_data):
    a = write_data("a.json", [{"instruction": "q1", "output": "a1"}, {"instruction": "q2", "output": "a2"}])
    b = write_data(
        "b.jsonl", [{"messages": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"}]}]
    )
    cfg = config([a, b])
    stats = DataStats()
    convs = config_conversations(cfg, cfg.datasets, stats)
    assert [roles_and_contents(c) for c in convs] == [
        [("user", "q1"), ("assistant", "a1")],
        [("user", "q2"), ("assistant", "a2")],
        [("user", "q3"), ("assistant", "a3")],
    ]
    assert [c.source for c in convs] == [f"{a}[record 0]", f"{a}[record 1]", f"{b}:1"]
    assert stats.records == Counter({"alpaca": 2, "messages": 1})


def test_read_conversations_honours_dataset_format(write_data):
    rows = [
        {"instruction": "q", "output": "a", "text": "raw one"},
        {"instruction": "q", "output": "a", "text": "raw two"},
    ]
    path = write_data("both.jsonl", rows)
    stats = DataStats()
    auto = config_conversations(config(path), [path], stats)
    assert [roles_and_contents(c) for c in auto] == [[("user", "q"), ("assistant", "a")]] * 2
    assert stats.records == Counter({"alpaca": 2})
    stats = DataStats()
    forced = config_conversations(config(path, dataset_format="text"), [path], stats)
    assert [(c.text, c.messages) for c in forced] == [("raw one", []), ("raw two", [])]
    assert stats.records == Counter({"text": 2})


def test_read_conversations_applies_columns_and_system(write_data):
    path = write_data("qa.json", [{"question": "q", "answer": "a"}])
    cfg = config(path, columns={"instruction": "question", "output": "answer"}, system="Be kind.")
    [conv] = config_conversations(cfg, cfg.datasets)
    assert roles_and_contents(conv) == [("system", "Be kind."), ("user", "q"), ("assistant", "a")]


def test_read_conversations_names_the_bad_record(write_data):
    path = write_data("bad.json", [{"instruction": "q", "output": "a"}, {"instruction": "q"}])
    with pytest.raises(TunelabError) as info:
        config_conversations(config(path), [path])
    assert str(info.value) == f"{path}[record 1]: missing field 'output' (alpaca records need instruction, output)"


def test_read_conversations_skips_an_empty_file(tmp_path, write_data):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    full = write_data("full.json", [{"text": "t"}])
    stats = DataStats()
    convs = config_conversations(config(full), [str(empty), full], stats)
    assert [c.text for c in convs] == ["t"]
    assert stats.records == Counter({"text": 1})


# --- split --------------------------------------------------------------------------------------------------


def test_split_without_val_size_keeps_everything_for_training():
    items = list(range(10))
    assert split(items, 0.0, seed=1) == (items, [])


def test_split_is_deterministic_by_seed_and_keeps_the_original_order():
    items = list(range(100))
    train, held = split(items, 0.2, seed=7)
    assert split(items, 0.2, seed=7) == (train, held)
    assert split(items, 0.2, seed=8) != (train, held)
    assert train == sorted(train) and held == sorted(held)
    assert sorted(train + held) == items and not set(train) & set(held)


def test_split_val_size_below_one_is_a_fraction():
    train, held = split(list(range(40)), 0.25, seed=0)
    assert (len(train), len(held)) == (30, 10)


def test_split_val_size_of_one_or_more_is_a_count():
    train, held = split(list(range(40)), 3, seed=0)
    assert (len(train), len(held)) == (37, 3)
    train, held = split(list(range(40)), 3.0, seed=0)
    assert (len(train), len(held)) == (37, 3)


def test_split_holds_out_at_least_one_and_never_everything():
    assert tuple(map(len, split(list(range(10)), 0.01, seed=0))) == (9, 1)
    assert tuple(map(len, split(list(range(10)), 500, seed=0))) == (1, 9)
    assert tuple(map(len, split(list(range(2)), 0.9, seed=0))) == (1, 1)


def test_split_of_a_single_item_keeps_it_for_training():
    train, held = split(["only"], 0.5, seed=0)
    assert train == ["only"]


# --- real datasets under ../shared/datasets -----------------------------------------------------------------


@pytest.mark.parametrize(
    "relpath, fmt, count",
    [
        ("self-llm/huanhuan.json", "alpaca", 3729),
        ("self-llm/dolly_huanhuan.jsonl", "dolly", 3729),
        ("fastchat/dummy_conversation.json", "sharegpt", 500),
        ("llama-factory/alpaca_en_demo.json", "alpaca", 999),
    ],
    ids=["self-llm-alpaca", "self-llm-dolly", "fastchat-sharegpt", "llama-factory-alpaca"],
)
def test_real_dataset_files_are_read_into_conversations(relpath, fmt, count):
    path = SHARED_DATASETS / relpath
    if not path.exists():
        pytest.skip(f"{path} is absent")
    cfg = from_dict({"model": "x", "dataset": str(path), "output_dir": "y"})
    stats = DataStats()
    convs = config_conversations(cfg, cfg.datasets, stats)
    assert stats.records == Counter({fmt: count})
    assert len(convs) == count
    assert all(c.messages and c.messages[-1].role == "assistant" and c.messages[-1].content.strip() for c in convs)
    assert all(c.messages[0].role == "user" for c in convs), "these files carry no system prompt"
    if fmt == "sharegpt":
        assert any(len(c.messages) > 2 for c in convs), "multi-turn records keep every turn"
