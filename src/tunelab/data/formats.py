"""Data formats (alpaca, dolly, sharegpt, messages, text) -> `Conversation`.

Tool use and reasoning ride in the message formats: OpenAI `tools` / `tool_calls` / role `tool` /
`reasoning_content`, the glaive layout's `function_call` / `observation` turns, and typed content
parts (`text`, `reasoning`, `tool_call`) as LLaMA-Factory's newer data writes them.

The format is detected from the first record's keys unless `dataset_format` names it; `columns`
maps our field names to the file's (e.g. `{instruction: question, output: answer}`, or
`{role: from, content: value}` for the message keys).
"""

from __future__ import annotations

from typing import Any

from ..errors import TunelabError
from .conversation import ROLES, Conversation, Message
from .readers import Record
from .reasoning import split_think
from .tools import link_calls, parse_calls, parse_tools

FIELDS = {
    "alpaca": ("instruction", "output"),
    "dolly": ("instruction", "response"),
    "sharegpt": ("conversations",),
    "messages": ("messages",),
    "text": ("text",),
}
# Either turn list key is accepted for both message formats; the format's own name is tried first.
TURN_KEYS = {"sharegpt": ("conversations", "messages"), "messages": ("messages", "conversations")}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}


def detect_format(record: Record, columns: dict | None = None) -> str:
    data = _rename(record.data, columns)
    for key in ("messages", "conversations"):
        turns = data.get(key)
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):
            return "sharegpt" if ("from" in turns[0] or "value" in turns[0]) else "messages"
    if "instruction" in data and "response" in data:
        return "dolly"
    if "instruction" in data and "output" in data:
        return "alpaca"
    if "text" in data:
        return "text"
    raise TunelabError(
        f"{record.source}: cannot tell the data format from keys {sorted(map(str, data))}; expected alpaca "
        "(instruction, output), dolly (instruction, response), sharegpt (conversations), messages "
        "(messages) or text (text); set dataset_format and columns to map other names"
    )


def to_conversation(
    record: Record, fmt: str, columns: dict | None = None, system: str | None = None, tools: list[dict] | None = None
) -> Conversation:
    """`tools`: the config's file-level tools, for records that carry none of their own."""
    data = _rename(record.data, columns)
    src = record.source
    turns = next((data[k] for k in TURN_KEYS.get(fmt, ()) if data.get(k) is not None), None)
    missing = [k for k in FIELDS[fmt] if data.get(k) is None and (fmt not in TURN_KEYS or turns is None)]
    if missing:
        raise TunelabError(f"{src}: missing field '{missing[0]}' ({fmt} records need {', '.join(FIELDS[fmt])})")
    if fmt == "text":
        return Conversation(text=_string(data, "text", src), source=src)
    if fmt == "alpaca":
        messages = _alpaca(data, src)
    elif fmt == "dolly":
        messages = [
            Message("user", _string(data, "instruction", src), input=_optional(data, "context", src) or None),
            Message("assistant", _string(data, "response", src)),
        ]
    else:
        messages = _turns(turns, fmt, src, columns)
        if fmt == "sharegpt" and data.get("system") and messages and messages[0].role != "system":
            messages.insert(0, Message("system", _string(data, "system", src)))
    conv = Conversation(messages, tools=parse_tools(data.get("tools"), src), source=src).with_defaults(system, tools)
    _check_order(conv.messages, src)
    link_calls(conv.messages, conv.tools, src)
    return conv


def to_conversations(
    records: list[Record],
    fmt: str,
    columns: dict | None = None,
    system: str | None = None,
    tools: list[dict] | None = None,
    skip_bad: bool = False,
) -> tuple[list[Conversation], list[int], list[str]]:
    """(conversations, the index of each one's record, the errors of the records left out).

    A record that is not a valid conversation stops the read, or with `skip_bad` is left out."""
    conversations, kept, skipped = [], [], []
    for i, record in enumerate(records):
        try:
            conversations.append(to_conversation(record, fmt, columns, system, tools))
            kept.append(i)
        except TunelabError as exc:
            if not skip_bad:
                raise
            skipped.append(str(exc))
    return conversations, kept, skipped


def _rename(data: dict, columns: dict | None) -> dict:
    if not columns:
        return data
    out = dict(data)
    for ours, theirs in columns.items():
        if ours in ("role", "content"):
            continue
        if theirs in data:
            out[ours] = data[theirs]
    return out


def _string(data: dict, key: str, src: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise TunelabError(f"{src}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _optional(data: dict, key: str, src: str) -> str:
    return "" if data.get(key) is None else _string(data, key, src)


def _alpaca(data: dict, src: str) -> list[Message]:
    messages = []
    if data.get("system"):
        messages.append(Message("system", _string(data, "system", src)))
    history = data.get("history") or []
    if not isinstance(history, list):
        raise TunelabError(f"{src}: field 'history' must be a list of [user, assistant] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise TunelabError(f"{src}: history[{i}] must be a [user, assistant] pair of strings")
        messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    messages.append(Message("user", _string(data, "instruction", src), input=_optional(data, "input", src) or None))
    messages.append(Message("assistant", _string(data, "output", src)))
    return messages


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


PART_TYPES = ("text", "reasoning", "tool_call")


def _content(value: Any, src: str, i: int) -> tuple[str, str | None, list[dict]]:
    """(text, reasoning, tool calls) of a message's content: a string, or a list of typed parts
    (OpenAI `{"type": "text", "text"}`, or `{"type", "value"}` parts that may also be reasoning or a call)."""
    if isinstance(value, str):
        return value, None, []
    if value is None:
        return "", None, []
    if not isinstance(value, list) or not all(isinstance(p, dict) and p.get("type") in PART_TYPES for p in value):
        raise TunelabError(
            f"{src}: message {i} content must be a string or a list of parts typed {', '.join(PART_TYPES)}"
        )
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[dict] = []
    for j, part in enumerate(value):
        body = part.get("text", part.get("value", ""))
        if part["type"] == "tool_call":
            calls += parse_calls(body, f"{src}: message {i} part {j}")
            continue
        if not isinstance(body, str):
            raise TunelabError(f"{src}: message {i} content: the 'text' of each text part must be a string")
        (thoughts if part["type"] == "reasoning" else texts).append(body)
    return "".join(texts), "\n\n".join(thoughts) if thoughts else None, calls


def _turns(turns: Any, fmt: str, src: str, columns: dict | None) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise TunelabError(f"{src}: expected a non-empty list of messages")
    role_key = (columns or {}).get("role", "from" if fmt == "sharegpt" else "role")
    content_key = (columns or {}).get("content", "value" if fmt == "sharegpt" else "content")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn:
            raise TunelabError(f"{src}: message {i} must be an object with '{role_key}' and '{content_key}'")
        raw_role = turn[role_key]
        if fmt == "sharegpt":
            role = SHAREGPT_ROLES.get(raw_role) if isinstance(raw_role, str) else None
            allowed = "system, human, gpt (or user, assistant, observation)"
        else:
            role = raw_role if raw_role in ROLES else None
            allowed = ", ".join(ROLES)
        if role is None:
            raise TunelabError(f"{src}: message {i} has unknown role {_short(raw_role)}; allowed: {allowed}")
        if raw_role == "function_call" and fmt == "sharegpt":
            text, _, _ = _content(turn.get(content_key), src, i)
            calls = parse_calls(text, f"{src}: message {i} (function_call)")
            messages.append(Message("assistant", "", tool_calls=calls or None))
            continue
        messages.append(message_from_dict(turn, src, i, role, content_key))
    return _merge_calls(messages)


def message_from_dict(
    turn: dict, src: str, i: int = 0, role: str | None = None, content_key: str = "content"
) -> Message:
    """One OpenAI-shaped message as a `Message`: the single reading that training data, chat history and the
    server's requests share, so a history sent back renders as training rendered it. Content is a string or
    typed parts; a leading `<think>` block, `reasoning_content` and reasoning parts are the reasoning; tool-call
    arguments may be an object or a JSON string. `role`: the role already mapped (sharegpt names), else read."""
    role = turn.get("role") if role is None else role
    if role not in ROLES:
        raise TunelabError(f"{src}: message {i} has unknown role {_short(role)}; allowed: {', '.join(ROLES)}")
    text, reasoning, calls = _content(turn.get(content_key), src, i)
    msg = Message(role, text)
    for key in ("reasoning_content", "tool_call_id", "name"):
        value = turn.get(key)
        if value is not None and not isinstance(value, str):
            raise TunelabError(f"{src}: message {i} {key} must be a string, not {type(value).__name__}")
        if value is not None:
            setattr(msg, key, value)
    if turn.get("tool_calls") is not None:
        calls += parse_calls(turn["tool_calls"], f"{src}: message {i} tool_calls")
    if role == "assistant":
        thought, msg.content = split_think(msg.content)
        msg.reasoning_content = "\n\n".join(r for r in (msg.reasoning_content, reasoning, thought) if r) or None
        msg.tool_calls = calls or None
    elif calls:
        raise TunelabError(f"{src}: message {i} ({role}) holds tool calls; only assistant messages may")
    return msg


def _merge_calls(messages: list[Message]) -> list[Message]:
    """An assistant text turn followed by a turn of only its tool calls (the sharegpt layout) is one turn."""
    out: list[Message] = []
    for m in messages:
        prev = out[-1] if out else None
        if (
            prev is not None
            and prev.role == m.role == "assistant"
            and m.tool_calls
            and not prev.tool_calls
            and not m.content
            and not m.reasoning_content
        ):
            prev.tool_calls = m.tool_calls
            continue
        out.append(m)
    return out


def _check_order(messages: list[Message], src: str) -> None:
    body = messages[1:] if messages and messages[0].role == "system" else messages
    if any(m.role == "system" for m in body):
        raise TunelabError(f"{src}: a system message may only come first")
    if not body or body[0].role != "user":
        raise TunelabError(f"{src}: the conversation must start with a user message (after an optional system)")
    if body[-1].role != "assistant":
        raise TunelabError(f"{src}: the conversation must end with an assistant message")
    for i, m in enumerate(messages):
        if m.role == "assistant" and not m.content.strip() and not m.tool_calls and not m.reasoning_content:
            raise TunelabError(f"{src}: message {i} (assistant) is empty")
