"""`tunelab demo`: build a tiny Llama-style model, teach it a persona, and chat with it, all offline.

Stage 1 trains every weight (`finetuning_type: full`) so the random base can learn at all; stage 2
adds a LoRA adapter on top, the way users tune a real model; then the training questions are asked
through the same code as `tunelab chat` and the exact-match score is printed last.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import from_dict
from ..errors import TunelabError
from ..infer.chat import ChatSession
from ..train.run import train
from .build import build_tiny_model, train_tokenizer

DATA = Path(__file__).resolve().parents[3] / "examples" / "data" / "persona.json"

COMMON = dict(
    template="chatml",
    cutoff_len=128,
    per_device_train_batch_size=16,
    logging_steps=20,
    save_steps=100000,
    lr_scheduler_type="cosine",
    seed=0,
    overwrite_output_dir=True,
)


def demo_data() -> Path:
    if DATA.exists():
        return DATA
    raise TunelabError(f"demo data not found at {DATA}; run the demo from a clone of the repository")


def run_demo(
    output_dir: str = "demo_run", full_epochs: float = 16, lora_epochs: float = 20, n_questions: int | None = None
) -> float:
    started = time.perf_counter()
    out = Path(output_dir)
    data_file = demo_data()
    records = json.loads(data_file.read_text(encoding="utf-8"))
    texts = [m["content"] for r in records for m in r["messages"]]

    print(f"[demo] 1/4 building a tiny Llama-style model and a tokenizer trained on {len(records)} records")
    tokenizer = train_tokenizer(texts, vocab_size=1500)
    base = build_tiny_model(out / "base", tokenizer, "llama", hidden=192, layers=4, heads=4, intermediate_size=512)

    print("[demo] 2/4 full fine-tuning (all weights) so the random base learns the language")
    full = train(
        from_dict(
            {
                **COMMON,
                "model": str(base),
                "dataset": str(data_file),
                "output_dir": str(out / "full"),
                "finetuning_type": "full",
                "num_train_epochs": full_epochs,
                "learning_rate": 3e-3,
                "warmup_ratio": 0.05,
            }
        )
    )
    _print_curve("full", full.metrics)

    print("[demo] 3/4 LoRA on top of it (r 16, all linear layers)")
    lora = train(
        from_dict(
            {
                **COMMON,
                "model": str(out / "full"),
                "template": "auto",
                "dataset": str(data_file),
                "output_dir": str(out / "lora"),
                "finetuning_type": "lora",
                "lora_r": 16,
                "lora_alpha": 32,
                "lora_dropout": 0.0,
                "num_train_epochs": lora_epochs,
                "learning_rate": 5e-3,
            }
        )
    )
    _print_curve("lora", lora.metrics)

    print(f"[demo] 4/4 asking the training questions (tunelab chat --model {out / 'full'} --adapter {out / 'lora'})")
    session = ChatSession.load(str(out / "full"), str(out / "lora"))
    pairs = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in records][:n_questions]
    hits = 0
    for i, (question, answer) in enumerate(pairs):
        reply = session.ask(question, max_new_tokens=64)
        hits += reply.strip() == answer.strip()
        if i % max(1, len(pairs) // 4) == 0:
            print(f"  Q: {question}\n  A: {reply}")
    score = hits / len(pairs)
    print(f"[demo] {hits}/{len(pairs)} answers reproduced exactly in {time.perf_counter() - started:.0f}s")
    print(f"score: {score:.0%}")
    return score


def _print_curve(name: str, metrics: list[dict]) -> None:
    losses = [m["loss"] for m in metrics if "loss" in m]
    if losses:
        picks = [losses[int(i * (len(losses) - 1) / 5)] for i in range(6)]
        print(f"[demo] {name} loss: " + " -> ".join(f"{x:.3f}" for x in picks))
