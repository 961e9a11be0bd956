"""One arm of bench/gpu.py in its own process, so its peak GPU memory is its own.

    python bench/gpu_arms.py SPEC.json OUT.json

SPEC (written by gpu.py) names the arm (c, a, b, or fullft), the saved model folder, the training
file, the held-out samples and the shared settings. Every arm is measured by the same hooks on
`transformers.Trainer` (each arm's trainer subclasses it): `training_step` sees each micro-batch
before it goes to the device and counts its tokens and necessary FLOPs (per sample, from the batch's
own layout: attention masks for padded rows, restarting position_ids for packed ones); a callback
synchronises the device at each step's end and keeps the clock, and stops an arm at its time cap.
The held-out loss is computed here, the same way for every arm, before and after training, off the
clock. tunelab is driven through its public `train(cfg)` only.
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from arms import user_text, usual_recipe_example
from gpu import IGNORE_INDEX, necessary_flops

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cuda(spec: dict) -> bool:
    return spec["device"] == "cuda"


def autocast_dtype(precision: str):
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


# ---------------------------------------------------------------- what a batch holds


def batch_lengths(inputs: dict, pad_id: int) -> list[int]:
    """The real length of every sample in a micro-batch, whatever its layout.

    Packed or padding-free rows (position_ids restarting at 0): one sample per run of positions,
    leaving out tunelab's row-tail padding block (all pad tokens). Padded rows: the attention mask.
    """
    ids = inputs["input_ids"]
    positions = inputs.get("position_ids")
    if positions is not None:
        lengths = []
        for row_ids, row_pos in zip(ids.tolist(), positions.tolist()):
            start = 0
            for j in range(1, len(row_pos) + 1):
                if j == len(row_pos) or row_pos[j] == 0:
                    if any(t != pad_id for t in row_ids[start:j]):
                        lengths.append(j - start)
                    start = j
        return lengths
    mask = inputs.get("attention_mask")
    if mask is not None:
        return [int(n) for n in mask.sum(dim=1).tolist()]
    return [ids.shape[1]] * ids.shape[0]


@torch.no_grad()
def heldout_loss(model, samples: list[dict], precision: str) -> float:
    """Mean shifted cross-entropy over the trained tokens of `samples`, one sample at a time.

    The decoder body runs as usual; the head runs only on positions whose next token is labelled,
    which gives exactly the plain loss. The same function for every arm, so losses compare.
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = lm.get_output_embeddings()
    device = head.weight.device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    dtype = autocast_dtype(precision)
    with torch.autocast(
        device_type=device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None and device.type == "cuda"
    ):
        for s in samples:
            ids = torch.tensor([s["ids"]], device=device)
            targets = torch.tensor(s["labels"][1:], device=device)
            keep = targets != IGNORE_INDEX
            hidden = lm.model(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
            logits = head(hidden[keep]).float()
            total += torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum").double()
            count += int(keep.sum())
    model.train(was_training)
    return total.item() / max(count, 1)


def lora_info(model) -> dict:
    """Adapters attached and their initial weights, to check that every arm trains the same LoRA."""
    lora_a = [p for n, p in model.named_parameters() if "lora_A" in n]
    return {
        "modules": len(lora_a),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "lora_A_sum": float(sum(p.detach().double().sum() for p in lora_a)) if lora_a else None,
    }


# ---------------------------------------------------------------- measurement, the same for every arm


class Meter:
    """Token and FLOP counts per optimizer step, a synchronised step clock, the time cap, the eval losses."""

    def __init__(self, spec: dict, finetuning: str = "lora", precision: str | None = None):
        self.spec = spec
        self.finetuning = finetuning
        self.precision = precision or spec["precision"]
        self.pending = {"trained": 0, "real": 0, "positions": 0, "samples": 0, "flops": 0.0}
        self.steps: list[dict] = []
        self.t_begin = None
        self.capped = False
        self.eval_loss_start = None
        self.lora = None
        self.first_batch = None
        self.train_begin_seconds = None  # process start to the first step: imports, loading, data

    def count(self, inputs: dict) -> None:
        ids, labels = inputs["input_ids"], inputs["labels"]
        if self.first_batch is None:
            self.first_batch = {k: list(v.shape) for k, v in inputs.items() if torch.is_tensor(v)}
        lengths = batch_lengths(inputs, self.spec["pad_id"])
        trained = int((labels[:, 1:] != IGNORE_INDEX).sum())
        self.pending["trained"] += trained
        self.pending["real"] += sum(lengths)
        self.pending["positions"] += ids.numel()
        self.pending["samples"] += len(lengths)
        self.pending["flops"] += necessary_flops(lengths, trained, self.spec["counts"], self.finetuning)

    def sync(self) -> None:
        if cuda(self.spec):
            torch.cuda.synchronize()

    def begin(self, model) -> None:
        self.train_begin_seconds = time.perf_counter() - STARTED
        self.lora = lora_info(model)
        if self.spec.get("eval_samples"):
            self.eval_loss_start = heldout_loss(model, self.spec["eval_samples"], self.precision)
        if cuda(self.spec):
            torch.cuda.reset_peak_memory_stats()
        self.sync()
        self.t_begin = time.perf_counter()

    def step_end(self) -> bool:
        """Record the step; True when the arm's time cap is reached (training stops there)."""
        self.sync()
        clock = time.perf_counter() - self.t_begin
        self.steps.append({"clock": clock, **self.pending})
        self.pending = {k: 0 for k in self.pending}
        self.capped = clock >= self.spec["cap_seconds"]
        return self.capped

    def summary(self) -> dict:
        steps = self.steps
        warm = self.spec["warmup_steps"]
        # the first steps (lazy initialisation, allocator growth, kernel selection) are left out of the rates
        timed = steps[warm:] if len(steps) > warm else steps
        seconds = (
            (steps[-1]["clock"] - steps[warm - 1]["clock"])
            if len(steps) > warm
            else (steps[-1]["clock"] if steps else 0.0)
        )
        total = {k: sum(s[k] for s in steps) for k in ("trained", "real", "positions", "samples", "flops")}
        t = {k: sum(s[k] for s in timed) for k in ("trained", "real", "positions", "flops")}
        peak = self.spec.get("peak_flops")
        achieved = t["flops"] / seconds if seconds else None
        out = {
            "steps": len(steps),
            "capped": self.capped,
            "timed_steps": len(timed),
            "timed_seconds": seconds,
            "rates_include_warmup": len(steps) <= warm,
            "trained_tokens": total["trained"],
            "real_tokens": total["real"],
            "positions": total["positions"],
            "samples": total["samples"],
            "necessary_flops": total["flops"],
            "padding_share": 1 - total["real"] / max(total["positions"], 1),
            "trainable_tps": t["trained"] / seconds if seconds else None,
            "real_tps": t["real"] / seconds if seconds else None,
            "achieved_flops": achieved,
            "mfu": achieved / peak if achieved and peak else None,
            "train_seconds": steps[-1]["clock"] if steps else None,
            "setup_seconds": self.train_begin_seconds,
            "first_batch": self.first_batch,
            "lora": self.lora,
            "eval_loss_start": self.eval_loss_start,
            "per_step": [{k: (round(v, 4) if k == "clock" else v) for k, v in s.items()} for s in steps],
        }
        if cuda(self.spec):
            out["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
            out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
            out["peak_mem_kind"] = "torch.cuda.max_memory_allocated during training"
        else:
            out["peak_mem_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            out["peak_mem_kind"] = "peak RSS of the arm's process (no GPU)"
        return out


METER: Meter | None = None  # the run being measured; the hooks below read it
STARTED = time.perf_counter()


def instrument() -> None:
    """Hook `transformers.Trainer`: count every micro-batch, clock every optimizer step."""
    from transformers import Trainer, TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            METER.begin(model)

        def on_step_end(self, args, state, control, **kwargs):
            if METER.step_end():
                control.should_training_stop = True

    original_train, original_step = Trainer.train, Trainer.training_step

    def train(self, *args, **kwargs):
        self.add_callback(Clock())
        return original_train(self, *args, **kwargs)

    def training_step(self, model, inputs, *args, **kwargs):
        METER.count(inputs)
        return original_step(self, model, inputs, *args, **kwargs)

    Trainer.train, Trainer.training_step = train, training_step


def trainer_arguments(spec: dict, batch_size: int, accumulation: int = 1) -> dict:
    """The settings the Trainer-based arms share (TrainingArguments names)."""
    return dict(
        output_dir=spec["output_dir"],
        num_train_epochs=1,
        max_steps=spec["steps"],
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim=spec["optim"],
        seed=spec["seed"],
        data_seed=spec["seed"],
        logging_steps=100_000,
        save_strategy="no",
        report_to="none",
        use_cpu=not cuda(spec),
        bf16=spec["precision"] == "bf16",
        gradient_checkpointing=spec["gradient_checkpointing"],
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def load_model(spec: dict):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype, attn_implementation=spec["attention"])


def lora_config(spec: dict):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        target_modules=LORA_TARGETS,
        r=spec["lora_r"],
        lora_alpha=spec["lora_alpha"],
        lora_dropout=spec["lora_dropout"],
    )


def read_train(spec: dict) -> list[dict]:
    return json.loads(Path(spec["train_file"]).read_text(encoding="utf-8"))


# ---------------------------------------------------------------- arm a: the usual recipe


def arm_a(spec: dict, result: dict):
    """AutoModelForCausalLM in bf16 + peft LoRA + Trainer(bf16=True) + DataCollatorForSeq2Seq(padding=True),
    the model's own loss over full logits; prompt and answer tokenized separately, prompt labels -100,
    as the self-llm tutorials do. Micro-batches of `usual_micro_batch` samples, gradients accumulated up
    to the step's samples: padded to its longest sample, a whole step's samples do not fit at once."""
    from peft import get_peft_model
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    process = usual_recipe_example(tokenizer, spec["seq_len"])

    train = [process(r) for r in read_train(spec)]
    set_seed(spec["seed"])
    model = load_model(spec)
    model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(spec))
    micro = spec["usual_micro_batch"]
    args = TrainingArguments(**trainer_arguments(spec, micro, spec["samples_per_step"] // micro))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True),
    )
    trainer.train()
    result["settings"] = {
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": spec["samples_per_step"] // micro,
    }
    return trainer.model


# ---------------------------------------------------------------- arm b: TRL SFTTrainer, best settings


def arm_b(spec: dict, result: dict):
    """SFTTrainer: bfd packing into rows of seq_len (padding-free), completion-only loss on conversational
    prompt-completion records, its default loss (fused LM head over trained positions), Liger's layer
    kernels when installed. Its batch size counts packed rows: `rows_per_step` gives about the same
    samples per step as the other arms, over the same samples for one epoch."""
    import importlib.util

    from datasets import Dataset
    from transformers import AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    train = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": user_text(r)}],
                "completion": [{"role": "assistant", "content": r["output"]}],
            }
            for r in read_train(spec)
        ]
    )
    liger = cuda(spec) and importlib.util.find_spec("liger_kernel") is not None
    config = SFTConfig(
        **trainer_arguments(spec, spec["rows_per_step"]),
        max_length=spec["seq_len"],
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        completion_only_loss=True,
        loss_type="nll",
        use_liger_kernel=liger,
    )
    set_seed(spec["seed"])
    model = load_model(spec)
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=train, processing_class=tokenizer, peft_config=lora_config(spec)
    )
    trainer.train()
    result["settings"] = {"per_device_train_batch_size (packed rows)": spec["rows_per_step"], "liger_kernel": liger}
    return trainer.model


# ---------------------------------------------------------------- arm c: tunelab


def tunelab_config(spec: dict, **overrides):
    from tunelab.config import from_dict

    keys = {
        "model": spec["model"],
        "dataset": spec["train_file"],
        "template": "auto",
        "cutoff_len": spec["seq_len"],
        "finetuning_type": "lora",
        "lora_r": spec["lora_r"],
        "lora_alpha": spec["lora_alpha"],
        "lora_dropout": spec["lora_dropout"],
        "lora_target": "all-linear",
        "output_dir": spec["output_dir"],
        "overwrite_output_dir": True,
        "num_train_epochs": 1.0,
        "max_steps": spec["steps"],
        "per_device_train_batch_size": spec["samples_per_step"],
        "learning_rate": spec["learning_rate"],
        "lr_scheduler_type": "constant",
        "warmup_ratio": 0.0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "optim": spec["optim"],
        "seed": spec["seed"],
        "logging_steps": 100_000,
        "save_steps": 100_000,
        "attn_implementation": spec["attention"],
        "bf16": spec["precision"] == "bf16",
        "fp16": spec["precision"] == "fp16",
        "gradient_checkpointing": spec["gradient_checkpointing"],
        "report_to": "none",
    }
    return from_dict({**keys, **overrides})


def arm_c(spec: dict, result: dict):
    """`tunelab.train.run.train(cfg)`, packing and loss at tunelab's defaults; its batch size counts samples."""
    from tunelab.train.run import train

    run = train(tunelab_config(spec))
    summary = run.summary
    result["settings"] = {
        "per_device_train_batch_size": spec["samples_per_step"],
        **{k: summary.get(k) for k in ("packing", "labelled_loss", "dtype", "quirks")},
    }
    return run.model


# ---------------------------------------------------------------- full fine-tuning check


def full_ft(spec: dict, result: dict) -> None:
    """Full fine-tuning through tunelab in each precision of `precisions`: no error, losses finite, the
    held-out loss lower after the steps than before. One failing precision does not stop the next."""
    global METER
    from tunelab.train.run import train

    runs = []
    for precision in spec["precisions"]:
        out_dir = Path(spec["output_dir"]) / precision
        METER = Meter({**spec, "precision": precision}, finetuning="full", precision=precision)
        run = {"precision": precision}
        try:
            if cuda(spec):
                torch.cuda.reset_peak_memory_stats()
            cfg = tunelab_config(
                {**spec, "output_dir": str(out_dir), "precision": precision},
                finetuning_type="full",
                max_steps=spec["steps"],
                logging_steps=1,
            )
            trained = train(cfg)
            run.update(METER.summary())
            run["eval_loss_end"] = heldout_loss(trained.model, spec["eval_samples"], precision)
            losses = [m["loss"] for m in trained.metrics if "loss" in m]
            masters = [p.dtype for p in trained.model.parameters() if p.requires_grad]
            run.update(
                losses=losses,
                first_loss=losses[0] if losses else None,
                last_loss=losses[-1] if losses else None,
                trained_dtype=trained.summary.get("dtype"),
                quirks=trained.summary.get("quirks"),
                masters_fp32=all(d == torch.float32 for d in masters),
            )
            finite = bool(losses) and all(math.isfinite(x) for x in losses)
            falling = run["eval_loss_end"] < run["eval_loss_start"]
            run["ok"] = finite and falling
            if not run["ok"]:
                run["error"] = "loss not finite" if not finite else "held-out loss did not fall"
            del trained
        except Exception as exc:  # reported, and the next precision still runs
            run.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
            import traceback

            traceback.print_exc()
        runs.append(run)
        gc.collect()
        if cuda(spec):
            torch.cuda.empty_cache()
        shutil.rmtree(out_dir, ignore_errors=True)  # a full model per precision: gigabytes nobody reads
    result["runs"] = runs


ARMS = {"a": arm_a, "b": arm_b, "c": arm_c}


def main() -> None:
    global METER
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    if cuda(spec):
        torch.backends.cuda.matmul.allow_tf32 = True  # the same in every arm (tunelab turns it on by itself)
        torch.backends.cudnn.allow_tf32 = True
    instrument()
    result = {"arm": spec["arm"], "tag": spec["tag"]}
    if spec["arm"] == "fullft":
        full_ft(spec, result)
    else:
        METER = Meter(spec)
        model = ARMS[spec["arm"]](spec, result)
        result.update(METER.summary())  # peak memory read before the evaluation below adds to it
        result["eval_loss_end"] = heldout_loss(model, spec["eval_samples"], spec["precision"])
    result["wall_seconds"] = time.perf_counter() - STARTED
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
