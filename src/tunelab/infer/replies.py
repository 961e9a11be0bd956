"""A generated answer split the way its template wrote it: reasoning, text, and tool calls.

Tool calls come back in the format the model was taught by its own template: Qwen / Hermes
`<tool_call>{json}</tool_call>` blocks, Llama 3's bare `{"name", "parameters"}` object, Mistral's
`[TOOL_CALLS] [...]` list (its control token is dropped on decoding, the list stays). They are returned
as OpenAI tool calls, so a reply can go back into the conversation as the assistant turn it is.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ..data.tools import parse_call
from ..errors import TunelabError

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass
class Reply:
    content: str
    reasoning: str | None = None
    tool_calls: list[dict] = field(default_factory=list)

    def message(self) -> dict:
        """The reply as the assistant message of a conversation (OpenAI form)."""
        out: dict = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            out["reasoning_content"] = self.reasoning
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out


def _as_call(obj, k: int) -> dict | None:
    """A call the model wrote, or None when the object is not one (a call names its arguments)."""
    fn = obj.get("function") if isinstance(obj, dict) and isinstance(obj.get("function"), dict) else obj
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments", fn.get("parameters")), (dict, str)):
        return None
    try:
        call = parse_call(obj, "reply")
    except TunelabError:
        return None
    return {"id": call.pop("id", None) or f"call{k:05d}", **call}


def _json_calls(text: str, first: int = 1) -> list[dict] | None:
    """The calls in one JSON text, numbered from `first` where the model gave no ids (clients key results by id)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [_as_call(item, first + k) for k, item in enumerate(items)]
    return calls if calls and all(calls) else None


def parse_reply(text: str) -> Reply:
    """Reasoning first (a `<think>` block, or text up to `</think>` when the prompt opened the block), then
    tool calls; what is left is the answer's text."""
    reasoning = None
    head, sep, tail = text.partition("</think>")
    if sep:
        reasoning = head.split("<think>", 1)[-1].strip("\n")
        text = tail.lstrip("\n")
    blocks = _HERMES.findall(text)
    if blocks:
        found: list[dict] = []
        for block in blocks:
            group = _json_calls(block, len(found) + 1)
            if group is None:
                break
            found += group
        else:
            return Reply(_HERMES.sub("", text).strip(), reasoning, found)
    stripped = text.strip()
    if stripped[:1] in "{[" and (calls := _json_calls(stripped.removeprefix("[TOOL_CALLS]").strip())):
        return Reply("", reasoning, calls)
    return Reply(text, reasoning)
