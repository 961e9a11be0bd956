"""The preference stages (dpo, kto): the trainer's loss, its metrics, and the reference it measures against.

Everything else a run does (run folder, checkpoints, resume, engines, loss guard, signals) is the SFT trainer's:
only the loss differs. Both completions of a pair go through one forward (see `data.pairs`); the reference is
the LoRA base with adapters off, a frozen copy (full fine-tuning), log-probs computed before training
(`precompute_ref`), or nothing (reference-free losses).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..config import REFERENCE_FREE, Config
from ..constants import SEQUENCES
from ..data import cache
from ..data.pairs import DESIRABLE, PAIRS, REF_LOGPS, PairCollator, PairDataset
from ..errors import TunelabError
from ..model.pref_losses import Logps, kl_estimate, kto_loss, pair_loss
from ..model.preference import batch_logps, is_lora, reference_logps
from . import distributed
from .trainer import TunelabTrainer

log = logging.getLogger("tunelab")


@dataclass(frozen=True)
class PreferenceSettings:
    stage: str
    loss: str
    beta: float
    ftx: float
    simpo_gamma: float
    label_smoothing: float
    kto_chosen_weight: float
    kto_rejected_weight: float

    @classmethod
    def from_config(cls, cfg: Config) -> "PreferenceSettings":
        return cls(
            cfg.stage,
            cfg.pref_loss,
            cfg.pref_beta,
            cfg.pref_ftx,
            cfg.simpo_gamma,
            cfg.label_smoothing,
            cfg.kto_chosen_weight,
            cfg.kto_rejected_weight,
        )

    @property
    def needs_reference(self) -> bool:
        return self.stage == "kto" or self.loss not in REFERENCE_FREE


METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "kl",
    "nll_loss",
    "log_odds_ratio",
    "log_odds_chosen",
)


def preference_loss(settings: PreferenceSettings, model, batch: dict, reference=None):
    """(loss, metrics) of one collated preference batch; the function eval and training share."""
    logps, tokens = batch_logps(model, batch)
    half = int(batch[SEQUENCES]) // 2
    ref = None
    if settings.needs_reference:
        ref = batch[REF_LOGPS].to(logps) if REF_LOGPS in batch else reference_logps(model, batch, reference)[0]
    if settings.stage == "kto":
        kl = kl_estimate(logps[half:], ref[half:])
        if distributed.active():  # KTO's reference point is the whole global batch's, as TRL's
            shift = (logps[half:] - ref[half:]).detach().mean().reshape(1)
            kl = distributed.mean(shift)[0].to(shift).clamp(min=0)
        desirable = batch.get(DESIRABLE, torch.zeros(half, dtype=torch.bool)).to(logps.device)
        loss, metrics = kto_loss(
            logps[:half],
            ref[:half],
            desirable,
            kl,
            settings.beta,
            settings.kto_chosen_weight,
            settings.kto_rejected_weight,
        )
    else:
        policy = Logps(logps[:half], logps[half:], tokens[:half], tokens[half:])
        reference_side = Logps(ref[:half], ref[half:], tokens[:half], tokens[half:]) if ref is not None else None
        loss, metrics = pair_loss(
            settings.loss,
            policy,
            reference_side,
            settings.beta,
            label_smoothing=settings.label_smoothing,
            simpo_gamma=settings.simpo_gamma,
            ftx=settings.ftx,
        )
    if int(batch.get(PAIRS, 1)) == 0:  # fillers only: a forward in step with the other ranks, nothing learnt
        loss = loss * 0.0
    return loss, metrics, tokens


class PreferenceTrainer(TunelabTrainer):
    """TunelabTrainer with the preference loss; logs the reward metrics every peer logs."""

    def __init__(self, *args, settings: PreferenceSettings, reference=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = settings
        self.reference = reference
        self.loss_is_scaled_for_ga = False  # a mean per micro-batch: Trainer divides by the accumulation steps
        self._sums: torch.Tensor | None = None  # on the metrics' device: no host sync per micro-step
        self._counts = torch.zeros(len(METRICS), dtype=torch.float64)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics, tokens = preference_loss(self.settings, model, dict(inputs), self.reference)
        if model.training:
            self.token_counter.trained += tokens.sum().long()
            self._add(metrics)
        return (loss, metrics) if return_outputs else loss

    def _add(self, metrics: dict) -> None:
        """Kept as sums and counts over a fixed list of names: a KTO micro-batch may lack a group, and every rank
        must send the same numbers when they are averaged."""
        for name, value in metrics.items():
            if name in METRICS:
                if self._sums is None:
                    self._sums = torch.zeros(len(METRICS), dtype=torch.float64, device=value.device)
                at = METRICS.index(name)
                self._sums[at] += value.detach().double()
                self._counts[at] += 1

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            sums = self._sums if self._sums is not None else torch.zeros(len(METRICS), dtype=torch.float64)
            both = distributed.mean(torch.cat([sums, self._counts.to(sums.device)])).tolist()
            sums, counts = both[: len(METRICS)], both[len(METRICS) :]
            logs.update({n: sums[i] / counts[i] for i, n in enumerate(METRICS) if counts[i] > 0})
            self._sums = None
            self._counts.zero_()
        super().log(logs, *args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """Mean preference loss and metrics over every held-out pair, each rank's share counted once."""
        loader = self.rank_share_loader(eval_dataset if eval_dataset is not None else self.eval_dataset)
        model = self.model
        was_training = model.training
        model.eval()
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64))
        pairs = 0
        with torch.no_grad():
            for batch in loader:
                inputs = self._prepare_inputs(batch)
                n = int(inputs.get(PAIRS, 0))
                with self.autocast_smart_context_manager():
                    loss, metrics, _ = preference_loss(self.settings, model, dict(inputs), self.reference)
                if n:
                    for name, value in {"loss": loss, **metrics}.items():
                        sums[name] += float(value) * n
                    pairs += n
        model.train(was_training)
        names = sorted(sums) or ["loss"]
        totals = [distributed.total(float(sums[k])) for k in names]
        count = distributed.total(pairs)
        metrics = {f"{metric_key_prefix}_{k}": (t / count if count else float("nan")) for k, t in zip(names, totals)}
        metrics[f"{metric_key_prefix}_pairs"] = int(count)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def unit(cfg: Config) -> str:
    return "KTO examples" if cfg.stage == "kto" else "pairs"


def trainer_parts(cfg: Config, data, model, collator, engine: str, device, out: Path, model_path: str):
    """(trainer class, (train, eval) datasets, the trainer's extra arguments) of a preference run."""
    settings = PreferenceSettings.from_config(cfg)
    train, held = PairDataset(data.train), PairDataset(data.eval) if data.eval else None
    reference = None
    if settings.needs_reference and not is_lora(model):
        if engine not in ("single", "ddp"):
            raise TunelabError(
                f"stage {cfg.stage} with finetuning_type full under distributed {engine}: the reference model "
                "is not sharded yet; use finetuning_type lora (its reference is the base, adapters off), a "
                "reference-free pref_loss (orpo, simpo), or distributed ddp"
            )
        if cfg.precompute_ref:
            for dataset, name in ((train, "train"), (held, "eval")):
                if dataset is not None:
                    dataset.ref_logps = _reference_file(model, dataset, collator, cfg, device, out, name, model_path)
        else:
            reference = copy.deepcopy(model).eval().requires_grad_(False)
            log.info("reference: a frozen copy of the starting model (precompute_ref: true keeps none in memory)")
    elif settings.needs_reference:
        log.info("reference: the base model with the adapters off (no second copy)")
    return PreferenceTrainer, (train, held), {"settings": settings, "reference": reference}


def reference_key(model_path: str, dataset: PairDataset, cfg: Config) -> str:
    """What precomputed reference log-probs depend on: the starting weights (every weight file's name, size and
    modification time), how they run (precision, attention), the exact token ids of every pair, and tunelab."""
    h = hashlib.sha256(f"{__version__}|{cfg.bf16}|{cfg.fp16}|{cfg.pure_bf16}|{cfg.attn_implementation}".encode())
    folder = Path(model_path)
    for f in sorted(folder.iterdir()) if folder.is_dir() else []:
        if f.suffix in (".safetensors", ".bin", ".json") and f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    if not folder.is_dir():
        h.update(model_path.encode())
    for s in dataset.samples:
        for side in (s.chosen, s.rejected if s.rejected is not None else s.kl):
            h.update(np.asarray(side.input_ids, dtype=np.int64).tobytes())
            h.update(np.asarray(side.labels, dtype=np.int64).tobytes())
            h.update(b"|")
    return h.hexdigest()


def _reference_file(model, dataset, collator, cfg: Config, device, out: Path, name: str, model_path: str) -> list:
    """Reference log-probs of `dataset`, computed once with the starting weights and kept under a key of what they
    depend on (see `reference_key`): beside the tokenization cache, or in the run folder when the cache is off.
    A resume, a sweep point or a rerun of the same config reads them back (a resume computes them before its
    checkpoint's weights are loaded, so anew they would be the same); changed weights or data compute them anew."""
    key = reference_key(model_path, dataset, cfg)[:24]
    folder = cache.cache_dir().parent / "reference" if cache.enabled() else out
    path = folder / f"reference_logps_{name}_{key}.json"
    if path.is_file():
        log.info("reference log-probs (%s) read from %s", name, path)
        return json.loads(path.read_text())
    values = precompute_reference(model, dataset, collator, cfg.per_device_eval_batch_size, device)
    if distributed.is_main():
        folder.mkdir(parents=True, exist_ok=True)
        staged = path.with_suffix(".tmp")
        staged.write_text(json.dumps(values))
        os.replace(staged, path)
    return values


def precompute_reference(model, dataset, collator, batch_size: int, device) -> list[tuple[float, float]]:
    """The reference's log-probs of every pair, computed once with the starting weights (the model before its
    first step), so training keeps no reference model at all."""
    from tqdm.auto import tqdm

    out: list[tuple[float, float]] = []
    was_training = model.training
    model.to(device).eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    with torch.no_grad():
        for batch in tqdm(loader, desc="reference log-probs", disable=not distributed.is_main()):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            logps, _ = batch_logps(model, batch)
            half = int(batch[SEQUENCES]) // 2
            out += list(zip(logps[:half].tolist(), logps[half:].tolist()))
    model.train(was_training)
    return out


def pair_collator(pad_token_id: int, packing: bool, cutoff_len: int, flatten: bool) -> PairCollator:
    return PairCollator(pad_token_id, 2 * cutoff_len if packing else None, flatten=flatten)
