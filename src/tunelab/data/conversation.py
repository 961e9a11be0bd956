"""The one conversation type every data format becomes and every template renders.

Messages are shaped like OpenAI chat messages so that tool calls (`tool_calls`, role `tool`) and
reasoning (`reasoning_content`) can ride along: chat templates that know those keys use them,
others ignore them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Message:
    role: str
    content: str
    # alpaca `input` / dolly `context`: kept apart so the alpaca and dolly templates can give it its
    # own section; every other template sees it appended to `content`.
    input: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        """The content as a template without an input section renders it."""
        return f"{self.content}\n\n{self.input}" if self.input else self.content

    def to_template(self) -> dict[str, Any]:
        # A turn of only tool calls keeps content "": transformers drops None-valued keys before rendering,
        # and a template then fails on the missing key instead of saying it has no tool support.
        out: dict[str, Any] = {"role": self.role, "content": self.text}
        if self.input:
            out["instruction"] = self.content
            out["input"] = self.input
        for key in ("reasoning_content", "tool_calls", "tool_call_id", "name"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass
class Conversation:
    messages: list[Message] = field(default_factory=list)
    # Raw text for continued pre-training (dataset_format: text): every token is trained, no template.
    text: str | None = None
    tools: list[dict] | None = None
    source: str = ""
    # Only assistant turns at this message index or later are trained: a preference side trains its
    # completion, never the assistant turns of the prompt it shares with the other side.
    train_from: int = 0

    def with_defaults(self, system: str | None, tools: list[dict] | None) -> "Conversation":
        """The run's rule for what a conversation lacks, the same in training and at inference: the
        configured system prompt when it has none, the configured tools when it carries none."""
        if self.text is not None or not (system or tools):
            return self
        messages, train_from = self.messages, self.train_from
        if system and (not messages or messages[0].role != "system"):
            messages, train_from = [Message("system", system), *messages], train_from + 1
        return Conversation(messages, self.text, self.tools or tools, self.source, train_from)

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template() for m in self.messages]

    @property
    def assistant_indices(self) -> list[int]:
        return [i for i, m in enumerate(self.messages) if m.role == "assistant"]
