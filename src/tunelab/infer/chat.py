"""Chat with a model folder, a full fine-tune, or base + LoRA adapter, exactly as training rendered."""

from __future__ import annotations

import json
import sys
import threading

import torch

from ..data.conversation import Conversation
from ..data.encode import Encoder
from ..data.formats import message_from_dict
from .load import load_inference, prompt_encoder, thinking_switch
from .replies import Reply, parse_reply


class ChatSession:
    """A conversation with one model, rendered by the same `Encoder` training used (tools included).

    think: True / False sets the template's `enable_thinking` (where it has that switch); None keeps
    what training did (`reasoning: drop` trained with thinking off).
    """

    def __init__(
        self,
        model,
        tokenizer,
        system: str | None = None,
        tools: list[dict] | None = None,
        encoder: Encoder | None = None,
        think: bool | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.encoder = encoder or Encoder(tokenizer)  # the run's: its system prompt, tools and reasoning rule
        self.template_kwargs = thinking_switch(tokenizer, think)
        self.system = system
        self.tools = tools
        self.history: list[dict] = []

    @classmethod
    def load(
        cls,
        model: str,
        adapter: str | None = None,
        system: str | None = None,
        trust_remote_code: bool = False,
        tools: list[dict] | None = None,
        think: bool | None = None,
    ) -> "ChatSession":
        """`model` may be a tunelab LoRA run folder on its own: its base comes from adapter_config.json."""
        im = load_inference(model, [adapter] if adapter else None, trust_remote_code=trust_remote_code)
        variant = im.variants[0]
        im.model.generation_config.eos_token_id = variant.stop_ids or None
        return cls(im.model, variant.tokenizer, system, tools, prompt_encoder(variant, im.base_path), think)

    @property
    def stop_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        return [] if ids is None else ids if isinstance(ids, list) else [ids]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        conv = Conversation(
            [message_from_dict(m, "chat", i) for i, m in enumerate(messages)], tools=self.tools, source="chat"
        )
        return self.encoder.prompt_ids(conv, **self.template_kwargs)

    def generate(self, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0, streamer=None) -> str:
        """The raw text of the next assistant turn (see `parse_reply` for its parts)."""
        ids = torch.tensor([self.prompt_ids(messages)], device=self.model.device)
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            eos_token_id=self.stop_ids or None,
            pad_token_id=self.tokenizer.pad_token_id or (self.stop_ids or [0])[0],
            do_sample=temperature > 0,
            streamer=streamer,
        )
        if temperature > 0:
            kwargs["temperature"] = temperature
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    def messages_for(self, prompt: str | None, history: list[dict]) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + history + ([{"role": "user", "content": prompt}] if prompt is not None else [])

    def ask(self, prompt: str, **kwargs) -> str:
        """One answer, no memory of earlier turns."""
        return self.generate(self.messages_for(prompt, []), **kwargs)

    def say(self, prompt: str, streamer=None, role: str = "user", **kwargs) -> Reply:
        """A turn in a multi-turn conversation (a user message, or a tool's result): the reply joins the history."""
        turn = {"role": role, "content": prompt}
        if role == "tool":
            calls = next((m.get("tool_calls") for m in reversed(self.history) if m["role"] == "assistant"), None)
            if not calls:
                raise ValueError("a tool result needs a tool call before it")
            turn.update(tool_call_id=calls[0]["id"], name=calls[0]["function"]["name"])
        messages = (
            self.messages_for(prompt, self.history)
            if role == "user"
            else (self.messages_for(None, self.history) + [turn])
        )
        reply = parse_reply(self.generate(messages, streamer=streamer, **kwargs))
        self.history += [turn, reply.message()]
        return reply


def interactive(session: ChatSession, **kwargs) -> None:
    from transformers import TextIteratorStreamer

    print("tunelab chat: /clear starts over, /tool TEXT answers a tool call, /exit quits", file=sys.stderr)
    while True:
        try:
            prompt = input("you> ").strip()
        except EOFError:
            print()
            return
        if prompt in ("/exit", "/quit"):
            return
        if prompt == "/clear":
            session.history.clear()
            continue
        if not prompt:
            continue
        role = "user"
        if prompt.startswith("/tool "):
            role, prompt = "tool", prompt[len("/tool ") :]
        streamer = TextIteratorStreamer(session.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result = {}

        def turn():
            try:
                result["reply"] = session.say(prompt, streamer=streamer, role=role, **kwargs)
            except ValueError as exc:
                result["error"] = str(exc)
                streamer.end()

        worker = threading.Thread(target=turn)
        worker.start()
        print("assistant> ", end="", flush=True)
        for piece in streamer:
            print(piece, end="", flush=True)
        worker.join()
        print()
        if "error" in result:
            print(f"error: {result['error']}", file=sys.stderr)
        elif result["reply"].tool_calls:
            print("tool calls> " + json.dumps(result["reply"].tool_calls, ensure_ascii=False))


def show(reply: Reply) -> str:
    """A reply for the terminal: the reasoning apart from the answer, tool calls as JSON."""
    parts = []
    if reply.reasoning:
        parts.append(f"[thinking]\n{reply.reasoning}\n[answer]")
    if reply.content:
        parts.append(reply.content)
    if reply.tool_calls:
        parts.append(json.dumps({"tool_calls": reply.tool_calls}, ensure_ascii=False, indent=2))
    return "\n".join(parts)
