"""Fuzzed inputs: random and malformed files and records never give a traceback or a hang.

Every input either gives valid samples or one TunelabError that names the file, line or record; the
label mask of every valid sample obeys the exactness rule (see test_encode.py): the trained tokens of
each assistant turn are exactly its content plus the end-of-turn tokens that follow, nothing else.

Hypothesis runs a fixed, derandomized number of examples per property, so CI is reproducible and the
file stays well under a minute. Plain regressions for the bugs the fuzzer found close the file; each
is also an explicit @example of its property.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import re
import signal
from contextlib import contextmanager

import pytest
import real_tokenizers
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tunelab.constants import IGNORE_INDEX
from tunelab.data.conversation import Conversation, Message
from tunelab.data.encode import Encoder, special_tokens
from tunelab.data.formats import FIELDS, detect_format, to_conversation
from tunelab.data.readers import Record, read_records
from tunelab.data.templates import BUILTIN
from tunelab.errors import TunelabError

SRC = "fuzz/dätä set.jsonl:7"
HANG_S = 30  # an example running this long is a hang


def fuzz(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )


@contextmanager
def no_hang(seconds: int = HANG_S):
    if not hasattr(signal, "SIGALRM"):  # Windows: no alarm, no guard
        yield
        return

    def fail(*_):
        raise AssertionError(f"no answer after {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# --- strategies ---------------------------------------------------------------------------------------------

ODD = [
    "\x00",
    "\u200f",
    "\u202e",
    "\u0301",
    "e\u0301",
    "\U0001f469\u200d\U0001f467",
    "\u2028",
    "\u2029",
    "\x85",
    "中文",
    "海蓝色",
    "\u200b",
    "\u200d",
    "\ufeff",
    "\t",
    "\r\n",
    "\n",
    " ",
    "  ",
    "\\",
    '"',
    "{{ x }}",
    "{% endfor %}",
    "user",
    "assistant",
    "model",
    "x",
    " x ",
    "say x please",
    "<think>",
    "</think>",
    "### Response:\n",
    "[INST]",
    "<tool_call>",
]
# text the tokenizers read as special tokens (or nearly)
SPECIAL_LOOKALIKES = [
    "<|im_end|>",
    "<|im_start|>assistant\n",
    "<|endoftext|>",
    "<end_of_turn>",
    "<start_of_turn>model\n",
    "<|eot_id|>",
    "<|start_header_id|>",
    "</s>",
    "<eos>",
    "<|im_end",
    "im_end|>",
    "< |im_end| >",
]
HUGE = "huge field, " * 8_500  # ~100k characters
LONE_SURROGATES = ["\ud800", "a\udfffb"]  # not in UTF-8 files, but JSON "\ud800" escapes give them
DEEP = [[[[[[[[[[[["deep"]]]]]]]]]]]]
for _ in range(200):
    DEEP = [DEEP]


@st.composite
def weighted(draw, *choices):
    """One of `choices`, given as (weight, strategy); shrinks towards the first."""
    pick = draw(st.integers(0, sum(w for w, _ in choices) - 1))
    for w, strategy in choices:
        if pick < w:
            return draw(strategy)
        pick -= w


chars = st.characters(blacklist_categories=("Cs",))  # surrogates come from LONE_SURROGATES only
piece = st.one_of(st.sampled_from(ODD), st.text(chars, max_size=8))
plain_text = st.lists(piece, min_size=1, max_size=4).map("".join)
tricky_text = st.lists(st.one_of(piece, st.sampled_from(SPECIAL_LOOKALIKES)), min_size=1, max_size=4).map("".join)
text = weighted(
    (16, plain_text), (2, tricky_text), (1, st.just("")), (1, st.just(HUGE)), (1, st.sampled_from(LONE_SURROGATES))
)

scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), plain_text)
garbage = st.recursive(
    scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(plain_text, inner, max_size=3)),
    max_leaves=8,
)
wrong = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.binary(max_size=4),
    st.lists(plain_text, max_size=2),
    st.dictionaries(plain_text, plain_text, max_size=2),
    st.just(DEEP),
)

RECORD_KEYS = [
    "instruction",
    "input",
    "output",
    "response",
    "context",
    "text",
    "messages",
    "conversations",
    "system",
    "history",
    "tools",
    "question",
    "answer",
    "id",
]
TURN_KEYS = ["role", "content", "from", "value", "name", "reasoning_content", "tool_calls", "speaker", "says"]
COLUMNS = [None, {"instruction": "question", "output": "answer"}, {"role": "speaker", "content": "says"}]


@st.composite
def broken(draw, fields: dict, extra_keys: list[str], valid_weight: int = 12) -> dict:
    """A dict with each field valid, missing or of a wrong type, plus extra keys holding garbage."""
    data = {}
    for key, valid in fields.items():
        kind = draw(st.sampled_from(["valid"] * valid_weight + ["missing", "wrong"]))
        if kind == "valid":
            data[key] = draw(valid)
        elif kind == "wrong":
            data[key] = draw(wrong)
    extra_key = st.one_of(st.sampled_from(extra_keys), plain_text)
    extra = draw(weighted((3, st.just({})), (1, st.dictionaries(extra_key, garbage, max_size=2))))
    return {**extra, **data} if draw(st.booleans()) else {**data, **extra}


text_parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), max_size=2)
odd_parts = st.lists(broken({"type": st.sampled_from(["text", "image"]), "text": text}, ["image_url"], 3), max_size=2)
content = weighted((12, text), (2, text_parts), (1, odd_parts))


@st.composite
def turns(draw, role_key: str, content_key: str, names: dict[str, str]) -> list:
    """A turn list: mostly system? user assistant (user assistant)*, sometimes roles in any order."""
    if draw(weighted((3, st.just(True)), (1, st.just(False)))):
        roles = (["system"] if draw(st.booleans()) else []) + ["user", "assistant"] * draw(st.integers(1, 3))
    else:
        roles = draw(st.lists(st.sampled_from(["system", "user", "assistant", "tool", "gpt", "bot", ""]), max_size=5))
    out = []
    for role in roles:
        if draw(weighted((30, st.just(False)), (1, st.just(True)))):
            out.append(draw(wrong))  # a turn that is not an object at all
            continue
        out.append(
            draw(broken({role_key: st.just(names.get(role, role)), content_key: content}, TURN_KEYS, valid_weight=40))
        )
    return out


SHAREGPT_NAMES = {"user": "human", "assistant": "gpt", "tool": "observation"}
history = st.lists(weighted((6, st.tuples(text, text).map(list)), (1, wrong)), max_size=2)

records = weighted(
    (3, broken({"instruction": text, "input": text, "output": text, "system": text, "history": history}, RECORD_KEYS)),
    (2, broken({"instruction": text, "context": text, "response": text, "category": text}, RECORD_KEYS)),
    (4, broken({"conversations": turns("from", "value", SHAREGPT_NAMES), "system": text}, RECORD_KEYS)),
    (4, broken({"messages": turns("role", "content", {}), "tools": st.lists(garbage, max_size=2)}, RECORD_KEYS)),
    (1, broken({"text": text}, RECORD_KEYS)),
    (1, st.dictionaries(st.one_of(st.sampled_from(RECORD_KEYS), plain_text), garbage, max_size=4)),
)


# --- the exactness rule -------------------------------------------------------------------------------------


def segments(tok, sample) -> list[tuple[bool, str]]:
    """The sample as maximal runs of (trained?, decoded text)."""
    out: list[tuple[bool, list[int]]] = []
    for tid, label in zip(sample.input_ids, sample.labels):
        trained = label != IGNORE_INDEX
        if out and out[-1][0] == trained:
            out[-1][1].append(tid)
        else:
            out.append((trained, [tid]))
    return [
        (trained, tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
        for trained, ids in out
    ]


def trained_runs(tok, sample) -> list[str]:
    return [text for trained, text in segments(tok, sample) if trained]


def strings_in(value) -> list[str]:
    out, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple)):
            stack += item
        elif isinstance(item, str):
            out.append(item)
    return out


def assert_markup_only(encoder: Encoder, conv: Conversation, sample) -> None:
    """Special ids come from the template alone: as many of each as it writes with message text emptied of them.

    (The templates fuzzed here never branch on message text, so their markup does not depend on it.)
    """
    tok = encoder.tokenizer
    specials = special_tokens(tok)
    pattern = re.compile("|".join(map(re.escape, specials)))

    def scrub(value):
        if isinstance(value, str):
            return pattern.sub("", value)
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value

    if sample.truncated:
        return
    markup = tok.apply_chat_template(scrub(conv.template_messages()), tools=scrub(conv.tools), tokenize=False)
    want = sorted(tok.convert_tokens_to_ids(m.group()) for m in pattern.finditer(markup))
    special_ids = {tok.convert_tokens_to_ids(t) for t in specials}
    assert sorted(t for t in sample.input_ids if t in special_ids) == want, "message text was read as control tokens"


def assert_mask_exact(encoder: Encoder, conv: Conversation, sample) -> None:
    """The exactness rule, checked independently of the encoder by rendering and decoding.

    The decoded sample is the rendered conversation; each run of trained tokens starts exactly where the
    prompt of an assistant turn (rendered on its own, with the generation prompt) ends, and holds that
    answer (as written, or trimmed as templates that trim render it) and end-of-turn tokens, then maybe
    the next answer(s) when nothing lies between. (The templates fuzzed here put the answer right after
    the generation prompt.)
    """
    tok = encoder.tokenizer
    assert len(sample.input_ids) == len(sample.labels) > 0
    assert all(label in (IGNORE_INDEX, tid) for tid, label in zip(sample.input_ids, sample.labels))
    if conv.text is not None or encoder.train_on == "all":
        assert sample.labels == sample.input_ids
        return
    assert_markup_only(encoder, conv, sample)
    if sample.truncated:
        return  # a truncated sample is checked as a prefix of the whole one
    normalizer = tok.backend_tokenizer.normalizer
    norm = normalizer.normalize_str if normalizer is not None else (lambda s: s)
    messages = conv.template_messages()

    def render(msgs, generation_prompt=False):
        return norm(
            tok.apply_chat_template(msgs, tools=conv.tools, tokenize=False, add_generation_prompt=generation_prompt)
        )

    parts = segments(tok, sample)
    assert "".join(text for _, text in parts) == render(messages), "the ids are not the rendered conversation"
    runs, at = [], 0
    for trained, text in parts:
        if trained:
            runs.append((at, text))
        at += len(text)
    todo = [(len(render(messages[:i], True)), i) for i in conv.assistant_indices]
    if encoder.train_on == "last":
        todo = todo[-1:]
    eot = re.compile("(?:" + "|".join(map(re.escape, encoder.eot_tokens)) + ")+")
    specials = special_tokens(tok)
    for start, text in runs:
        pos = 0
        # A plain-text token of the prompt that runs into the answer is trained with it (encode's rule);
        # it holds prompt text, never markup.
        lead = todo[0][0] - start if todo else 0
        if 0 < lead < len(text) and not any(t in text[:lead] for t in specials):
            pos = lead
        while todo and start + pos == todo[0][0]:
            c = conv.messages[todo[0][1]].text
            forms = [
                f
                for f in dict.fromkeys(norm(f) for f in (c, c.strip(), c.lstrip(), c.rstrip()))
                if text.startswith(f, pos) and eot.match(text, pos + len(f))
            ]
            assert forms, f"trained run {text[pos : pos + 80]!r} is not answer {c[:80]!r} + {encoder.eot_tokens}"
            pos = eot.match(text, pos + len(forms[0])).end()
            todo.pop(0)
        assert pos == len(text) and pos, f"trained text outside an answer: {text[pos : pos + 80]!r} at {start + pos}"
    assert not todo, f"answers not trained: {[conv.messages[i].text[:60] for _, i in todo]}"


# --- 1. readers: any bytes -> records or one error naming the file (and line) ---------------------------------


def _csv_text(rows: list[list[str]]) -> str:
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue()


json_records = st.lists(weighted((4, records), (1, garbage)), max_size=4)
MUTATIONS = ["truncate", "bom", "crlf", "invalid-utf8", "nul", "nest", "big-int", "blank-lines"]
BAD_BYTES = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xe2\x82", b"\x80\x80", b"\xf4\x90\x80\x80"]


@st.composite
def data_files(draw) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from([".jsonl", ".jsonl", ".json", ".json", ".csv", ".csv", ".parquet"]))
    if draw(weighted((5, st.just(False)), (1, st.just(True)))):
        return suffix, draw(st.binary(max_size=300))
    ascii_only = draw(st.booleans())
    rows = draw(json_records)
    if suffix == ".jsonl":
        body = "\n".join(json.dumps(r, ensure_ascii=ascii_only, default=repr) for r in rows)
    elif suffix == ".json":
        body = json.dumps(
            draw(st.sampled_from([rows, {"version": 1, "data": rows}, {"a": rows, "b": rows}])),
            ensure_ascii=ascii_only,
            default=repr,
        )
    else:  # csv, and parquet files that are not parquet
        width = draw(st.integers(1, 3))
        body = _csv_text(
            [
                draw(st.lists(st.one_of(plain_text, st.just(HUGE * 2)), min_size=0, max_size=width + 1))
                for _ in range(draw(st.integers(1, 5)))
            ]
        )
    raw = body.encode("utf-8", "surrogatepass")  # a lone surrogate written raw is invalid UTF-8
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=2)):
        at = draw(st.integers(0, len(raw)))
        if mutation == "truncate":
            raw = raw[:at]
        elif mutation == "bom":
            raw = b"\xef\xbb\xbf" + raw
        elif mutation == "crlf":
            raw = raw.replace(b"\n", b"\r\n")
        elif mutation in ("invalid-utf8", "nul"):
            raw = raw[:at] + (draw(st.sampled_from(BAD_BYTES)) if mutation == "invalid-utf8" else b"\x00") + raw[at:]
        elif mutation == "nest":
            raw = raw[:at] + b'{"a": ' + b"[" * 100_000 + raw[at:]
        elif mutation == "big-int":
            raw = raw[:at] + b"9" * 5000 + raw[at:]
        else:
            raw = raw[:at] + b"\n\n  \n" + raw[at:]
    return suffix, raw


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz files")


@fuzz(300)
@given(file=data_files())
@example(file=(".json", b"[" * 100_000))
@example(file=(".jsonl", b'{"n": ' + b"1" * 5000 + b"}"))
@example(file=(".csv", b"instruction,output\nq,a,surplus\n"))
@example(file=(".csv", b"text\n" + b"x" * 200_000 + b"\n"))
@example(file=(".jsonl", b'{"text": "a"}\n\xff\n'))
def test_any_file_gives_records_or_one_error_naming_it(fuzz_dir, file):
    suffix, raw = file
    path = fuzz_dir / f"dätä file{suffix}"
    path.write_bytes(raw)
    try:
        with no_hang():
            records = read_records(str(path))
    except TunelabError as exc:
        message = str(exc)
        assert message.startswith(str(path)), message
        line = re.match(re.escape(str(path)) + r":(\d+):", message)
        if line:
            assert 1 <= int(line.group(1)) <= max(raw.count(b"\n"), len(raw.splitlines())) + 1, message
        if suffix == ".jsonl" and "not UTF-8" not in message:
            assert line, f"a JSONL error names the line: {message}"
        return
    for record in records:
        assert isinstance(record, Record) and isinstance(record.data, dict)
        assert record.source.startswith((f"{path}:", f"{path}[")), record.source
        assert all(isinstance(key, str) for key in record.data), record.data.keys()


# --- tokenizers and encoders shared by properties 2 and 3 ---------------------------------------------------

STYLE_TOKENS = {
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "gemma": ["<start_of_turn>", "<end_of_turn>"],
}
# gemma-3 and llama-3.2 trim answers; qwen2.5 renders them as written (and renders tools and tool calls)
REAL = ["qwen2.5-instruct", "llama-3.2-3b-instruct", "gemma-3-4b-it"]


@pytest.fixture(scope="module")
def encoder_for(tokenizer, tmp_path_factory):
    """encoder_for(template, train_on, cutoff_len): the test tokenizer with a built-in template, or a real
    tokenizer from ../shared/tokenizers (skipped when absent); loaded once per module."""
    tokenizers: dict = {}
    encoders: dict = {}

    def get(name: str, train_on: str = "assistant", cutoff_len: int | None = None) -> Encoder:
        if name not in tokenizers:
            if name in BUILTIN:
                tok = copy.deepcopy(tokenizer)
                if name in STYLE_TOKENS:
                    tok.add_special_tokens(
                        {"additional_special_tokens": STYLE_TOKENS[name]}, replace_extra_special_tokens=False
                    )
                tok.chat_template = BUILTIN[name]
            elif real_tokenizers.available(name):
                tok = real_tokenizers.load(name, tmp_path_factory.mktemp(name))
            else:
                pytest.skip(f"../shared/tokenizers/{name} not present")
            tokenizers[name] = tok
        key = (name, train_on, cutoff_len)
        if key not in encoders:
            encoders[key] = Encoder(tokenizers[name], train_on, cutoff_len)
        return encoders[key]

    return get


# --- 2. formats + encode: any record -> a sample with an exact mask, or one error naming the record ------------


def _case(**kw):
    return dict(dict(fmt=None, columns=None, system=None, train_on="assistant", cutoff=None), **kw)


@pytest.mark.parametrize("template", ["chatml", "qwen2.5-instruct"])
def test_any_record_gives_an_exact_sample_or_one_error_naming_it(encoder_for, template):
    encoder_for(template)  # skips before hypothesis starts when a real tokenizer is absent

    @fuzz(400)
    @given(
        data=records,
        fmt=weighted((6, st.none()), (1, st.sampled_from(list(FIELDS)))),
        columns=weighted((8, st.none()), (1, st.sampled_from(COLUMNS[1:]))),
        system=st.sampled_from([None, "Answer briefly.", "<|im_end|>"]),
        train_on=st.sampled_from(["assistant", "last", "all"]),
        cutoff=st.sampled_from([None, 1, 9, 40]),
    )
    @example(**_case(data={"instruction": "q", "output": "a", None: ["surplus"]}))
    @example(**_case(data={"messages": [{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "a"}]}))
    @example(
        **_case(data={"messages": [{"role": "user", "content": "hi<|im_end|>"}, {"role": "assistant", "content": "a"}]})
    )
    @example(**_case(data={"text": "a\udfffb"}, train_on="all"))
    @example(
        **_case(
            data={
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": {"a": 1}}]},
                    {"role": "assistant", "content": "a"},
                ]
            }
        )
    )
    def check(data, fmt, columns, system, train_on, cutoff):
        record = Record(data, SRC)
        encoder = encoder_for(template, train_on)
        try:
            with no_hang():
                conv = to_conversation(record, fmt or detect_format(record, columns), columns, system)
                sample = encoder.encode(conv)
                cut = encoder_for(template, train_on, cutoff).encode(conv)
        except TunelabError as exc:
            assert SRC in str(exc), str(exc)
            return
        assert cut.input_ids == sample.input_ids[:cutoff] and cut.labels == sample.labels[:cutoff]
        assert cut.truncated == (cutoff is not None and len(sample.input_ids) > cutoff)
        if template != "chatml" and any(m.tool_calls for m in conv.messages):
            # templates that render tool calls put them between the content and the end of turn; the rule
            # (content + the end-of-turn tokens that follow) does not cover that case yet
            return
        assert_mask_exact(encoder, conv, sample)

    check()


# --- 3. exactness across templates: built-in ones and real ones when ../shared/tokenizers has them ------------

# A small shared pool, so that the same text often shows up in several turns (an answer equal to part of a
# later question, an answer that a trimming template renders differently, a "<think>" in an answer ...).
POOL = [
    "x",
    " x ",
    "say x please",
    "\n",
    " ",
    "user",
    "model",
    "assistant",
    "Seven.",
    "<think>",
    "</think>",
    "### Response:\n",
    "\u2028",
    "e\u0301",
    "中文",
    "\x00",
    "\u200f",
    "\U0001f469\u200d\U0001f467",
    "\ufeff",
    "[/INST]",
    "{{",
    "}}",
]
chat_text = st.lists(
    weighted((12, st.sampled_from(POOL)), (6, st.text(chars, max_size=5)), (2, st.sampled_from(SPECIAL_LOOKALIKES))),
    max_size=4,
).map("".join)
padding = st.sampled_from([" ", "\n", "  ", "\t", "\u3000"])
padded_text = st.tuples(padding, chat_text, padding).map("".join)


@st.composite
def conversations(draw) -> Conversation:
    messages = [Message("system", draw(chat_text))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 4))):
        question = draw(chat_text)
        answers = [m.content for m in messages if m.role == "assistant"]
        if answers and draw(weighted((2, st.just(False)), (1, st.just(True)))):  # quotes an earlier answer
            words = st.sampled_from(["say", "Seven.", "中文", "x"])  # not whitespace, which templates may trim
            question = f"{draw(words)}{draw(st.sampled_from(answers))}{draw(words)}"
        messages.append(Message("user", question, input=draw(st.one_of(st.none(), chat_text)) or None))
        if draw(weighted((7, st.just(False)), (1, st.just(True)))):  # roles out of order
            messages.append(Message(draw(st.sampled_from(["user", "assistant", "tool"])), draw(chat_text)))
        messages.append(Message("assistant", draw(weighted((2, chat_text), (1, padded_text)))))
    return Conversation(messages, source=SRC)


@pytest.mark.parametrize("template", [*BUILTIN, *REAL])
def test_every_encoded_conversation_masks_exactly(encoder_for, template):
    encoder_for(template)  # skips before hypothesis starts when a real tokenizer is absent

    @fuzz(150)
    @given(conv=conversations(), train_on=st.sampled_from(["assistant", "last"]))
    @example(
        conv=Conversation(
            [
                Message("user", "hi"),
                Message("assistant", " x "),
                Message("user", "say x please"),
                Message("assistant", "ok"),
            ],
            source=SRC,
        ),
        train_on="assistant",
    )
    @example(
        conv=Conversation([Message("user", "hi"), Message("assistant", "\nthink ")], source=SRC), train_on="assistant"
    )
    def check(conv, train_on):
        encoder = encoder_for(template, train_on)
        try:
            with no_hang():
                sample = encoder.encode(conv)
        except TunelabError as exc:
            assert SRC in str(exc), str(exc)
            return
        assert_mask_exact(encoder, conv, sample)

    check()


# --- regressions: the bugs the fuzzer found, as plain examples ------------------------------------------------


def _error(spec) -> str:
    with pytest.raises(TunelabError) as info:
        read_records(str(spec))
    return str(info.value)


@pytest.mark.parametrize("name, raw", [("deep.json", b"[" * 100_000), ("deep.jsonl", b'{"a": 1}\n' + b"[" * 100_000)])
def test_json_nested_too_deeply_is_one_error_not_a_recursion_error(tmp_path, name, raw):
    path = tmp_path / name
    path.write_bytes(raw)
    where = f"{path}:2" if name.endswith("l") else str(path)
    assert _error(path) == f"{where}: malformed JSON (nested too deeply)"


def test_json_integer_over_python_digit_limit_is_one_error(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text('{"text": "a"}\n{"n": ' + "7" * 5000 + "}\n", encoding="utf-8")
    assert _error(path).startswith(f"{path}:2: malformed JSON (Exceeds the limit")


def test_csv_row_with_more_fields_than_the_header_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "wide.csv"
    path.write_text("instruction,output\nq,a\nq,a,surplus\n", encoding="utf-8")
    # used to become a record with the key None, which then crashed format detection (sorting keys)
    assert _error(path) == f"{path}:3: row has 3 fields but the header has 2"


def test_csv_field_over_the_csv_module_default_limit_is_read(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("text\n" + "x" * 200_000 + "\n", encoding="utf-8")
    assert read_records(str(path))[0].data == {"text": "x" * 200_000}


@pytest.mark.parametrize(
    "row",
    [
        {"text": "a\\ud800b"},
        {"messages": [{"role": "user", "content": "\\udfff"}, {"role": "assistant", "content": "a"}]},
    ],
)
def test_lone_surrogate_from_a_json_escape_is_refused_naming_the_record(tmp_path, tokenizer, row):
    path = tmp_path / "escaped.jsonl"
    path.write_text('{"text": "fine"}\n' + json.dumps(row).replace("\\\\u", "\\u") + "\n", encoding="utf-8")
    record = read_records(str(path))[1]
    conv = to_conversation(record, detect_format(record))
    with pytest.raises(TunelabError, match=re.escape(f"{path}:2: ") + ".*lone surrogate"):
        Encoder(tokenizer).encode(conv)  # used to be a TypeError from the tokenizer


@pytest.mark.parametrize("role", ["user", "assistant", "system"])
def test_special_token_typed_into_a_message_is_plain_text(tokenizer, role):
    """'<|im_end|>' in content stays the characters it is: the turn structure is the template's alone."""
    messages = [Message("user", "q"), Message("assistant", "a")]
    if role == "system":
        messages.insert(0, Message("system", "be <|im_start|>brief"))
    else:
        target = messages[0 if role == "user" else 1]
        target.content += " <|im_end|>\n<|im_start|>assistant\n"
    conv = Conversation(messages, source=SRC)
    encoder = Encoder(tokenizer)
    sample = encoder.encode(conv)
    assert sample.literal_text
    assert_markup_only(encoder, conv, sample)
    assert_mask_exact(encoder, conv, sample)


def test_text_part_whose_text_is_not_a_string_is_an_error():
    data = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": {"nested": 1}}]},
            {"role": "assistant", "content": "a"},
        ]
    }
    with pytest.raises(TunelabError, match=re.escape(SRC) + r": message 0 content: .*must be a string"):
        to_conversation(Record(data, SRC), "messages")  # used to train on the text "{'nested': 1}"


TRIMMING = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_answer_of_a_trimming_template_is_not_found_in_a_later_question(tokenizer):
    """' x ' renders as 'x'; the answer used to be looked up as ' x ' and found in 'say x please'."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TRIMMING
    conv = Conversation(
        [
            Message("user", "hi"),
            Message("assistant", " x "),
            Message("user", "say x please"),
            Message("assistant", "ok"),
        ],
        source=SRC,
    )
    encoder = Encoder(tok)
    assert trained_runs(tok, encoder.encode(conv)) == ["x<|endoftext|>", "ok<|endoftext|>"]


@pytest.mark.parametrize("family", ["gemma-3-4b-it", "llama-3.2-3b-instruct"])
def test_real_trimming_templates_train_the_answer_not_the_question(tmp_path, family):
    if not real_tokenizers.available(family):
        pytest.skip(f"../shared/tokenizers/{family} not present")
    tok = real_tokenizers.load(family, tmp_path)
    conv = Conversation(
        [
            Message("user", "hi"),
            Message("assistant", " x "),
            Message("user", "say x please"),
            Message("assistant", "ok"),
        ],
        source=SRC,
    )
    runs = trained_runs(tok, Encoder(tok).encode(conv))
    assert len(runs) == 2 and runs[0].startswith("x<") and runs[1].startswith("ok<")
