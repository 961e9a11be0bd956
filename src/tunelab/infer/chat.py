"""Chat with a model folder, a full fine-tune, or base + LoRA adapter, exactly as training rendered."""

from __future__ import annotations

import sys
import threading

import torch

from ..data.conversation import Conversation, Message
from ..data.encode import Encoder
from .load import load_inference


class ChatSession:
    """A conversation with one model, rendered by the same `Encoder` training used (tools included)."""

    def __init__(self, model, tokenizer, system: str | None = None, tools: list[dict] | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.encoder = Encoder(tokenizer)
        self.system = system
        self.tools = tools
        self.history: list[dict] = []

    @classmethod
    def load(cls, model: str, adapter: str | None = None, system: str | None = None,
             trust_remote_code: bool = False) -> "ChatSession":
        """`model` may be a tunelab LoRA run folder on its own: its base comes from adapter_config.json."""
        im = load_inference(model, [adapter] if adapter else None, trust_remote_code=trust_remote_code)
        variant = im.variants[0]
        im.model.generation_config.eos_token_id = variant.stop_ids or None
        return cls(im.model, variant.tokenizer, system)

    @property
    def stop_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        return [] if ids is None else ids if isinstance(ids, list) else [ids]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        conv = Conversation([Message.from_dict(m) for m in messages], tools=self.tools, source="chat")
        return self.encoder.prompt_ids(conv)

    def generate(self, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
                 streamer=None) -> str:
        ids = torch.tensor([self.prompt_ids(messages)], device=self.model.device)
        kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids or None,
                      pad_token_id=self.tokenizer.pad_token_id or (self.stop_ids or [0])[0],
                      do_sample=temperature > 0, streamer=streamer)
        if temperature > 0:
            kwargs["temperature"] = temperature
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    def _messages(self, prompt: str, history: list[dict]) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + history + [{"role": "user", "content": prompt}]

    def ask(self, prompt: str, **kwargs) -> str:
        """One answer, no memory of earlier turns."""
        return self.generate(self._messages(prompt, []), **kwargs)

    def say(self, prompt: str, streamer=None, **kwargs) -> str:
        """A turn in a multi-turn conversation: the answer joins the history."""
        answer = self.generate(self._messages(prompt, self.history), streamer=streamer, **kwargs)
        self.history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        return answer


def interactive(session: ChatSession, **kwargs) -> None:
    from transformers import TextIteratorStreamer

    print("tunelab chat: /clear starts over, /exit quits", file=sys.stderr)
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
        streamer = TextIteratorStreamer(session.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result = {}
        worker = threading.Thread(target=lambda: result.setdefault("a", session.say(prompt, streamer=streamer, **kwargs)))
        worker.start()
        print("assistant> ", end="", flush=True)
        for piece in streamer:
            print(piece, end="", flush=True)
        worker.join()
        print()
