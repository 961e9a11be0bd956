"""Chat templates: the tokenizer's own (`template: auto`) or a built-in one for tokenizers without.

Built-ins are Jinja, like every Hugging Face chat template, and are written into the saved
tokenizer's `chat_template`, so inference renders the very prompt training saw.
"""

from __future__ import annotations

import json

from ..errors import TunelabError

CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

LLAMA3 = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

# Gemma has no system role: the system prompt opens the first user turn.
GEMMA = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content']"
    " + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

_INSTRUCTION = "'### Instruction:\\n' + (message['instruction'] if message['input'] is defined else message['content'])"

ALPACA = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- message['content'] + '\\n\\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- " + _INSTRUCTION + " -}}"
    "{%- if message['input'] is defined -%}{{- '\\n\\n### Input:\\n' + message['input'] -}}{%- endif -%}"
    "{{- '\\n\\n### Response:\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- message['content'] + eos_token + '\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# As in the dolly recipes: the Input section is always there, empty when the record has no context.
DOLLY = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- message['content'] + '\\n\\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- " + _INSTRUCTION + " -}}"
    "{{- '\\n\\n### Input:\\n' + (message['input'] if message['input'] is defined else '') -}}"
    "{{- '\\n\\n### Response:\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- message['content'] + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

BUILTIN = {"chatml": CHATML, "llama3": LLAMA3, "gemma": GEMMA, "alpaca": ALPACA, "dolly": DOLLY}

# Special tokens each built-in needs in the vocabulary (alpaca and dolly need only eos).
REQUIRED_TOKENS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "alpaca": (),
    "dolly": (),
}


def missing_tokens(tokenizer, name: str) -> list[str]:
    vocab = tokenizer.get_vocab()
    return [t for t in REQUIRED_TOKENS.get(name, ()) if t not in vocab]


def apply_template(tokenizer, name: str, model_name: str = "the model") -> str:
    """Set `tokenizer.chat_template` for `template: <name>` and return its name for the run record."""
    if name == "auto":
        if not getattr(tokenizer, "chat_template", None):
            raise TunelabError(
                f"template: 'auto' but {model_name} has no chat template (a base model?); "
                f"set template to one of {', '.join(BUILTIN)}"
            )
        return "auto"
    if tokenizer.eos_token is None:
        raise TunelabError(f"template: {name!r} needs an eos token, and the tokenizer of {model_name} has none")
    tokenizer.chat_template = BUILTIN[name]
    return name


def _literal(value) -> str:
    """`value` (JSON data) as a Jinja literal; strings as JSON strings, which Jinja's lexer reads back."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "none"}[value]
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(str(k))}: {_literal(v)}" for k, v in value.items()) + "}"
    return "[" + ", ".join(_literal(v) for v in value) + "]"


def with_run_defaults(
    template: str, system: str | None = None, tools: list[dict] | None = None, thinking: bool | None = None
) -> str:
    """`template` that applies a run's defaults itself, for engines that render alone (vLLM, a merged folder
    loaded by plain transformers): the trained system prompt when a conversation has none, the trained tools
    when a request sends none, the trained thinking switch when the caller does not set it."""
    head = ""
    if system:
        head += (
            "{%- if not (messages and messages[0]['role'] == 'system') -%}"
            f"{{%- set messages = [{{'role': 'system', 'content': {_literal(system)}}}] + messages -%}}"
            "{%- endif -%}"
        )
    if tools:
        head += f"{{%- if not tools -%}}{{%- set tools = {_literal(tools)} -%}}{{%- endif -%}}"
    if thinking is not None:
        head += (
            f"{{%- if enable_thinking is not defined -%}}{{%- set enable_thinking = {_literal(thinking)} -%}}"
            "{%- endif -%}"
        )
    return head + template


def default_system(tokenizer) -> str | None:
    """The system prompt the template writes for a conversation that has none (Qwen2.5's "You are Qwen, ..."),
    found by rendering with and without a system message; None when it writes none."""
    probe, user = "tunelab-probe-system", [{"role": "user", "content": "tunelab-probe-user"}]
    try:
        with_system = tokenizer.apply_chat_template([{"role": "system", "content": probe}, *user], tokenize=False)
        without = tokenizer.apply_chat_template(user, tokenize=False)
    except Exception:  # a template without a system role
        return None
    at = with_system.find(probe)
    if at < 0:
        return None
    head, tail = with_system[:at], with_system[at + len(probe) :]
    end = without.find(tail[: tail.find("tunelab-probe-user")], len(head)) if without.startswith(head) else -1
    return without[len(head) : end] or None if end > 0 else None
