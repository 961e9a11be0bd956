"""Where each assistant turn's answer lies in a rendered conversation, for any chat template.

An answer is what the model must write at inference: the conversation cut after turn i, rendered,
minus the generation prompt of the messages before it. So the answer starts where that prompt and
the cut rendering part (whatever the template writes after the prompt, a think block too, is the
answer's; what the prompt writes itself, like Qwen3's empty block under `enable_thinking=False`, is
prompt), and ends with the end-of-turn token(s) after its last text.

A turn trains inside the whole conversation when the whole rendering holds that cut rendering
unchanged. Otherwise (the template moves a system prompt, drops history reasoning, or renders a turn
differently once later turns follow) the turn becomes a sample of its own: the cut rendering, only
that turn trained. Under `reasoning: last | drop` earlier turns train as the template renders
history instead, when the generation prompt still leads to them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from ..errors import TunelabError
from .reasoning import split_think

Render = Callable[..., str]  # (messages, add_generation_prompt, plain=False) -> text


def common_prefix(a: str, b: str) -> int:
    """Length of the common start of two strings, by slice comparisons (C speed) rather than a loop
    over characters: one comparison when one string starts the other, as a prompt usually starts its turn."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n - 1  # a[:lo] == b[:lo] holds, a[:hi + 1] != b[:hi + 1]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class Turns:
    spans: list[tuple[int, int]] = field(default_factory=list)  # answers inside the whole rendering
    own: list[tuple[int, str, tuple[int, int]]] = field(default_factory=list)  # (message index, text, span)
    unrendered_reasoning: int = 0  # turns whose reasoning the template did not write


class TurnLocator:
    def __init__(self, eot_tokens: list[str], rule: str = "keep", expand: bool = True):
        self.eot_tokens = eot_tokens
        self._eot_re = re.compile("(?:" + "|".join(map(re.escape, eot_tokens)) + ")+") if eot_tokens else None
        self.rule = rule
        self.expand = expand

    def locate(self, render: Render, messages: list[dict], turns: list[int], full: str, source: str) -> Turns:
        out = Turns()
        for i in turns:
            prompt = render(messages[:i], True)
            cut = full if i == len(messages) - 1 else render(messages[: i + 1], False)
            start = common_prefix(prompt, cut)
            closed, end = self._end(cut, start)
            out.unrendered_reasoning += self._check(messages[i], cut[start:end], source, i)
            if full.startswith(cut[:closed]):  # the run of end tokens may differ: a closing eos is the cut's alone
                out.spans.append((start, self._run_end(full, closed, end)))
                continue
            history = self._as_history(render, messages, i, full) if self.rule != "keep" else None
            if history is not None:
                out.spans.append(history)
            elif self.expand:
                out.own.append((i, cut, (start, end)))
            else:
                raise TunelabError(
                    f"{source}: the chat template does not render turn by turn (assistant message {i} renders "
                    "differently once later turns follow, so its prompt is not a prefix of the whole "
                    "conversation); set expand_turns: true to train each such turn as a sample of its own"
                )
        return out

    def _as_history(self, render: Render, messages: list[dict], i: int, full: str) -> tuple[int, int] | None:
        for plain in (False, True):
            prompt = render(messages[:i], True, plain=plain)
            if full.startswith(prompt):
                m = self._eot_re.search(full, len(prompt)) if self._eot_re else None
                return len(prompt), m.end() if m else len(full)
        return None

    def _end(self, text: str, start: int) -> tuple[int, int]:
        """(after the first end-of-turn token, after its whole run) following the answer's last text."""
        body = len(text)
        while True:
            stripped = text[:body].rstrip()
            hit = next((t for t in self.eot_tokens if stripped.endswith(t) and len(stripped) - len(t) >= start), None)
            if hit is None:
                body = max(len(stripped), start)
                break
            body = len(stripped) - len(hit)
        m = self._eot_re.search(text, body) if self._eot_re else None
        if m is None:
            return body, body
        first = next(t for t in self.eot_tokens if text.startswith(t, m.start()))
        return m.start() + len(first), m.end()

    def _run_end(self, full: str, closed: int, end: int) -> int:
        m = self._eot_re.match(full, closed) if self._eot_re else None
        return m.end() if m else closed

    @staticmethod
    def _check(message: dict, answer: str, source: str, i: int) -> int:
        """Refuse an answer missing the turn's text or calls; 1 when only its reasoning is missing."""
        inline, content = split_think(message.get("content") or "")  # reasoning the rule put in the content
        content = content.strip()
        if content and content not in answer:
            raise TunelabError(
                f"{source}: the chat template did not render the content of assistant message {i} "
                "where it puts an answer"
            )
        reasoning = (message.get("reasoning_content") or inline or "").strip()
        # a call's name in the text or the thinking ("I'll call get_weather") is not the call rendered
        markup = answer.replace(content, "").replace(reasoning, "")
        for call in message.get("tool_calls") or ():
            name = call["function"]["name"]
            if name not in markup:
                raise TunelabError(
                    f"{source}: the chat template does not render the tool calls of assistant "
                    f"message {i} (no {name!r} in its answer); use a template with tool support"
                )
        return int(bool(reasoning) and reasoning[:64] not in answer)
