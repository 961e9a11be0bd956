"""Chat with a model folder, a full fine-tune, or base + LoRA adapter, exactly as training rendered."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import torch

from ..errors import TunelabError
from ..model.loader import load_tokenizer, resolve_model_path


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").exists()


class ChatSession:
    def __init__(self, model, tokenizer, system: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.system = system
        self.history: list[dict] = []

    @classmethod
    def load(cls, model: str, adapter: str | None = None, system: str | None = None) -> "ChatSession":
        """`model` may be a tunelab LoRA run folder on its own: its base comes from adapter_config.json."""
        from transformers import AutoModelForCausalLM, GenerationConfig

        model_dir = Path(model)
        if adapter is None and (model_dir / "adapter_config.json").exists():
            adapter = str(model_dir)
            base = json.loads((model_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise TunelabError(f"{model_dir}: adapter_config.json names no base model; pass --model BASE --adapter DIR")
            model_dir = Path(base)
        if adapter is not None and not (Path(adapter) / "adapter_config.json").exists():
            raise TunelabError(f"--adapter: '{adapter}' holds no adapter_config.json")
        base_path = resolve_model_path(str(model_dir))
        tok_dir = adapter if adapter and _has_tokenizer(Path(adapter)) else base_path
        tokenizer = load_tokenizer(tok_dir)
        if not getattr(tokenizer, "chat_template", None):
            raise TunelabError(f"{tok_dir}: no chat template saved with this tokenizer")
        try:
            lm = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32 if not torch.cuda.is_available()
                                                      else "auto")
        except OSError as exc:
            raise TunelabError(f"--model: cannot load '{base_path}' ({str(exc).splitlines()[0]})") from None
        if len(tokenizer) > lm.get_input_embeddings().weight.shape[0]:
            lm.resize_token_embeddings(len(tokenizer))
        if adapter is not None:
            from peft import PeftModel

            lm = PeftModel.from_pretrained(lm, adapter)
        gen_dir = Path(adapter) if adapter and (Path(adapter) / "generation_config.json").exists() else Path(base_path)
        if (gen_dir / "generation_config.json").exists():
            lm.generation_config = GenerationConfig.from_pretrained(gen_dir)
        if torch.cuda.is_available():
            lm = lm.to("cuda")
        return cls(lm, tokenizer, system)

    @property
    def stop_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        return [] if ids is None else ids if isinstance(ids, list) else [ids]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

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
