"""Fuzzed tool-call and reasoning conversations on the real tool / thinking templates.

Every record either gives samples or one TunelabError naming it. For every sample, checked against
`apply_chat_template` alone (no tunelab code in the oracle): its ids are the tokenizer's ids of the
rendering of the whole conversation, or of the conversation cut after the turn it trains; no token of a
system, user or tool-result text is trained; every answer, every call and (per the reasoning rule)
every thought the rule keeps is trained in some sample or counted as lost; a thought the rule drops is
nowhere; each trained run ends in
an end-of-turn token. Texts carry unique markers (USER3, THOUGHT1, fn_2 ...) so the oracle can find them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunelab.constants import IGNORE_INDEX
from tunelab.data.encode import Encoder
from tunelab.data.formats import detect_format, to_conversation
from tunelab.data.readers import Record
from tunelab.errors import TunelabError

_spec = importlib.util.spec_from_file_location("fuzz_helpers", Path(__file__).with_name("test_fuzz.py"))
_fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fuzz)
SRC, fuzz, no_hang, real_tokenizers = _fuzz.SRC, _fuzz.fuzz, _fuzz.no_hang, _fuzz.real_tokenizers

FAMILIES = ["qwen2.5-instruct", "qwen3", "llama-3.2-3b-instruct", "mistral-v3"]
NATIVE = {"qwen3"}  # templates with a reasoning field; the others get reasoning inline, as documented


@st.composite
def agent_records(draw) -> dict:
    """An OpenAI-style record: turns of text, reasoning (a field or a <think> block), calls and results."""
    messages = [{"role": "system", "content": "SYSTEM0 be useful."}] if draw(st.booleans()) else []
    names, k = [], 0
    for turn in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": f"USER{turn} question?"})
        for step in range(draw(st.integers(0, 2)) + 1):
            k += 1
            thought = f"THOUGHT{k} let me see." if draw(st.booleans()) else None
            calls = draw(st.integers(0, 2)) if step == 0 else 0
            answer = f"ANSWER{k} done." if not calls or draw(st.booleans()) else ""
            message = {"role": "assistant", "content": answer}
            if thought and draw(st.booleans()):
                message["content"] = f"<think>\n{thought}\n</think>\n\n{answer}"
            elif thought:
                message["reasoning_content"] = thought
            if calls:
                batch = [f"fn_{k}_{j}" for j in range(calls)]
                names += batch
                args = {"city": f"city{k}"}
                message["tool_calls"] = [
                    {
                        "type": "function",
                        "function": {"name": n, "arguments": json.dumps(args) if draw(st.booleans()) else args},
                    }
                    for n in batch
                ]
                # every other calling turn carries the client's own ids, its results answering in reverse order
                # (derived, not drawn: the examples stay those the thresholds below were set on)
                with_ids = k % 2 == 0
                if with_ids:
                    for j, call in enumerate(message["tool_calls"]):
                        call["id"] = f"c{k:04d}x{j:03d}"
            messages.append(message)
            if calls:
                results = [{"role": "tool", "content": f"RESULT{k}_{j} ok"} for j in range(calls)]
                if with_ids:
                    for j, result in enumerate(results):
                        result["tool_call_id"] = f"c{k:04d}x{j:03d}"
                    results.reverse()
                messages += results
                if draw(st.booleans()):
                    continue
                k += 1
                messages.append({"role": "assistant", "content": f"ANSWER{k} from the result."})
            break
        if messages[-1]["role"] != "assistant":
            k += 1
            messages.append({"role": "assistant", "content": f"ANSWER{k} final."})
    tools = [
        {
            "type": "function",
            "function": {"name": n, "description": f"tool {n}", "parameters": {"type": "object", "properties": {}}},
        }
        for n in names
    ]
    if draw(st.integers(0, 9)) == 0:  # a broken record: one of the errors tools data can hold
        fault = draw(st.sampled_from(["bad-json", "unknown-tool", "orphan-result"]))
        if fault == "bad-json" and names:
            call = next(m for m in messages if m.get("tool_calls"))["tool_calls"][0]
            call["function"]["arguments"] = '{"city": '
        elif fault == "unknown-tool" and names:
            tools = tools[1:] or [{"type": "function", "function": {"name": "other"}}]
            if names[0] in {t["function"]["name"] for t in tools}:
                tools = [{"type": "function", "function": {"name": "other"}}]
        else:
            messages.insert(1 if messages[0]["role"] == "user" else 2, {"role": "tool", "content": "RESULT orphan"})
    return {"messages": messages, "tools": tools} if tools else {"messages": messages}


def _runs(sample) -> list[list[int]]:
    out, run = [], []
    for tid, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE_INDEX:
            run.append(tid)
        elif run:
            out, run = out + [run], []
    return out + ([run] if run else [])


def _as_rendered(messages: list[dict], rule: str, native: bool) -> list[dict]:
    """The messages the template gets under `rule`: the documented rule, written out independently."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    out = []
    for i, m in enumerate(messages):
        thought = m.get("reasoning_content")
        m = {k: v for k, v in m.items() if k != "reasoning_content"}
        if thought and (rule == "keep" or (rule == "last" and i == last)):
            if native:
                m["reasoning_content"] = thought
            else:
                m["content"] = f"<think>\n{thought}\n</think>\n\n{m['content']}"
        out.append(m)
    return out


def _oracle(tok, conv, samples, rule: str, eot_ids, native: bool) -> None:
    texts = []
    switch = {"enable_thinking": False} if rule == "drop" and "enable_thinking" in tok.chat_template else {}
    for sample in samples:
        cut = int(sample.source.rsplit(" turn ", 1)[1]) + 1 if sample.own_turn else len(conv.messages)
        messages = _as_rendered(conv.template_messages(), rule, native)[:cut]
        rendered = tok.apply_chat_template(messages, tools=conv.tools, tokenize=False, **switch)
        assert sample.input_ids == tok(rendered, add_special_tokens=False)["input_ids"]
        runs = []
        for ids in _runs(sample):
            run = tok.decode(ids)
            assert "USER" not in run and "SYSTEM" not in run and "RESULT" not in run, run
            assert ids[-1] in eot_ids, run
            runs.append(run)
        texts.append("".join(runs))
        whole = tok.decode(sample.input_ids)
        if rule == "drop":
            assert "THOUGHT" not in whole
    trained = "".join(texts)
    last = max(i for i, m in enumerate(conv.messages) if m.role == "assistant")
    missing = 0  # kept thinking the template cannot show (Llama 3 writes only the call of a calling turn)
    for i, m in enumerate(conv.messages):
        if m.role != "assistant":
            continue
        if m.content:
            assert m.content in trained, m.content
        for call in m.tool_calls or ():
            assert call["function"]["name"] in trained
        if m.reasoning_content and (rule == "keep" or (rule == "last" and i == last)):
            missing += m.reasoning_content not in trained
        elif m.reasoning_content:
            assert m.reasoning_content not in trained, (rule, m.reasoning_content)
    assert missing == sum(s.reasoning_lost for s in samples), "every kept thought is trained or counted as lost"


@pytest.mark.parametrize("family", FAMILIES)
def test_any_agent_record_gives_exact_samples_or_one_error_naming_it(family, tmp_path_factory):
    if not real_tokenizers.available(family):
        pytest.skip(f"../shared/tokenizers/{family} not present")
    tok = real_tokenizers.load(family, tmp_path_factory.mktemp(family))
    encoders = {rule: Encoder(tok, reasoning=rule) for rule in ("keep", "last", "drop")}
    outcomes = {"samples": 0, "errors": 0}

    @fuzz(40)
    @given(data=agent_records(), rule=st.sampled_from(["keep", "last", "drop"]))
    def check(data, rule):
        record = Record(data, SRC)
        encoder = encoders[rule]
        try:
            with no_hang():
                conv = to_conversation(record, detect_format(record))
                samples = encoder.samples(conv)
        except TunelabError as exc:
            assert SRC in str(exc), str(exc)
            outcomes["errors"] += 1
            return
        outcomes["samples"] += 1
        _oracle(tok, conv, samples, rule, set(encoder.eot_ids), family in NATIVE)

    check()
    assert outcomes["samples"] >= 10, outcomes  # the strategy mostly makes records a template can train
