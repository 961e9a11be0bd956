"""Tool definitions and tool calls, in the one shape chat templates expect.

Data arrives in several dialects: OpenAI (`{"type": "function", "function": {...}}` tools, calls with
`arguments` as a JSON string), the glaive / LLaMA-Factory sharegpt layout (bare function specs as a JSON
string, `function_call` turns holding `{"name", "arguments"}`), and Llama-3 style `parameters`. Every
one becomes OpenAI tools plus calls whose `arguments` is an object, which is what the Qwen, Llama and
Mistral templates render with `tojson` (a string there would be quoted twice). A malformed call is an
error naming the record, never a silently different training text.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import TunelabError


def _json(value: Any, what: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise TunelabError(f"{what} is not valid JSON ({exc.msg} at character {exc.pos}): {value[:80]!r}") from None


def parse_tools(value: Any, where: str) -> list[dict] | None:
    """A record's (or the config file's) tools as OpenAI function tools; empty -> None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    tools = _json(value, f"{where}: tools")
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise TunelabError(f"{where}: tools must be a list of function definitions, got {type(tools).__name__}")
    out = []
    for i, tool in enumerate(tools):
        spec = (
            tool.get("function")
            if isinstance(tool, dict)
            and tool.get("type", "function") == "function"
            and isinstance(tool.get("function"), dict)
            else tool
        )
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise TunelabError(f"{where}: tools[{i}] must be a function definition with a 'name'")
        out.append({"type": "function", "function": spec})
    return out or None


def tool_names(tools: list[dict] | None) -> set[str]:
    return {t["function"]["name"] for t in tools or ()}


def parse_call(value: Any, where: str) -> dict:
    """One call in OpenAI form, its arguments an object: from an OpenAI call, `{name, arguments}` or a JSON string."""
    call = _json(value, where)
    if not isinstance(call, dict):
        raise TunelabError(f"{where}: a tool call must be an object with 'name' and 'arguments'")
    fn: dict = call["function"] if isinstance(call.get("function"), dict) else call
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise TunelabError(f"{where}: the tool call has no function 'name'")
    raw = fn.get("arguments", fn.get("parameters", {}))
    args = _json(raw, f"{where}: the arguments of tool call {name!r}")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise TunelabError(
            f"{where}: the arguments of tool call {name!r} must be a JSON object, got {type(args).__name__}"
        )
    out = {"type": "function", "function": {"name": name, "arguments": args}}
    if isinstance(call.get("id"), str) and call["id"]:
        out["id"] = call["id"]
    return out


def parse_calls(value: Any, where: str) -> list[dict]:
    """A list of calls, or one call (sharegpt `function_call` turns hold one, or a JSON list of several)."""
    calls = _json(value, where)
    calls = calls if isinstance(calls, list) else [calls]
    if not calls:
        raise TunelabError(f"{where}: an empty list of tool calls")
    return [parse_call(c, f"{where} call {j}" if len(calls) > 1 else where) for j, c in enumerate(calls)]


def link_calls(messages: list, tools: list[dict] | None, src: str) -> None:
    """Give each call an id and each tool result the id of the call it answers, checking the flow.

    A result must follow the calls it answers (with only other results between), and a call must
    name a tool in `tools` when the record has any. Ids are nine characters, the one length every
    template we know accepts (Mistral's requires it).
    """
    names = tool_names(tools)
    pending: list[dict] = []
    count = 0
    for i, m in enumerate(messages):
        if m.role == "assistant" and m.tool_calls:
            for call in m.tool_calls:
                name = call["function"]["name"]
                if names and name not in names:
                    raise TunelabError(
                        f"{src}: message {i} calls tool {name!r}, which is not among the record's "
                        f"tools ({', '.join(sorted(names))})"
                    )
                count += 1
                call.setdefault("id", f"call{count:05d}")
            pending = list(m.tool_calls)
        elif m.role == "tool":
            if not pending:
                raise TunelabError(f"{src}: message {i} is a tool result with no tool call before it")
            match = next((c for c in pending if c["id"] == m.tool_call_id), None) if m.tool_call_id else None
            call = match or pending[0]
            pending.remove(call)
            m.tool_call_id = call["id"]
            m.name = m.name or call["function"]["name"]
        else:
            pending = []


def arguments_as_text(tokenizer) -> bool:
    """Whether the template wants `arguments` as a JSON string: DeepSeek's concatenates it, where the
    Qwen, Llama and Mistral templates run it through `tojson` (a string would be quoted twice)."""

    def renders(args) -> bool:
        call = {"type": "function", "id": "call00001", "function": {"name": "probe", "arguments": args}}
        try:
            tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]}],
                tokenize=False,
            )
        except Exception:
            return False
        return True

    return not renders({"x": 1}) and renders('{"x": 1}')


def with_text_arguments(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [
                dict(
                    c,
                    function=dict(c["function"], arguments=json.dumps(c["function"]["arguments"], ensure_ascii=False)),
                )
                for c in m["tool_calls"]
            ]
            m = dict(m, tool_calls=calls)
        out.append(m)
    return out
