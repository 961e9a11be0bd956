"""Reasoning (thinking) in assistant turns: where it comes from and which of it a sample keeps.

Reasoning arrives as `reasoning_content` (OpenAI / Qwen3 / DeepSeek style) or as a `<think>...</think>`
block opening the content; both become `reasoning_content`, so a template that renders reasoning
itself (Qwen3) gets it where it expects it. The rule (`reasoning: keep | last | drop`) then decides
which turns still carry it when rendered:

- keep: every turn's reasoning; a turn whose reasoning the template drops from history is trained in
  a sample of its own (see `turns`), so nothing the model should write is lost;
- last: only the last assistant turn's; earlier turns as the template renders history;
- drop: none, and `enable_thinking=False` for templates with that switch, so an empty think block the
  generation prompt writes is prompt, as at inference with thinking off.

A template that never renders `reasoning_content` (Qwen2.5, Llama 3) gets it inline as a
`<think>` block at the start of the content: the text a model of that family writes when it thinks.

A template that cuts both from what it renders but whose generation prompt opens a think block (the
DeepSeek-R1 distills: history is `<｜Assistant｜>answer`, the prompt ends `<｜Assistant｜><think>\n`) is
`prompted`: a turn keeping its reasoning is trained in the form the model writes it at inference, the
prompt with its opened block, then the reasoning, `\n</think>\n\n` and the answer (see
`Encoder.render`). Only a template that shows reasoning in no way loses it; the data report counts those.
"""

from __future__ import annotations

import re

_THINK = re.compile(r"\A\s*<think>(.*?)</think>\s*", re.DOTALL)
_PROBE = "tunelab-probe-reasoning"


def split_think(content: str) -> tuple[str | None, str]:
    """(reasoning, answer) from content that opens with a `<think>...</think>` block; (None, content) otherwise."""
    m = _THINK.match(content)
    if m is None:
        return None, content
    return m.group(1).strip("\n"), content[m.end() :]


def inline(reasoning: str, content: str) -> str:
    return f"<think>\n{reasoning}\n</think>\n\n{content}"


def has_switch(tokenizer) -> bool:
    """Whether the template reads `enable_thinking` (Qwen3 and its kin)."""
    return "enable_thinking" in (getattr(tokenizer, "chat_template", None) or "")


def _renders(tokenizer, message: dict) -> bool:
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, message], tokenize=False)
    except Exception:
        return False
    return _PROBE in text


def mode(tokenizer) -> str:
    """How the template can show reasoning: `native` (reads reasoning_content), `inline` (keeps a think
    block in the content), `prompted` (shows none, but its generation prompt opens a think block) or `none`."""
    if _renders(tokenizer, {"role": "assistant", "content": "ok", "reasoning_content": _PROBE}):
        return "native"
    if _renders(tokenizer, {"role": "assistant", "content": inline(_PROBE, "ok")}):
        return "inline"
    try:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        )
    except Exception:
        return "none"
    return "prompted" if prompt.rstrip().endswith("<think>") else "none"


def native_turn(prompt: str, cut: str, reasoning: str) -> str | None:
    """The conversation `cut` (which the template rendered without its last turn's reasoning) as the model
    writes that turn at inference: `prompt` (the generation prompt before the turn, which opened the block),
    the rest of the block, then the answer as the template rendered it. None when `prompt` opens no block
    the answer could follow."""
    at = prompt.rfind("<think>")
    if at < 0 or not cut.startswith(prompt[:at]):
        return None
    block = inline(reasoning, cut[at:])  # the block the model writes, then the rendered answer
    opened = prompt[at:]  # what the generation prompt wrote of the block: '<think>\n'
    return prompt + block[len(opened) :] if block.startswith(opened) else None


def apply_rule(messages: list[dict], rule: str, how: str) -> tuple[list[dict], int]:
    """(template messages with reasoning kept per `rule` and shown the template's way `how`,
    the number of turns whose kept reasoning the template cannot show)."""
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    keep = set(assistants) if rule == "keep" else set(assistants[-1:]) if rule == "last" else set()
    out, lost = [], 0
    for i, m in enumerate(messages):
        reasoning = m.get("reasoning_content")
        if reasoning is None:
            out.append(m)
            continue
        m = {k: v for k, v in m.items() if k != "reasoning_content"}
        if i in keep and reasoning.strip():
            if how in ("native", "prompted"):  # a prompted template ignores the field: see Encoder.render
                m["reasoning_content"] = reasoning
            elif how == "inline":
                m["content"] = inline(reasoning, m.get("content") or "")
            else:
                lost += 1
        out.append(m)
    return out, lost
