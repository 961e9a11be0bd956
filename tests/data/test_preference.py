"""Preference data: every pair and KTO layout reads to the same records, each bad record is one error naming it,
and a side is the SFT encoding of prompt + completion with only the completion trained, on every real template."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import real_tokenizers

from tunelab.config import from_dict
from tunelab.data.conversation import Conversation, Message
from tunelab.data.dataset import held_out
from tunelab.data.encode import Encoder
from tunelab.data.preference import (
    PreferenceRecord,
    PreferenceStats,
    build_preference_data,
    encode_preferences,
    read_preferences,
)
from tunelab.errors import TunelabError

pytestmark = pytest.mark.fast  # a pure unit: `make test-fast` runs it

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "llama-factory"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
runs = real_tokenizers.trained_runs


@pytest.fixture()
def cfg(tmp_path, write_data):
    """cfg(rows, **keys) -> a Config training stage dpo (unless keys say otherwise) on `rows` written as JSONL."""

    def make(rows, **keys):
        data = dict(model="unused", dataset=write_data("pref.jsonl", rows), output_dir=str(tmp_path / "o"))
        return from_dict({"stage": "dpo", **data, **keys})

    return make


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """real(family) -> that real tokenizer, loaded once for the module (skipped where ../shared lacks it)."""
    loaded = {}

    def get(family):
        if family not in loaded:
            loaded[family] = real_tokenizers.load_or_skip(family, tmp_path_factory.mktemp("tok"))
        return loaded[family]

    return get


def read(cfg, rows, **keys):
    stats = PreferenceStats()
    return read_preferences(c := cfg(rows, **keys), c.datasets, stats), stats


def roles(messages):
    return [m.role for m in messages]


# ---------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "side, text",
    [
        ("Blue.", "Blue."),
        ({"role": "assistant", "content": "Blue."}, "Blue."),
        ([{"role": "assistant", "content": "Blue."}], "Blue."),
    ],
)
def test_messages_format_takes_a_string_a_message_or_a_list(cfg, side, text):
    row = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A colour?"}],
        "chosen": side,
        "rejected": "Red.",
    }
    (record,), stats = read(cfg, [row])
    assert roles(record.prompt.messages) == ["system", "user"]
    assert [(m.role, m.content) for m in record.chosen] == [("assistant", text)]
    assert [(m.role, m.content) for m in record.rejected] == [("assistant", "Red.")]
    assert record.label is None and record.source.endswith(":1")
    assert stats.records == {"messages": 1}


def test_trl_string_prompt_is_one_user_turn_and_conversational_is_read_as_messages(cfg):
    rows = [
        {"prompt": "A colour?", "chosen": "Blue.", "rejected": "Red."},
        {
            "prompt": [{"role": "user", "content": "A colour?"}],
            "chosen": [{"role": "assistant", "content": "Blue."}],
            "rejected": [{"role": "assistant", "content": "Red."}],
        },
    ]
    (a, b), stats = read(cfg, rows)
    assert [(m.role, m.content) for m in a.prompt.messages] == [("user", "A colour?")]
    assert a.prompt.messages == b.prompt.messages and a.chosen == b.chosen and a.rejected == b.rejected
    assert stats.records == {"trl": 2}


def test_trl_implicit_prompt_is_the_shared_start(cfg):
    user = {"role": "user", "content": "Weather in Oslo?"}
    call = {"role": "assistant", "content": "", "tool_calls": [CALL]}

    def then(result, answer):
        return [user, call, {"role": "tool", "content": result}, {"role": "assistant", "content": answer}]

    rows = [
        {
            "chosen": [user, {"role": "assistant", "content": "Sunny."}],
            "rejected": [user, {"role": "assistant", "content": "Rainy."}],
        },
        {"chosen": then("12C", "12C."), "rejected": then("12C", "Cold.")},  # the shared result is prompt
        {"chosen": then("12C", "12C."), "rejected": then("error", "Sorry.")},  # no prompt ends with the call
    ]
    (a, b, c), stats = read(cfg, rows)
    assert roles(a.prompt.messages) == ["user"] and a.chosen[0].content == "Sunny."
    assert roles(b.prompt.messages) == ["user", "assistant", "tool"] and roles(b.chosen) == ["assistant"]
    assert roles(c.prompt.messages) == ["user"]
    assert roles(c.chosen) == ["assistant", "tool", "assistant"] and c.chosen[0].tool_calls
    assert stats.records == {"trl implicit prompt": 3}


def test_llama_factory_sharegpt_and_alpaca(cfg):
    rows = [
        {
            "system": "Be brief.",
            "conversations": [{"from": "human", "value": "A colour?"}],
            "chosen": {"from": "gpt", "value": "Blue."},
            "rejected": {"from": "gpt", "value": "Red."},
        },
        {
            "system": "Be brief.",
            "history": [["Hi", "Hello."]],
            "instruction": "Translate",
            "input": "bleu",
            "chosen": "blue",
            "rejected": "red",
        },
    ]
    (share, alpaca), stats = read(cfg, rows)
    assert [(m.role, m.content) for m in share.prompt.messages] == [("system", "Be brief."), ("user", "A colour?")]
    assert share.chosen[0].content == "Blue." and share.rejected[0].content == "Red."
    assert roles(alpaca.prompt.messages) == ["system", "user", "assistant", "user"]
    assert alpaca.prompt.messages[-1].input == "bleu" and alpaca.chosen[0].content == "blue"
    assert stats.records == {"sharegpt": 1, "alpaca": 1}


def test_kto_unpaired_layouts_and_labels(cfg):
    rows = [
        {"prompt": "A colour?", "completion": "Blue.", "label": True},
        {"prompt": "A colour?", "completion": "Rock.", "label": "FALSE"},
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [CALL]},
                {"role": "tool", "content": "12C"},
                {"role": "assistant", "content": "12C."},
            ],
            "label": "true",
        },
    ]
    (a, b, c), stats = read(cfg, rows, stage="kto")
    assert (a.label, b.label, c.label) == (True, False, True)
    assert a.rejected is None and a.chosen[0].content == "Blue."
    assert roles(c.prompt.messages) == ["user", "assistant", "user"]  # the completion: after the last user turn
    assert roles(c.chosen) == ["assistant", "tool", "assistant"]
    assert stats.records == {"trl kto": 2, "messages kto": 1}


def test_a_pair_under_kto_is_a_desirable_and_an_undesirable_example(cfg):
    (good, bad), _ = read(cfg, [{"prompt": "A colour?", "chosen": "Blue.", "rejected": "Rock."}], stage="kto")
    assert (good.label, good.chosen[0].content, bad.label, bad.chosen[0].content) == (True, "Blue.", False, "Rock.")
    assert good.prompt is bad.prompt and good.source.endswith("(chosen)") and bad.source.endswith("(rejected)")


@pytest.mark.parametrize("skip", ["error", "skip"])
def test_an_unpaired_record_under_dpo_says_to_use_kto(cfg, skip):
    with pytest.raises(TunelabError, match=r"pref\.jsonl:1: an unpaired example .* use stage: kto"):
        read(cfg, [{"prompt": "A?", "completion": "B.", "label": True}], bad_records=skip)


def test_columns_rename_fields(cfg):
    row = {"question": "A colour?", "better": "Blue.", "worse": "Red."}
    (record,), _ = read(cfg, [row], columns={"prompt": "question", "chosen": "better", "rejected": "worse"})
    assert (record.prompt.messages[0].content, record.chosen[0].content) == ("A colour?", "Blue.")


def test_completions_read_reasoning_and_tool_calls_as_sft_does(cfg, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text('[{"name": "get_weather", "parameters": {"type": "object"}}]')
    row = {
        "messages": [{"role": "user", "content": "Weather?"}],
        "chosen": [
            {"role": "assistant", "content": "<think>Need data.</think>", "tool_calls": [CALL]},
            {"role": "tool", "content": "12C"},
            {"role": "assistant", "content": "12C.", "reasoning_content": "Report."},
        ],
        "rejected": "<think>Guess.</think>Hot.",
    }
    (record,), _ = read(cfg, [row], system="Be brief.", tools=str(tools))
    first, _, last = record.chosen
    assert (first.reasoning_content, first.content, first.tool_calls[0]["function"]["name"]) == (
        "Need data.",
        "",
        "get_weather",
    )
    assert last.reasoning_content == "Report."
    assert (record.rejected[0].reasoning_content, record.rejected[0].content) == ("Guess.", "Hot.")
    assert roles(record.prompt.messages) == ["system", "user"] and record.prompt.tools[0]["function"]["name"]
    side = record.side(record.chosen, "s")
    assert side.train_from == 2 and side.messages[3].tool_call_id == side.messages[2].tool_calls[0]["id"]


OK = {"chosen": "Blue.", "rejected": "Red."}
BAD = [
    ({"prompt": "A?", "chosen": "Same.", "rejected": "Same."}, "chosen and rejected are the same completion"),
    ({"prompt": "A?", "chosen": "Blue."}, "field 'rejected' is missing or empty"),
    ({"prompt": "A?", "chosen": "", "rejected": "Red."}, "field 'chosen' is missing or empty"),
    (
        {"prompt": "A?", "chosen": [{"role": "user", "content": "x"}], "rejected": "Red."},
        "field 'chosen' must start with an assistant turn, not user",
    ),
    (
        {
            "prompt": "A?",
            "chosen": [{"role": "assistant", "content": "", "tool_calls": [CALL]}, {"role": "tool", "content": "1"}],
            "rejected": "Red.",
        },
        "field 'chosen' must end with an assistant turn, not tool",
    ),
    (
        {
            "messages": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "B."}],
            "chosen": "C.",
            "rejected": "D.",
        },
        "the prompt must end with a user or tool turn, not assistant",
    ),
    ({"prompt": "A?", "completion": "B.", "label": "maybe"}, "field 'label' must be true or false, got 'maybe'"),
    ({"question": "A?"}, "cannot tell the preference format"),
]


@pytest.mark.parametrize("row, message", BAD, ids=range(len(BAD)))
def test_each_bad_record_is_one_error_naming_it(cfg, tmp_path, row, message):
    good = {"prompt": "Q?", "completion": "A.", "label": True} if "label" in row else {"prompt": "Q?", **OK}
    with pytest.raises(TunelabError) as err:
        read(cfg, [good, row], stage="kto" if "label" in row else "dpo")
    assert str(err.value).startswith(f"{tmp_path / 'pref.jsonl'}:2: ") and message in str(err.value)


def test_bad_records_skip_counts_and_names_them(cfg):
    rows = [{"prompt": "A?", **OK}] + [row for row, _ in BAD[:6]] + [{"prompt": "B?", **OK}]
    records, stats = read(cfg, rows, bad_records="skip")
    assert [r.source.rsplit(":", 1)[1] for r in records] == ["1", "8"]
    assert stats.dropped == {"bad record (bad_records: skip)": 6}
    assert len(stats.skipped) == 5 and stats.skipped[0].endswith(":2: " + BAD[0][1] + ", so the pair prefers nothing")


def test_llama_factory_demo_files(cfg):
    if not (SHARED / "dpo_en_demo.json").exists():
        pytest.skip("../shared/datasets/llama-factory not present")
    stats = PreferenceStats()
    dpo = read_preferences(c := cfg([], dataset=str(SHARED / "dpo_en_demo.json")), c.datasets, stats)
    assert len(dpo) == 300 and stats.records == {"sharegpt": 300}
    assert all(r.prompt.messages[-1].role == "user" and r.chosen != r.rejected for r in dpo)
    kto = read_preferences(c := cfg([], dataset=str(SHARED / "kto_en_demo.json"), stage="kto"), c.datasets, stats)
    assert len(kto) == 300 and sum(r.label for r in kto) == 150
    assert all(roles(r.chosen) == ["assistant"] and r.prompt.messages[-1].role == "user" for r in kto)


def test_llama_factory_demo_files_encode_their_completions(cfg, real):
    if not (SHARED / "dpo_en_demo.json").exists():
        pytest.skip("../shared/datasets/llama-factory not present")
    tok = real("qwen2.5-instruct")
    data = build_preference_data(cfg([], dataset=str(SHARED / "dpo_en_demo.json"), max_samples=20), tok)
    records = read_preferences(c := cfg([], dataset=str(SHARED / "dpo_en_demo.json")), c.datasets, PreferenceStats())
    text = {r.source: (r.chosen[0].content, r.rejected[0].content) for r in records}
    assert len(data.train) + sum(data.stats.dropped.values()) == 20
    for sample in data.train:
        chosen, rejected = text[sample.source]
        assert runs(tok, sample.chosen) == [chosen + "<|im_end|>"] or sample.chosen.truncated
        assert runs(tok, sample.rejected) == [rejected + "<|im_end|>"] or sample.rejected.truncated
    kto = build_preference_data(cfg([], dataset=str(SHARED / "kto_en_demo.json"), stage="kto", max_samples=20), tok)
    assert kto.stats.desirable + kto.stats.undesirable == len(kto.train) > 0
    assert all(s.kl is not None and s.kl.n_trained for s in kto.train)


# ---------------------------------------------------------------------------------------------- encoding


def pair(prompt, chosen, rejected="No.", tools=None, source="p.jsonl:1"):
    return PreferenceRecord(
        Conversation(prompt, tools=tools, source=source),
        chosen,
        rejected and [Message("assistant", rejected)],
        None,
        source,
    )


def history():
    return [
        Message("system", "Be brief."),
        Message("user", "Name a colour."),
        Message("assistant", "Blue."),
        Message("user", "Another, please?"),
    ]


def answer_then_eot(trained: list[str], answer: str, encoder: Encoder) -> None:
    """One trained run: the answer (after the empty think block a Qwen3 prompt opens, or a leading space), then
    the template's end-of-turn tokens."""
    (run,) = trained
    at = run.index(answer)
    assert re.fullmatch(r"\s*(<think>\s*</think>\s*)?", run[:at])
    assert re.fullmatch("(?:" + "|".join(map(re.escape, encoder.eot_tokens)) + ")+", run[at + len(answer) :])


@pytest.mark.parametrize("family", real_tokenizers.ALL)
def test_chosen_side_is_the_sft_encoding_with_only_the_completion_trained(real, family):
    tok = real(family)
    encoder = Encoder(tok, train_on="assistant")
    record = pair(history(), [Message("assistant", "Green, 绿色.")])
    (sample,) = encode_preferences(encoder, [record], False, PreferenceStats())
    sft = Encoder(tok, train_on="last").encode(Conversation(history() + record.chosen, source="p.jsonl:1"))
    assert (sample.chosen.input_ids, sample.chosen.labels) == (sft.input_ids, sft.labels)
    answer_then_eot(runs(tok, sample.chosen), "Green, 绿色.", encoder)
    answer_then_eot(runs(tok, sample.rejected), "No.", encoder)


def test_a_tool_using_completion_trains_both_assistant_turns_not_the_result(real):
    tok = real("qwen2.5-instruct")
    chosen = [
        Message("assistant", "", tool_calls=[dict(CALL)]),
        Message("tool", "RESULT-12C"),
        Message("assistant", "It is 12C."),
    ]
    record = pair([Message("user", "Weather in Oslo?")], chosen, tools=[WEATHER])
    (sample,) = encode_preferences(Encoder(tok), [record], False, PreferenceStats())
    call, answer = runs(tok, sample.chosen)
    assert "get_weather" in call and call.endswith("<|im_end|>") and answer == "It is 12C.<|im_end|>"
    assert "RESULT-12C" in tok.decode(sample.chosen.input_ids)
    assert runs(tok, sample.rejected) == ["No.<|im_end|>"]


@pytest.mark.parametrize("family", ["qwen3", "deepseek-r1-distill-qwen"])
@pytest.mark.parametrize("rule", ["keep", "drop"])
def test_reasoning_keep_and_drop(real, family, rule):
    tok = real(family)
    record = pair([Message("user", "A number?")], [Message("assistant", "Seven.", reasoning_content="Count up.")])
    encoder = Encoder(tok, reasoning=rule)
    (sample,) = encode_preferences(encoder, [record], False, PreferenceStats())
    sft = Encoder(tok, train_on="last", reasoning=rule).encode(Conversation(record.prompt.messages + record.chosen))
    assert (sample.chosen.input_ids, sample.chosen.labels) == (sft.input_ids, sft.labels)
    trained = "".join(runs(tok, sample.chosen))
    assert "Seven." in trained
    assert ("Count up." in trained) == (rule == "keep")
    assert "Count up." not in tok.decode(sample.chosen.input_ids) or rule == "keep"


# a template that shows reasoning on the last turn only, as DeepSeek-R1's drops it from history
LAST_THINKS = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.reasoning_content and loop.last %}<think>{{ m.reasoning_content }}</think>{% endif %}"
    "{{ m.content }}{% for c in m.tool_calls or [] %}<call>{{ c.function.name }}</call>{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture()
def last_thinks(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = LAST_THINKS
    return tok


def test_a_completion_that_is_not_one_sequence_is_refused_or_skipped(last_thinks):
    chosen = [
        Message("assistant", "", reasoning_content="Look it up.", tool_calls=[dict(CALL)]),
        Message("tool", "12C"),
        Message("assistant", "12C."),
    ]
    record = pair([Message("user", "Weather?")], chosen)
    with pytest.raises(TunelabError, match=r"p\.jsonl:1 \(chosen\): .*assistant message 1 .* not one sequence"):
        encode_preferences(Encoder(last_thinks), [record], False, PreferenceStats())
    stats = PreferenceStats()
    assert encode_preferences(Encoder(last_thinks), [record], False, stats, skip_bad=True) == []
    assert stats.dropped == {"bad record (bad_records: skip)": 1}
    (sample,) = encode_preferences(Encoder(last_thinks, reasoning="last"), [record], False, PreferenceStats())
    assert runs(last_thinks, sample.chosen) == ["<call>get_weather</call><|im_end|>", "12C.<|im_end|>"]


def test_a_record_the_template_refuses_is_skipped_without_its_neighbours(tokenizer):
    good = pair([Message("user", "A?")], [Message("assistant", "B.")])
    refused = pair([Message("user", "W?")], [Message("assistant", "12C.")], tools=[WEATHER], source="p.jsonl:2")
    stats = PreferenceStats()
    kept = encode_preferences(Encoder(tokenizer), [good, refused, good], False, stats, skip_bad=True)
    assert len(kept) == 2 and "p.jsonl:2 (chosen): the chat template does not render tools" in stats.skipped[0]


def test_truncation_is_counted_by_side_and_a_cut_prompt_drops_the_pair(cfg, tokenizer):
    long = " ".join(["word"] * 60)
    rows = [
        {"prompt": "A?", "chosen": long, "rejected": "Red."},
        {"prompt": "A?", "chosen": "Blue.", "rejected": long},
        {"prompt": "A?", "chosen": long, "rejected": long + " more"},
        {"prompt": long, "chosen": "Blue.", "rejected": "Red."},
        {"prompt": "A?", "chosen": "Blue.", "rejected": "Red."},
    ]
    data = build_preference_data(cfg(rows, cutoff_len=30), tokenizer)
    assert data.stats.truncated == {"chosen": 1, "rejected": 1, "both": 1}
    assert data.stats.dropped == {"prompt longer than cutoff_len": 1}
    assert [(s.chosen.truncated, s.rejected.truncated) for s in data.train] == [
        (True, False),
        (False, True),
        (True, True),
        (False, False),
    ]
    assert all(len(s.chosen.input_ids) <= 30 and s.chosen.n_trained for s in data.train)
    assert data.stats.pairs == 4 and data.stats.prompt_lengths["max"] < 30
    assert json.loads(json.dumps(data.stats.to_json()))["truncated"] == {"chosen": 1, "rejected": 1, "both": 1}


def test_kto_kl_side_is_the_prompt_with_the_next_examples_completion(cfg, tokenizer):
    rows = [{"prompt": f"Q{i}?", "completion": f"Answer {i}.", "label": i % 2 == 0} for i in range(3)]
    data = build_preference_data(cfg(rows, stage="kto"), tokenizer)
    for i, sample in enumerate(data.train):
        assert runs(tokenizer, sample.chosen) == [f"Answer {i}.<|im_end|>"]
        assert runs(tokenizer, sample.kl) == [f"Answer {(i + 1) % 3}.<|im_end|>"]
        assert f"Q{i}?" in tokenizer.decode(sample.kl.input_ids)
    assert (data.stats.desirable, data.stats.undesirable) == (2, 1)
    # a pair read as two examples: the KL side passes over the same prompt's other completion
    pairs = [{"prompt": f"Q{i}?", "chosen": f"Good {i}.", "rejected": f"Bad {i}."} for i in range(2)]
    data = build_preference_data(cfg(pairs, stage="kto"), tokenizer)
    assert [runs(tokenizer, s.kl)[0] for s in data.train] == [f"Good {j}.<|im_end|>" for j in (1, 1, 0, 0)]


def test_val_size_holds_out_records_as_sft_does(cfg, tokenizer):
    rows = [{"prompt": f"Q{i}?", "chosen": f"Yes {i}.", "rejected": f"No {i}."} for i in range(10)]
    data = build_preference_data(cfg(rows, val_size=0.2, seed=3), tokenizer)
    held = held_out(10, 0.2, 3)
    assert [s.source.rsplit(":", 1)[1] for s in data.eval] == [str(i + 1) for i in range(10) if held[i]]
    assert (len(data.train), len(data.eval), data.stats.pairs, data.stats.eval_pairs) == (8, 2, 8, 2)
    kto = build_preference_data(cfg(rows, val_size=0.2, seed=3, stage="kto"), tokenizer)
    assert (len(kto.train), len(kto.eval)) == (16, 4)  # both examples of a pair on the same side
    assert {s.source.split(" ")[0] for s in kto.eval} == {s.source for s in data.eval}


def test_conversation_train_from_shifts_with_an_added_system_prompt(tokenizer):
    conv = Conversation(history()[1:] + [Message("assistant", "Green.")], train_from=3)
    assert conv.with_defaults("Be brief.", None).train_from == 4
    assert runs(tokenizer, Encoder(tokenizer, system="Be brief.").encode(conv)) == ["Green.<|im_end|>"]
