"""What a run leaves behind while it trains: a readable progress bar, metrics.jsonl and loss.png."""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import ProgressCallback, TrainerCallback

from .trainer import TokenCounter

_KEYS = {
    "loss": "loss",
    "learning_rate": "lr",
    "grad_norm": "grad_norm",
    "eval_loss": "eval_loss",
    "eval_tokens": "eval_tokens",
    "eval_pairs": "eval_pairs",
}
# The preference stages' metrics, under the names every peer logs them with (train, and eval_ prefixed)
PREFERENCE_PREFIXES = ("rewards/", "logps/", "kl", "nll")


def _preference_keys(logs: dict) -> dict:
    return {
        k: float(v)
        for k, v in logs.items()
        if k.removeprefix("eval_").startswith(PREFERENCE_PREFIXES) and isinstance(v, (int, float))
    }


class BarCallback(ProgressCallback):
    """The bar shows loss and learning rate next to tqdm's ETA instead of printing every log dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        post = {}
        if "loss" in logs:
            post["loss"] = f"{logs['loss']:.4f}"
        if "learning_rate" in logs:
            post["lr"] = f"{logs['learning_rate']:.2e}"
        if "eval_loss" in logs:
            post["eval_loss"] = f"{logs['eval_loss']:.4f}"
        if "rewards/accuracies" in logs:
            post["acc"] = f"{logs['rewards/accuracies']:.2f}"
        if "rewards/margins" in logs:
            post["margin"] = f"{logs['rewards/margins']:.3f}"
        if post:
            self.training_bar.set_postfix(post, refresh=True)
        if "eval_loss" in logs:
            self.training_bar.write(f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}")


class MetricsCallback(TrainerCallback):
    def __init__(self, path: Path, counter: TokenCounter):
        self.path = Path(path)
        self.counter = counter
        self.last_time = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_time = time.perf_counter()
        if state.is_world_process_zero and self.path.exists():
            # a resumed run drops the lines written after its checkpoint
            keep = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= state.global_step
            ]
            self.path.write_text("".join(line + "\n" for line in keep))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        row.update({ours: float(logs[k]) for k, ours in _KEYS.items() if k in logs})
        row.update(_preference_keys(logs))
        if "loss" in logs:  # every rank counts in (all ranks' tokens), rank 0 writes
            now = time.perf_counter()
            row["trained_tokens_per_s"] = round(self.counter.take() / max(now - self.last_time, 1e-9), 1)
            self.last_time = now
        if not state.is_world_process_zero:
            return
        if len(row) > 2:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: Path, out_png: Path) -> bool:
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    margins = [(r["step"], r["rewards/margins"]) for r in rows if "rewards/margins" in r]
    accuracies = [(r["step"], r["rewards/accuracies"]) for r in rows if "rewards/accuracies" in r]
    fig, axes = plt.subplots(1, 2 if margins else 1, figsize=(12 if margins else 7, 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if margins:  # a preference run: is the chosen answer pulling ahead of the rejected one?
        right = axes[0][1]
        right.plot(*zip(*margins), label="rewards/margins")
        if accuracies:
            right.plot(*zip(*accuracies), label="rewards/accuracies")
        right.set_xlabel("step")
        right.grid(alpha=0.3)
        right.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return True
