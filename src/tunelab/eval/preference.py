"""How often a model prefers the chosen answer: `tunelab eval` on preference data, one row per model variant.

Each pair is rendered and masked by the variant's own training encoder (its template, system prompt, reasoning
rule), exactly as a preference run trains it, and scored by the summed log-prob of each completion: the
quantity DPO moves. `pref_accuracy` is the share of pairs whose chosen completion has the higher log-prob, so the
base (`--adapter none`) and every adapter are compared on the same pairs in one table.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..config import Config
from ..constants import SEQUENCES
from ..data.pairs import PairCollator
from ..data.pref_formats import UNPAIRED
from ..data.preference import PreferenceStats, encode_preferences, read_preferences
from ..data.readers import record_chunks
from ..errors import TunelabError
from ..infer.load import InferenceModel, Variant, prompt_encoder
from ..model.preference import batch_logps

COLUMNS = ("model", "pairs", "pref_accuracy", "logp_margin", "logps/chosen", "logps/rejected")
UNITS = (
    "pref_accuracy: share of pairs (0-1) whose chosen completion has the higher summed log-prob under the model; "
    "logp_margin: mean of (chosen - rejected) summed log-probs (nats); logps/*: mean summed log-prob of each side"
)


def is_preference_data(path: str) -> bool:
    """Whether `path`'s first record is a preference pair (chosen and rejected), not a conversation to answer."""
    for chunk in record_chunks(path):
        for record in chunk.read():
            return "chosen" in record.data and "rejected" in record.data
    return False


def read_pairs(path: str, system: str | None = None, max_samples: int | None = None, tools: str | None = None):
    records = read_preferences(
        Config(dataset=path, stage="dpo", system=system, tools=tools), [path], PreferenceStats(stage="dpo")
    )
    records = records[:max_samples] if max_samples else records
    if not records:
        raise TunelabError(f"{path}: the dataset is empty")
    return records


def pair_logps(im: InferenceModel, variant: Variant, records, batch_size: int = 8, progress: bool = True):
    """(chosen, rejected) summed log-probs of every pair the variant's encoder keeps, as two float64 tensors."""
    encoder = prompt_encoder(variant, im.base_path)
    encoder.train_on = "assistant"  # with each side's train_from: the completion's turns only, as training scores
    samples = encode_preferences(encoder, records, False, PreferenceStats(stage="dpo"))
    pad = variant.tokenizer.pad_token_id if variant.tokenizer.pad_token_id is not None else 0
    collate = PairCollator(pad)
    chosen, rejected = [], []
    bar = tqdm(total=len(samples), desc=f"pairs {variant.label}", disable=not progress, unit="pair")
    with im.use(variant) as model, torch.no_grad():
        for i in range(0, len(samples), batch_size):
            batch = collate([{"sample": s} for s in samples[i : i + batch_size]])
            batch = {k: v.to(im.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            logps, _ = batch_logps(model, batch)
            half = int(batch[SEQUENCES]) // 2
            chosen.append(logps[:half].double().cpu())
            rejected.append(logps[half:].double().cpu())
            bar.update(half)
    bar.close()
    return torch.cat(chosen), torch.cat(rejected)


def evaluate_preferences(im: InferenceModel, records, batch_size: int = 8, progress: bool = True) -> list[dict]:
    if any(r.rejected is None or r.label is not None for r in records):
        raise TunelabError(f"preference eval needs pairs (chosen and rejected), not {', '.join(UNPAIRED)} examples")
    rows = []
    for variant in im.variants:
        chosen, rejected = pair_logps(im, variant, records, batch_size, progress)
        rows.append(
            {
                "model": variant.label,
                "pairs": len(chosen),
                "pref_accuracy": float((chosen > rejected).double().mean()),
                "logp_margin": float((chosen - rejected).mean()),
                "logps/chosen": float(chosen.mean()),
                "logps/rejected": float(rejected.mean()),
            }
        )
    return rows
