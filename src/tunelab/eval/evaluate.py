"""Held-out loss on the trained tokens plus generation metrics, one row per model variant.

The loss uses the same masks as training (the run's `train_on` and `cutoff_len`), so an eval loss
here is comparable with the `eval_loss` in the run's metrics.jsonl.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..constants import LOSS_POSITIONS
from ..data.dataset import PadCollator
from ..infer.generate import Case, generate_cases
from ..infer.load import InferenceModel, Variant, prompt_encoder
from ..model.loss import install_labelled_forward, summed_loss, supports_labelled_loss
from .metrics import score

# What the columns measure, printed under the table and written beside it
UNITS = (
    "eval_loss: mean cross-entropy per trained token (nats), as training's eval_loss; perplexity: exp(eval_loss); "
    "exact_match, bleu-4, rouge-1/2/l: percent (0-100) of the references, averaged over samples; stopped_pct: "
    "percent of answers that ended on a stop id before the token limit; mean_new_tokens: tokens generated"
)
COLUMNS = (
    "model",
    "samples",
    "eval_loss",
    "perplexity",
    "exact_match",
    "bleu-4",
    "rouge-1",
    "rouge-2",
    "rouge-l",
    "stopped_pct",
    "mean_new_tokens",
)


def eval_loss(
    im: InferenceModel, variant: Variant, cases: list[Case], batch_size: int = 8, progress: bool = True
) -> tuple[float, int]:
    """Mean cross-entropy per trained token, and how many tokens it covered."""
    encoder = prompt_encoder(variant, im.base_path)  # training's masks, cutoff and system prompt
    samples = [s for s in encoder.encode_many([c.conversation for c in cases]) if s.n_trained]
    pad = variant.tokenizer.pad_token_id if variant.tokenizer.pad_token_id is not None else 0
    collate = PadCollator(pad)
    total, count = 0.0, 0
    # training's own loss: the head runs at trained positions only, in chunks, so no batch x length x
    # vocabulary logits are ever built; models with other heads keep the plain loss
    labelled = supports_labelled_loss(im.model)
    if labelled:
        install_labelled_forward(im.model)
    bar = tqdm(total=len(samples), desc=f"loss {variant.label}", disable=not progress, unit="sample")
    with im.use(variant) as model, torch.no_grad():
        for i in range(0, len(samples), batch_size):
            batch = collate([{"input_ids": s.input_ids, "labels": s.labels} for s in samples[i : i + batch_size]])
            batch = {k: v.to(im.device) for k, v in batch.items()}
            body = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            summed, n = summed_loss(model, body, batch["labels"], batch[LOSS_POSITIONS], labelled)
            total += summed.float()
            count += n
            bar.update(len(batch["input_ids"]))
    bar.close()
    total, count = float(total), int(count)  # read once: no host sync per batch
    return (total / count if count else float("nan")), count


def evaluate(
    im: InferenceModel, cases: list[Case], max_new_tokens: int = 256, batch_size: int = 8, progress: bool = True
) -> list[dict]:
    rows = []
    for variant in im.variants:
        loss, _ = eval_loss(im, variant, cases, batch_size, progress)
        generate_cases(im, variant, cases, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
        metrics = score([c.predictions[variant.label] for c in cases], [c.reference for c in cases])
        stopped = sum(c.stopped[variant.label] for c in cases)
        rows.append(
            {
                "model": variant.label,
                "samples": len(cases),
                "eval_loss": loss,
                "perplexity": math.exp(loss) if loss < 50 else float("inf"),
                **metrics,
                "stopped_pct": 100.0 * stopped / len(cases),
                "mean_new_tokens": sum(c.new_tokens[variant.label] for c in cases) / len(cases),
            }
        )
    return rows


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str] | tuple | None = None) -> str:
    columns = list(columns or (rows[0].keys() if rows else []))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_table(
    rows: list[dict], folder: str | Path, stem: str, columns: list[str] | tuple | None = None, note: str | None = None
) -> None:
    """`stem`.csv, `stem`.json and `stem`.md side by side; `note` (what the columns measure) under the md table."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    columns = list(columns or (rows[0].keys() if rows else []))
    with (folder / f"{stem}.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (folder / f"{stem}.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    text = markdown_table(rows, columns) + (f"\n\n{note}" if note else "")
    (folder / f"{stem}.md").write_text(text + "\n", encoding="utf-8")
