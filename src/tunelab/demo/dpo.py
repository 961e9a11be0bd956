"""`tunelab demo --stage dpo` (`make demo-dpo`): on a CPU, preference training teaches what SFT left undecided.

The data (examples/data/style_*, written by make_style_prefs.py there) prefixes short questions with a request
for one word or a full sentence. The SFT file answers every training question in both styles under both
requests, so the SFT model knows the answers but has learnt that the request changes nothing; the pairs prefer
the requested style. The held-out pairs ask questions that no training file asks, half of them per style: a
model that ignores the request scores a `pref_accuracy` of about 0.5 whichever style it leans to, and only one
that learnt to read the request scores near 1.

Stages: a tiny Llama-style model and tokenizer built locally; SFT of every weight (a random base must learn the
language first); DPO with a LoRA on the SFT model (its reference is the SFT model, adapters off; `pref_ftx`
keeps the answers themselves, which DPO alone lets drift); the held-out pairs scored as `tunelab eval
--dataset` scores them; and training questions asked through `tunelab chat`'s code before and after, to show
that the answers stay well formed. The sizes are arguments, so the test runs this same code, smaller.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import from_dict
from ..errors import TunelabError
from ..eval.evaluate import markdown_table
from ..eval.preference import COLUMNS, evaluate_preferences, read_pairs
from ..infer.chat import ChatSession
from ..infer.load import BASE, load_inference
from ..train.run import train
from .build import build_tiny_model, train_tokenizer

DATA = Path(__file__).resolve().parents[3] / "examples" / "data"
FILES = ("style_sft.json", "style_pairs.jsonl", "style_pairs_heldout.jsonl")

COMMON = dict(
    template="chatml",
    cutoff_len=64,
    logging_steps=10,
    save_steps=100000,
    overwrite_output_dir=True,
    report_to="none",
    warmup_ratio=0.05,
    lr_scheduler_type="cosine",
)


@dataclass
class DpoDemoResult:
    before: float  # pref_accuracy on the held-out pairs: the SFT model
    after: float  # and the SFT model + the DPO adapter
    chat: dict[str, dict[str, float]]  # "sft" / "sft + dpo" -> share of chat answers: fluent, right, requested
    seconds: dict[str, float] = field(default_factory=dict)


def demo_files() -> tuple[Path, Path, Path]:
    sft, pairs, heldout = (DATA / name for name in FILES)
    missing = [str(p) for p in (sft, pairs, heldout) if not p.exists()]
    if missing:
        raise TunelabError(f"demo data not found: {', '.join(missing)}; run the demo from a clone of the repository")
    return sft, pairs, heldout


def run_dpo_demo(
    output_dir: str = "demo_run/dpo",
    sft_epochs: float = 50,
    dpo_steps: int = 200,
    hidden: int = 128,
    chat_questions: int = 40,
    seed: int = 0,
) -> DpoDemoResult:
    """The defaults are `make demo-dpo`'s: an SFT long enough to learn most facts, so the chat answers are right
    as well as well formed. The test passes a shorter SFT: the preference does not need the facts."""
    started = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sft_file, pairs_file, heldout_file = demo_files()
    sft_records = json.loads(sft_file.read_text(encoding="utf-8"))
    pairs = pairs_file.read_text(encoding="utf-8").splitlines()
    heldout = read_pairs(str(heldout_file))
    seconds: dict[str, float] = {}
    lap = time.perf_counter()

    def done(stage: str) -> None:
        nonlocal lap
        seconds[stage] = time.perf_counter() - lap
        lap = time.perf_counter()

    print(
        f"[demo dpo] 1/5 a tiny Llama-style model and a tokenizer; {len(sft_records)} SFT records, "
        f"{len(pairs)} training pairs, {len(heldout)} held-out pairs"
    )
    tokenizer = train_tokenizer([m["content"] for r in sft_records for m in r["messages"]], vocab_size=800)
    base = build_tiny_model(
        out / "base", tokenizer, "llama", seed, hidden=hidden, layers=4, heads=4, intermediate_size=3 * hidden
    )
    done("build")

    print(
        f"[demo dpo] 2/5 SFT of every weight, {sft_epochs:g} epochs: each answer in both styles, whatever the request"
    )
    sft = train(
        from_dict(
            {
                **COMMON,
                "seed": seed,
                "model": str(base),
                "dataset": str(sft_file),
                "output_dir": str(out / "sft"),
                "finetuning_type": "full",
                "num_train_epochs": sft_epochs,
                "per_device_train_batch_size": 16,
                "learning_rate": 2e-3,
            }
        )
    )
    _print_curve("sft loss", sft.metrics, "loss")
    done("sft")

    print(f"[demo dpo] 3/5 DPO, a LoRA on the SFT model, {dpo_steps} steps: the requested style preferred")
    dpo = train(
        from_dict(
            {
                **COMMON,
                "seed": seed,
                "model": str(out / "sft"),
                "template": "auto",
                "stage": "dpo",
                "pref_loss": "sigmoid",
                "pref_beta": 0.5,  # the margin saturates after a few nats: less drift than 0.1
                "pref_ftx": 1.0,  # and the chosen answers stay trained, so the facts survive
                "dataset": str(pairs_file),
                "output_dir": str(out / "dpo"),
                "finetuning_type": "lora",
                "lora_r": 8,
                "lora_alpha": 16,
                "lora_dropout": 0.0,
                "max_steps": dpo_steps,
                "per_device_train_batch_size": 8,
                "learning_rate": 5e-3,
            }
        )
    )
    _print_curve("dpo loss", dpo.metrics, "loss")
    _print_curve("dpo reward accuracy (training pairs)", dpo.metrics, "rewards/accuracies")
    done("dpo")

    print(
        f"[demo dpo] 4/5 held-out pairs: tunelab eval --model {out / 'sft'} --adapter none "
        f"--adapter {out / 'dpo'} --dataset {heldout_file}"
    )
    im = load_inference(str(out / "sft"), [BASE, str(out / "dpo")])
    rows = evaluate_preferences(im, heldout, progress=False)
    rows[0]["model"], rows[1]["model"] = "sft", "sft + dpo"
    print(markdown_table(rows, COLUMNS))
    del im
    done("eval")

    print(f"[demo dpo] 5/5 {chat_questions} training questions through tunelab chat, before and after DPO")
    chat = _chat(out, sft_records, chat_questions)
    done("chat")
    seconds["total"] = time.perf_counter() - started
    for name, shares in chat.items():
        print(
            f"[demo dpo] {name}: of the chat answers {shares['fluent']:.0%} fluent (well formed), "
            f"{shares['right']:.0%} right, {shares['requested']:.0%} in the requested style"
        )
    print("[demo dpo] time: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()))
    result = DpoDemoResult(rows[0]["pref_accuracy"], rows[1]["pref_accuracy"], chat, seconds)
    print(f"held-out pref_accuracy: {result.before:.2f} -> {result.after:.2f}")
    return result


def _print_curve(name: str, metrics: list[dict], key: str) -> None:
    values = [m[key] for m in metrics if key in m]
    if values:
        picks = [values[int(i * (len(values) - 1) / 5)] for i in range(6)]
        print(f"[demo dpo] {name}: " + " -> ".join(f"{x:.3f}" for x in picks))


def _question(prompt: str) -> str:
    """The question without its request ("In one word: What colour is a swan?" -> "What colour is a swan?")."""
    return prompt.split(": ", 1)[-1]


def _kind(question: str) -> str:
    """What sort of question it is: "What colour", "How many", "What does", "Is a"."""
    return " ".join(question.split()[:2]).replace(" an", " a")


def _chat(out: Path, sft_records: list[dict], n: int) -> dict[str, dict[str, float]]:
    """Greedy answers to `n` training prompts through `tunelab chat`'s code, before and after DPO, and the share
    of them that is: fluent (an answer the data gives to some question of the same kind, so a well-formed
    word or sentence), right (one of this question's two answers), and in the requested style (one word or a
    sentence, right or not)."""
    answers: dict[str, dict[bool, str]] = {}  # question -> {one word?: answer}
    kinds: dict[str, set[str]] = {}  # kind of question -> every answer given to one
    for record in sft_records:
        prompt, answer = (m["content"] for m in record["messages"])
        answers.setdefault(_question(prompt), {})[len(answer.split()) == 1] = answer
        kinds.setdefault(_kind(_question(prompt)), set()).add(answer)
    prompts = list(dict.fromkeys(r["messages"][0]["content"] for r in sft_records))[:n]
    replies, shares = {}, {}
    for name, adapter in (("sft", None), ("sft + dpo", str(out / "dpo"))):
        session = ChatSession.load(str(out / "sft"), adapter)
        got = [session.ask(p, max_new_tokens=24).strip() for p in prompts]
        questions = [_question(p) for p in prompts]
        shares[name] = {
            "fluent": sum(g in kinds[_kind(q)] for g, q in zip(got, questions)) / len(prompts),
            "right": sum(g in answers[q].values() for g, q in zip(got, questions)) / len(prompts),
            "requested": sum((len(g.split()) == 1) == _asks_one_word(p) for g, p in zip(got, prompts)) / len(prompts),
        }
        replies[name] = got
    changed = [i for i, (a, b) in enumerate(zip(replies["sft"], replies["sft + dpo"])) if a != b]
    print(f"  DPO changed {len(changed)} of {len(prompts)} answers; the first few:")
    for i in changed[:4]:
        print(f"  Q: {prompts[i]}\n     sft:       {replies['sft'][i]}\n     sft + dpo: {replies['sft + dpo'][i]}")
    return shares


def _asks_one_word(prompt: str) -> bool:
    return "one word" in prompt.lower()
