"""A grid of training runs from one config, each evaluated on the same held-out set, compared in one table.

Every point gets its own run folder under the config's `output_dir`; a point whose folder already
holds a finished run is not trained again, and one that was cut off resumes from its checkpoint,
so re-running an interrupted sweep picks up where it stopped.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import run_folder
from .config import FIELDS, Config, load_config, unknown_key
from .errors import TunelabError
from .train.callbacks import read_metrics
from .train.run import train

log = logging.getLogger("tunelab")

EVAL_CACHE = "sweep_eval.json"
METRICS = ("eval_loss", "perplexity", "exact_match", "bleu-4", "rouge-1", "rouge-2", "rouge-l", "stopped_pct")
PREF_METRICS = ("pref_accuracy", "logp_margin")  # an eval set of preference pairs: which answer each run prefers


def _split_values(raw: str) -> list[str]:
    """Commas outside brackets separate values, so `lora_target=[q_proj,v_proj],all-linear` is two values."""
    parts, depth, current = [], 0, ""
    for ch in raw:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current]


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _number(value):
    """YAML 1.1 reads `1e-4` as a string; a sweep over learning rates means the number."""
    return float(value) if isinstance(value, str) and _FLOAT.match(value) else value


def parse_grid(pairs: list[str]) -> dict[str, list]:
    grid: dict[str, list] = {}
    for pair in pairs:
        if "=" not in pair:
            raise TunelabError(f"sweep: '{pair}' is not key=value1,value2,...")
        key, raw = (s.strip() for s in pair.split("=", 1))
        if key not in FIELDS:
            raise TunelabError(f"sweep: {unknown_key(key)}")
        if key in grid:
            raise TunelabError(f"sweep: '{key}' is given twice")
        pieces = _split_values(raw)
        if any(not p.strip() for p in pieces):
            raise TunelabError(f"sweep: {key}: empty value in '{raw}'")
        try:
            grid[key] = [_number(yaml.safe_load(p)) for p in pieces]
        except yaml.YAMLError:
            raise TunelabError(f"sweep: {key}: cannot read the values '{raw}'") from None
    if not grid:
        raise TunelabError("sweep: give at least one key=value1,value2 to vary")
    if "output_dir" in grid:
        raise TunelabError("sweep: output_dir cannot be swept; each point gets its own folder under it")
    return grid


def point_name(point: dict) -> str:
    def short(v):
        return format(v, "g") if isinstance(v, float) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)

    return "_".join(re.sub(r"[^\w.+-]+", "-", f"{k}-{short(v)}") for k, v in point.items())


@dataclass
class SweepPoint:
    values: dict
    config: Config

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def finished(self) -> bool:
        return (self.output_dir / run_folder.SUMMARY).exists()


def plan_sweep(config_path: str, pairs: list[str]) -> tuple[list[SweepPoint], Path]:
    """Every point is validated before the first one trains, so a bad value costs nothing."""
    grid = parse_grid(pairs)
    root = Path(load_config(config_path).output_dir)
    points = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        folder = root / point_name(values)
        cfg = load_config(config_path, {**values, "output_dir": str(folder), "resume_from_checkpoint": "auto"})
        points.append(SweepPoint(values, cfg))
    return points, root


def _eval_point(point: SweepPoint, eval_dataset: str, max_new_tokens: int, batch_size: int) -> dict:
    from .eval.evaluate import evaluate
    from .eval.preference import evaluate_preferences, is_preference_data, read_pairs
    from .infer.generate import read_cases
    from .infer.load import load_inference

    cache = point.output_dir / EVAL_CACHE
    key = {"dataset": str(Path(eval_dataset).resolve()), "max_new_tokens": max_new_tokens}
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved["row"]
    cfg = point.config
    if is_preference_data(eval_dataset):
        pairs = read_pairs(eval_dataset, cfg.system)
        (row,) = evaluate_preferences(load_inference(str(point.output_dir)), pairs, batch_size=batch_size)
    else:
        cases = read_cases(eval_dataset, cfg.dataset_format, cfg.columns, cfg.system)
        (row,) = evaluate(
            load_inference(str(point.output_dir)), cases, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
    cache.write_text(json.dumps({"key": key, "row": row}, ensure_ascii=False))
    return row


def _row(point: SweepPoint, evaluated: dict | None) -> dict:
    summary = json.loads((point.output_dir / run_folder.SUMMARY).read_text())
    losses = [m["loss"] for m in read_metrics(point.output_dir / "metrics.jsonl") if "loss" in m]
    row = {
        "run": point.output_dir.name,
        **point.values,
        "train_loss": losses[-1] if losses else summary.get("train_loss"),
    }
    if evaluated:
        row.update({k: evaluated[k] for k in METRICS + PREF_METRICS if k in evaluated})
    else:
        row["eval_loss"] = summary.get("final_eval_loss")
    row.update(train_seconds=summary.get("seconds"), trainable_params=summary.get("trainable_params"))
    return row


def _mark_best(rows: list[dict]) -> None:
    if all(r.get("pref_accuracy") is not None for r in rows):  # preference pairs: the most often right, then margin
        best = max(rows, key=lambda r: (r["pref_accuracy"], r["logp_margin"])) if rows else None
        for r in rows:
            r["best"] = "*" if r is best else ""
        return
    key = "eval_loss" if all(r.get("eval_loss") is not None for r in rows) else "train_loss"
    finite = [r for r in rows if r.get(key) is not None and not math.isnan(r[key])]
    best = min(finite, key=lambda r: r[key]) if finite else None
    for r in rows:
        r["best"] = "*" if r is best else ""


def _release_memory() -> None:
    """Free what a finished run left behind: its model sits in reference cycles (trainer callbacks, patched
    forwards) that only the cycle collector frees, and the CUDA allocator keeps freed blocks cached."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_sweep(
    config_path: str, pairs: list[str], eval_dataset: str | None = None, max_new_tokens: int = 128, batch_size: int = 8
) -> list[dict]:
    points, root = plan_sweep(config_path, pairs)
    eval_dataset = eval_dataset or (points[0].config.eval_datasets or [None])[0]
    if eval_dataset is not None and not Path(eval_dataset).exists():
        raise TunelabError(f"--eval-dataset: '{eval_dataset}' not found")
    for i, point in enumerate(points, 1):
        if point.finished:
            log.info("sweep %d/%d %s: already trained", i, len(points), point.output_dir.name)
            continue
        log.info("sweep %d/%d %s", i, len(points), point.output_dir.name)
        train(point.config)
        _release_memory()  # the next run must not find the last one's model still held
    rows = []
    for point in points:
        evaluated = _eval_point(point, eval_dataset, max_new_tokens, batch_size) if eval_dataset else None
        rows.append(_row(point, evaluated))
    _mark_best(rows)
    write_sweep(rows, points, root)
    return rows


def write_sweep(rows: list[dict], points: list[SweepPoint], root: Path) -> None:
    from .eval.evaluate import markdown_table, write_table

    columns = list(rows[0])
    write_table(rows, root, "sweep", columns)
    best = next((r["run"] for r in rows if r["best"]), None)
    (root / "sweep.md").write_text(
        f"# sweep: {len(rows)} runs\n\n{markdown_table(rows, columns)}\n\nbest: {best}\n", encoding="utf-8"
    )
    plot_runs({p.output_dir.name: p.output_dir / "metrics.jsonl" for p in points}, root / "sweep_loss.png")


def plot_runs(metrics: dict[str, Path], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for name, path in metrics.items():
        curve = [(r["step"], r["loss"]) for r in read_metrics(path) if "loss" in r]
        if curve:
            ax.plot(*zip(*curve), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
