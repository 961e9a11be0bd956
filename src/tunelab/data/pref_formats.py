"""Preference records (DPO pairs, KTO examples) in the layouts TRL and LLaMA-Factory write -> `PreferenceRecord`.

The layout is told per record from its keys, so files written by different tools can be mixed:

- messages: `messages` (the prompt's turns) + `chosen` / `rejected`, each a list of messages, one message or a
  string; sharegpt: the same with `conversations` of `{from, value}` turns (LLaMA-Factory's dpo_en_demo);
- alpaca: `instruction`, `input`, optional `system` / `history`, and `chosen` / `rejected` strings;
- trl: `prompt` + `chosen` / `rejected`, conversational or strings; trl implicit prompt: only `chosen` /
  `rejected`, whole conversations whose common first messages are the prompt;
- KTO, unpaired: `prompt` / `completion` / `label` (TRL), or `messages` (or `conversations`) + `label` where
  every turn after the last user turn is the completion (LLaMA-Factory's kto_en_demo).

Messages are read exactly as SFT reads them (`formats.message_from_dict`), so reasoning and tool calls in a
completion train as they would in an SFT answer. `columns` renames fields as it does for SFT;
`dataset_format` names SFT layouts and is not read here.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import TunelabError
from .conversation import Conversation, Message
from .formats import _alpaca, _rename, _short, _turns, message_from_dict
from .readers import read_records
from .tools import link_calls, parse_tools

if TYPE_CHECKING:
    from ..config import Config

PAIRED = ("messages", "sharegpt", "alpaca", "trl", "trl implicit prompt")
UNPAIRED = ("trl kto", "messages kto", "sharegpt kto")
TURN_KEYS = ("messages", "conversations")


class Counts(Protocol):
    """What reading counts into (preference.PreferenceStats), named here so the two modules import one way."""

    records: Counter

    def count_skipped(self, errors: list[str]) -> None: ...


@dataclass
class PreferenceRecord:
    prompt: Conversation  # ends with a user or tool turn; the config's system and tools applied
    chosen: list[Message]  # KTO: the completion, whether desirable or not
    rejected: list[Message] | None = None
    label: bool | None = None  # KTO: whether `chosen` is a desirable completion
    source: str = ""

    def side(self, completion: list[Message], source: str) -> Conversation:
        """The prompt followed by `completion`, only the completion's assistant turns trained.

        Copies, so that the call ids `link_calls` writes never leak from one side (or KL pairing) to another."""
        messages = copy.deepcopy(self.prompt.messages + completion)
        link_calls(messages, self.prompt.tools, source)
        return Conversation(messages, tools=self.prompt.tools, source=source, train_from=len(self.prompt.messages))


def read_groups(
    cfg: "Config", specs: list[str], stats: "Counts", tools: list[dict] | None = None
) -> list[list[PreferenceRecord]]:
    """The preference records of each file record: one, or two for a pair under stage kto (kept together so a
    held-out split never puts one prompt on both sides). A bad record stops the read, or under
    `bad_records: skip` is counted and left out; an unpaired record under stage dpo always stops it, since
    that is the config's mistake, not the record's."""
    groups, skipped = [], []
    for spec in specs:
        for record in read_records(spec, cfg.model_hub):
            data = _rename(record.data, cfg.columns)
            try:
                fmt = detect(data, record.source)
            except TunelabError as exc:
                if cfg.bad_records != "skip":
                    raise
                stats.records["unknown"] += 1
                skipped.append(str(exc))
                continue
            stats.records[fmt] += 1
            if fmt in UNPAIRED and cfg.stage != "kto":
                raise TunelabError(
                    f"{record.source}: an unpaired example ({fmt}: a completion with a 'label', no chosen/rejected) "
                    f"cannot train stage {cfg.stage}; use stage: kto"
                )
            try:
                groups.append(parse(record.source, data, fmt, cfg, tools))
            except TunelabError as exc:
                if cfg.bad_records != "skip":
                    raise
                skipped.append(str(exc))
    stats.count_skipped(skipped)
    return groups


def detect(data: dict, src: str) -> str:
    turns_key = next((k for k in TURN_KEYS if isinstance(data.get(k), list)), None)
    paired = "chosen" in data or "rejected" in data
    if "label" in data and not paired:
        if "completion" in data:
            return "trl kto"
        if turns_key:
            return f"{_style(data[turns_key])} kto"
    if paired:
        if turns_key:
            return _style(data[turns_key])
        if "instruction" in data:
            return "alpaca"
        return "trl" if "prompt" in data else "trl implicit prompt"
    raise TunelabError(
        f"{src}: cannot tell the preference format from keys {sorted(map(str, data))}; expected chosen and "
        "rejected with messages, conversations, instruction or prompt (or alone, as whole conversations), "
        "or a KTO example: prompt/completion/label, or messages/conversations with a label"
    )


def parse(src: str, data: dict, fmt: str, cfg: "Config", tools: list[dict] | None) -> list[PreferenceRecord]:
    if fmt in UNPAIRED:
        prompt, completion = _unpaired(src, data, fmt, cfg.columns)
        label = _label(data.get("label"), src)
    elif fmt == "trl implicit prompt":
        prompt, chosen, rejected = _implicit(src, data, cfg.columns)
    else:
        prompt = _prompt(src, data, fmt, cfg.columns)
        chosen = _side(data.get("chosen"), src, "chosen", cfg.columns)
        rejected = _side(data.get("rejected"), src, "rejected", cfg.columns)
    conv = Conversation(prompt, tools=parse_tools(data.get("tools"), src), source=src)
    conv = conv.with_defaults(cfg.system, tools)
    _check_prompt(conv.messages, src)
    if fmt in UNPAIRED:
        records = [PreferenceRecord(conv, _checked(completion, src, "completion"), None, label, src)]
    else:
        chosen, rejected = _checked(chosen, src, "chosen"), _checked(rejected, src, "rejected")
        if chosen == rejected:
            raise TunelabError(f"{src}: chosen and rejected are the same completion, so the pair prefers nothing")
        if cfg.stage == "kto":
            records = [
                PreferenceRecord(conv, chosen, None, True, f"{src} (chosen)"),
                PreferenceRecord(conv, rejected, None, False, f"{src} (rejected)"),
            ]
        else:
            records = [PreferenceRecord(conv, chosen, rejected, None, src)]
    for record in records:  # the tool-call flow is checked now, so a bad record is found while reading
        record.side(record.chosen, record.source)
        if record.rejected is not None:
            record.side(record.rejected, record.source)
    return records


def _style(turns: list) -> str:
    first = turns[0] if turns and isinstance(turns[0], dict) else {}
    return "sharegpt" if ("from" in first or "value" in first) else "messages"


def _messages(value: Any, src: str, field: str, columns: dict | None) -> list[Message]:
    """A field holding a list of messages, one message, or a string (one turn of `role`, by the field)."""
    if value is None or value == "" or value == [] or value == {}:
        raise TunelabError(f"{src}: field '{field}' is missing or empty")
    if isinstance(value, str):
        role = "user" if field == "prompt" else "assistant"
        return [message_from_dict({"role": role, "content": value}, f"{src} ({field})")]
    turns = [value] if isinstance(value, dict) else value
    if not isinstance(turns, list):
        raise TunelabError(
            f"{src}: field '{field}' must be a string, a message or a list of messages, got {type(value).__name__}"
        )
    return _turns(turns, _style(turns), f"{src} ({field})", columns)


def _side(value: Any, src: str, field: str, columns: dict | None) -> list[Message]:
    if value is None or value == "" or value == [] or value == {}:
        raise TunelabError(f"{src}: field '{field}' is missing or empty; a preference pair needs chosen and rejected")
    return _messages(value, src, field, columns)


def _prompt(src: str, data: dict, fmt: str, columns: dict | None) -> list[Message]:
    if fmt == "alpaca":
        return _alpaca({**data, "output": ""}, src)[:-1]
    if fmt == "trl":
        return _messages(data.get("prompt"), src, "prompt", columns)
    key = next(k for k in TURN_KEYS if isinstance(data.get(k), list))
    return _with_system(_turns(data[key], fmt, src, columns), data, src)


def _with_system(messages: list[Message], data: dict, src: str) -> list[Message]:
    system = data.get("system")
    if system and (not messages or messages[0].role != "system"):
        if not isinstance(system, str):
            raise TunelabError(f"{src}: field 'system' must be a string, got {type(system).__name__}")
        messages.insert(0, Message("system", system))
    return messages


def _implicit(src: str, data: dict, columns: dict | None) -> tuple[list[Message], list[Message], list[Message]]:
    """TRL's implicit prompt: the messages both conversations open with. Where that shared start ends in an
    assistant turn (both sides make the same tool call, then differ), the prompt ends at the last user or tool
    turn before it, so both completions start with an assistant turn."""
    chosen = _side(data.get("chosen"), src, "chosen", columns)
    rejected = _side(data.get("rejected"), src, "rejected", columns)
    if not (isinstance(data["chosen"], list) and isinstance(data["rejected"], list)):
        raise TunelabError(
            f"{src}: without a 'prompt', chosen and rejected must be whole conversations (lists of messages) "
            "that share their first messages"
        )
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n and chosen[n - 1].role not in ("user", "tool"):
        n -= 1
    if not n:
        raise TunelabError(f"{src}: chosen and rejected share no prompt (no user turn both start with)")
    return chosen[:n], chosen[n:], rejected[n:]


def _unpaired(src: str, data: dict, fmt: str, columns: dict | None) -> tuple[list[Message], list[Message]]:
    if fmt == "trl kto":
        return _messages(data.get("prompt"), src, "prompt", columns), _messages(
            data.get("completion"), src, "completion", columns
        )
    key = next(k for k in TURN_KEYS if isinstance(data.get(k), list))
    messages = _with_system(_turns(data[key], fmt.split()[0], src, columns), data, src)
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    if last_user < 0 or last_user == len(messages) - 1:
        raise TunelabError(
            f"{src}: field '{key}' must end with the completion: assistant turns after its last user turn"
        )
    return messages[: last_user + 1], messages[last_user + 1 :]


def _label(value: Any, src: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise TunelabError(f"{src}: field 'label' must be true or false, got {_short(value)}")


def _check_prompt(messages: list[Message], src: str) -> None:
    body = messages[1:] if messages and messages[0].role == "system" else messages
    if any(m.role == "system" for m in body):
        raise TunelabError(f"{src}: prompt: a system message may only come first")
    if not body or body[0].role != "user":
        raise TunelabError(f"{src}: the prompt must start with a user message (after an optional system)")
    if body[-1].role not in ("user", "tool"):
        raise TunelabError(
            f"{src}: the prompt must end with a user or tool turn, not {body[-1].role} (the completion answers it)"
        )
    for i, m in enumerate(messages):
        if m.role == "assistant" and not (m.content.strip() or m.tool_calls or m.reasoning_content):
            raise TunelabError(f"{src}: prompt message {i} (assistant) is empty")


def _checked(completion: list[Message], src: str, field: str) -> list[Message]:
    """A completion is what the model writes after the prompt: assistant turns, with the tool results its own
    calls brought back between them, ending with an assistant turn."""
    if completion[0].role != "assistant":
        raise TunelabError(f"{src}: field '{field}' must start with an assistant turn, not {completion[0].role}")
    if completion[-1].role != "assistant":
        raise TunelabError(f"{src}: field '{field}' must end with an assistant turn, not {completion[-1].role}")
    for i, m in enumerate(completion):
        if m.role not in ("assistant", "tool"):
            raise TunelabError(
                f"{src}: field '{field}' message {i} is a {m.role} turn; a completion holds only assistant "
                "turns and tool results"
            )
        if m.role == "assistant" and not (m.content.strip() or m.tool_calls or m.reasoning_content):
            raise TunelabError(f"{src}: field '{field}' message {i} (assistant) is empty")
    return completion
