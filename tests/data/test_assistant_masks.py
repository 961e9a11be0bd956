"""tunelab's trained positions against transformers' own `return_assistant_tokens_mask`, on the
`{% generation %}`-marked training templates TRL ships for models we hold, where such a template renders
exactly as the model's own.

Two conventions differ, and the reference is narrowed by them before comparing: what the generation
prompt writes (`<|im_start|>assistant\n`'s newline, DeepSeek's `<｜Assistant｜>`, Phi-3's `<|assistant|>`)
is prompt, since inference feeds it; and a turn ends with its end-of-turn token, since generation stops
there (TRL's markers also take the newline, or Phi-3's closing `<|endoftext|>`, after it)."""

from __future__ import annotations

import copy

import pytest
import real_tokenizers

from tunelab.data.conversation import Conversation, Message
from tunelab.data.encode import Encoder

pytestmark = pytest.mark.fast  # a pure unit: `make test-fast` runs it


EOT = {
    "qwen2.5-instruct": "<|im_end|>",
    "deepseek-r1-distill-qwen": "<｜end▁of▁sentence｜>",
    "phi-3-mini-4k-instruct": "<|end|>",
    "gemma-3-4b-it": "<end_of_turn>",
}
PAIRS = {
    "qwen2.5-instruct": "qwen2_5_training.jinja",
    "deepseek-r1-distill-qwen": "deepseek_r1_distill_training.jinja",
    "phi-3-mini-4k-instruct": "phi3_training.jinja",
    "gemma-3-4b-it": "gemma3_training.jinja",
}
CALL = {"type": "function", "id": "c1", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
CHATS = {
    "two turns": [
        Message("system", "Be brief."),
        Message("user", "A colour?"),
        Message("assistant", "Ocean blue."),
        Message("user", "A number?"),
        Message("assistant", "Seven."),
    ],
    "padded": [
        Message("user", " x "),
        Message("assistant", "  starts with spaces"),
        Message("user", "more?"),
        Message("assistant", "ends with a newline\n"),
    ],
    "tool call": [
        Message("user", "Weather in Oslo?"),
        Message("assistant", "", tool_calls=[CALL]),
        Message("tool", "-3", tool_call_id="c1"),
        Message("assistant", "It is -3 °C."),
    ],
}


@pytest.mark.parametrize(
    "family, chat",
    [(f, c) for f in sorted(PAIRS) for c in sorted(CHATS) if c != "tool call" or f == "qwen2.5-instruct"],
)  # the one with tools
def test_trained_positions_equal_transformers_assistant_masks(family, chat, tmp_path):
    if not real_tokenizers.available(family):
        pytest.skip(f"../shared/tokenizers/{family} not present")
    marked = real_tokenizers.trl_template(PAIRS[family])
    if marked is None:
        pytest.skip(f"trl (with its {PAIRS[family]}) is not installed")
    tok = real_tokenizers.load(family, tmp_path)
    conv = Conversation(CHATS[chat], source="t:1")
    trl = copy.deepcopy(tok)
    trl.chat_template = marked
    messages = conv.template_messages()
    assert trl.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages, tokenize=False)
    out = trl.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    (sample,) = Encoder(tok).samples(conv)
    ids = out["input_ids"]
    assert sample.input_ids == ids
    theirs = [bool(m) for m in out["assistant_masks"]]
    for i in conv.assistant_indices:  # the generation prompt's tokens are prompt
        prompt = tok(
            tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True), add_special_tokens=False
        )["input_ids"]
        shared = next((k for k, (a, b) in enumerate(zip(prompt, ids)) if a != b), min(len(prompt), len(ids)))
        at = shared - 1
        while at >= 0 and theirs[at]:  # the marked run's part that the prompt wrote
            theirs[at] = False
            at -= 1
    eot = tok.convert_tokens_to_ids(EOT[family])
    for k in range(1, len(ids)):  # nothing after the end-of-turn token in the same marked run
        if theirs[k] and ids[k - 1] == eot:
            j = k
            while j < len(ids) and theirs[j]:
                theirs[j] = False
                j += 1
    ours = [label != -100 for label in sample.labels]
    assert ours == theirs, [(tok.decode([t]), a, b) for t, a, b in zip(ids, ours, theirs) if a != b]
    assert any(ours)
