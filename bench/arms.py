"""One benchmark arm in its own process, so peak memory is that arm's alone.

    python bench/arms.py SPEC.json OUT.json

SPEC (written by bench.py) names the arm (a, b or c), the saved model folder, the training file, the
held-out samples, the precision and the shared settings. Every arm is measured by the same hooks on
`transformers.Trainer`: per-step token counts from the batches `training_step` receives, a step
clock from a callback, and the held-out loss at fixed fractions of training, computed here the same
way for every arm and kept off the clock. With `prep_only` the arm stops where training would start,
which times a warm re-run of its data preparation.

Precision (`spec["precision"]`) is one policy for every arm: fp32, or bf16 = the frozen base loaded
in bf16, LoRA adapters in fp32 (peft's default upcast) and the forward under `torch.autocast("cpu",
bfloat16)` (Trainer `bf16=True`; tunelab `bf16: true`). The held-out loss runs under the same
autocast as training. A hook on one decoder projection records what actually ran (weight dtypes,
autocast on or off, matmul output dtype) in training and in evaluation, for bench.py to check.

tunelab (arm c) is measured through public names only: `train(cfg)` and the keys it writes in
`<output_dir>/run_summary.json` (`data_seconds`, `labelled_loss`, ...). A key that is missing fails
the arm loudly rather than leaving a figure out.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

IGNORE_INDEX = -100  # the label that losses skip: the transformers/PyTorch convention, not tunelab's
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}  # spec["precision"] -> the compute dtype


def compute_dtype(spec: dict) -> torch.dtype:
    """The compute dtype of the spec's precision (fp32 when the spec names none)."""
    precision = spec.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def autocast(dtype: torch.dtype | None):
    """CPU autocast to `dtype` as Trainer's `bf16=True` runs the forward; nothing for fp32 (or None)."""
    import contextlib

    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


class PrepOnly(Exception):
    """Raised where training would start, in a prep-only run."""


def user_text(record: dict) -> str:
    """The user turn of an alpaca record, as tunelab renders it for templates without an input section."""
    return f"{record['instruction']}\n\n{record['input']}" if record.get("input") else record["instruction"]


def usual_recipe_example(tokenizer, cutoff: int):
    """The tutorials' `process_func`: prompt (rendered by the chat template) and response tokenized apart,
    prompt labels -100, end-of-turn appended, cut at `cutoff`. Shared by the CPU and GPU benchmarks."""
    eos = tokenizer.eos_token_id

    def process(example: dict) -> dict:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text(example)}], tokenize=False, add_generation_prompt=True
        )
        instruction = tokenizer(prompt, add_special_tokens=False)
        response = tokenizer(example["output"], add_special_tokens=False)
        input_ids = instruction["input_ids"] + response["input_ids"] + [eos]
        attention_mask = instruction["attention_mask"] + response["attention_mask"] + [1]
        labels = [IGNORE_INDEX] * len(instruction["input_ids"]) + response["input_ids"] + [eos]
        return {"input_ids": input_ids[:cutoff], "attention_mask": attention_mask[:cutoff], "labels": labels[:cutoff]}

    return process


# ---------------------------------------------------------------- measurement, the same for every arm


def _vm_hwm() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes on the machine have used (from /proc/stat), or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@torch.no_grad()
def heldout_loss(model, samples: list[dict], autocast_dtype: torch.dtype | None = None) -> float:
    """Mean shifted cross-entropy over the labelled (assistant) tokens of `samples`, one sample at a time.

    The decoder body runs as usual; the head runs only on positions whose next token is labelled,
    which gives exactly the plain loss without building logits nobody reads. With `autocast_dtype`
    (bf16) body and head run under CPU autocast, as in training at that precision; the logits are
    cast to fp32 before the cross-entropy either way.
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = lm.get_output_embeddings()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for s in samples:
        ids = torch.tensor([s["ids"]])
        targets = torch.tensor(s["labels"][1:])
        keep = targets != IGNORE_INDEX
        with autocast(autocast_dtype):
            hidden = lm.model(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
            logits = head(hidden[keep])
        logits = logits.float()
        total += torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum").item()
        count += int(keep.sum())
    model.train(was_training)
    return total / max(count, 1)


class Meter:
    """Step clock, token counts and held-out losses of one training run."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.pad_id = spec["pad_id"]
        self.pending = {"trained": 0, "real": 0, "positions": 0, "rows": 0}
        self.steps: list[dict] = []
        self.evals: list[dict] = []
        self.t_begin = None
        self.eval_seconds = 0.0
        self.cpu_begin = None
        self.eval_cpu = 0.0
        self.first_batch = None
        self.lora = None
        self.hwm_reset = False
        self.eval_at: set[int] = set()
        self.machine_begin = None
        self.process_start = time.perf_counter()
        self.prep_seconds = None  # process start to the call of Trainer.train
        # in a prep-only run, Trainer.train returns at once without training instead of raising PrepOnly,
        # for an arm whose figures are written by its caller after training (arm c: tunelab's run summary)
        self.prep_only_returns = False
        self.dtype = compute_dtype(spec)
        self.phase = "eval"
        self.precision_seen: dict = {}  # what ran: see watch_precision

    def watch_precision(self, model) -> None:
        """Record, once per phase (train, eval), what one decoder projection of `model` really ran in.

        The projection is the first LoRA-wrapped linear layer's frozen base (the first linear layer of
        the decoder without LoRA): its weight dtype, the LoRA adapter's weight dtype, whether CPU autocast
        was on and to what, and the dtype of the matmul's output.
        """
        named = dict(model.named_modules())
        base = next(
            (m for n, m in named.items() if n.endswith(".base_layer") and isinstance(m, torch.nn.Linear)), None
        ) or next((m for n, m in named.items() if isinstance(m, torch.nn.Linear)), None)
        if base is None:
            return
        lora_a = next((p for n, p in model.named_parameters() if "lora_A" in n), None)
        self.precision_seen["base_weight_dtype"] = str(base.weight.dtype).replace("torch.", "")
        self.precision_seen["adapter_weight_dtype"] = (
            None if lora_a is None else str(lora_a.dtype).replace("torch.", "")
        )

        def hook(module, args, output):
            key = f"{self.phase}_matmul"
            if key not in self.precision_seen and torch.is_tensor(output):
                enabled = torch.is_autocast_enabled("cpu")
                self.precision_seen[key] = {
                    "autocast": str(torch.get_autocast_dtype("cpu")).replace("torch.", "") if enabled else None,
                    "input_dtype": str(args[0].dtype).replace("torch.", "")
                    if args and torch.is_tensor(args[0])
                    else None,
                    "output_dtype": str(output.dtype).replace("torch.", ""),
                }

        base.register_forward_hook(hook)

    def count(self, inputs: dict) -> None:
        ids, labels = inputs["input_ids"], inputs["labels"]
        if self.first_batch is None:
            self.first_batch = {k: list(v.shape) for k, v in inputs.items() if torch.is_tensor(v)}
        self.pending["trained"] += int((labels[:, 1:] != IGNORE_INDEX).sum())
        self.pending["real"] += int((ids != self.pad_id).sum())
        self.pending["positions"] += ids.numel()
        self.pending["rows"] += ids.shape[0]

    def clock(self) -> float:
        return time.perf_counter() - self.t_begin - self.eval_seconds

    def cpu_clock(self) -> float:
        """CPU seconds of this process (all threads) since training began, evaluations left out."""
        return _cpu_seconds() - self.cpu_begin - self.eval_cpu

    def evaluate(self, model, step: int) -> None:
        started, cpu = time.perf_counter(), _cpu_seconds()
        self.phase = "eval"
        try:
            loss = heldout_loss(model, self.spec["eval_samples"], self.dtype)
        finally:
            self.phase = "train"
        clock = 0.0 if self.t_begin is None else self.clock()
        self.evals.append(
            {"step": step, "clock": clock, "trained_tokens": sum(s["trained"] for s in self.steps), "loss": loss}
        )
        if self.t_begin is not None:
            self.eval_seconds += time.perf_counter() - started
            self.eval_cpu += _cpu_seconds() - cpu

    def begin(self, model, max_steps: int) -> None:
        lora_a = [p for n, p in model.named_parameters() if "lora_A" in n]
        self.lora = {
            "modules": len(lora_a),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "lora_A_sum": float(sum(p.double().sum() for p in lora_a)),
            "lora_A_abs_sum": float(sum(p.double().abs().sum() for p in lora_a)),
        }
        self.eval_at = {max(1, round(f * max_steps)) for f in self.spec["eval_fractions"]}
        self.watch_precision(model)
        self.evaluate(model, 0)
        self.hwm_reset = _reset_hwm()
        self.t_begin, self.cpu_begin = time.perf_counter(), _cpu_seconds()
        self.machine_begin = (busy_cpu_seconds(), _cpu_seconds(), time.perf_counter())

    def step_end(self, model, step: int) -> None:
        self.steps.append({"step": step, "clock": self.clock(), "cpu": self.cpu_clock(), **self.pending})
        self.pending = {k: 0 for k in self.pending}
        if step in self.eval_at:
            self.evaluate(model, step)

    def summary(self) -> dict:
        steps = self.steps
        total = {k: sum(s[k] for s in steps) for k in ("trained", "real", "positions", "rows")}
        # step 1 (lazy initialisation, first allocation of every buffer) is left out of the rates
        timed = steps[1:] if len(steps) > 1 else steps
        seconds = (steps[-1]["clock"] - steps[0]["clock"]) if len(steps) > 1 else (steps[0]["clock"] if steps else 0)
        cpu = (steps[-1]["cpu"] - steps[0]["cpu"]) if len(steps) > 1 else (steps[0]["cpu"] if steps else 0)
        machine, own, wall = self.machine_begin
        busy = busy_cpu_seconds()
        others = (
            None
            if busy is None or machine is None
            else max(0.0, (busy - machine) - (_cpu_seconds() - own)) / ((time.perf_counter() - wall) * os.cpu_count())
        )
        trained = sum(s["trained"] for s in timed)
        real = sum(s["real"] for s in timed)
        return {
            "steps": len(steps),
            "trained_tokens": total["trained"],
            "real_tokens": total["real"],
            "positions": total["positions"],
            "rows": total["rows"],
            "trained_tokens_per_step": total["trained"] / max(len(steps), 1),
            "padding_share": 1 - total["real"] / max(total["positions"], 1),
            "timed_steps": len(timed),
            "timed_seconds": seconds,
            "trainable_tps": trained / seconds if seconds else None,
            "total_tps": real / seconds if seconds else None,
            "train_seconds": steps[-1]["clock"] if steps else None,
            # CPU seconds per wall second per torch thread over the timed steps: well below 1 means the
            # arm waited (on memory, on Python, or on other processes sharing the machine)
            "cpu_utilization": cpu / seconds / torch.get_num_threads() if seconds else None,
            # share of the machine's CPUs that other processes used meanwhile: timings are only
            # comparable when this is near 0
            "others_cpu_share": others,
            "eval_curve": self.evals,
            "final_eval_loss": self.evals[-1]["loss"] if self.evals else None,
            "first_batch": self.first_batch,
            "lora": self.lora,
            "precision": self.spec.get("precision", "fp32"),
            "precision_seen": self.precision_seen,
            "train_peak_rss_bytes": _vm_hwm() if self.hwm_reset else None,
            "per_step": steps,
        }


def instrument(meter: Meter, prep_only: bool) -> None:
    """Hook `transformers.Trainer` (every arm's trainer subclasses it): count tokens, keep the clock."""
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import TrainOutput

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            meter.begin(model, state.max_steps)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            meter.step_end(model, state.global_step)

    original_train, original_step = Trainer.train, Trainer.training_step

    def train(self, *args, **kwargs):
        meter.prep_seconds = time.perf_counter() - meter.process_start
        if prep_only:
            if meter.prep_only_returns:
                return TrainOutput(global_step=0, training_loss=0.0, metrics={})
            raise PrepOnly()
        self.add_callback(Clock())
        return original_train(self, *args, **kwargs)

    def training_step(self, model, inputs, *args, **kwargs):
        meter.count(inputs)
        return original_step(self, model, inputs, *args, **kwargs)

    Trainer.train, Trainer.training_step = train, training_step


class Timer:
    """Accumulated seconds spent inside wrapped functions."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.calls += 1

        return timed


def training_arguments(spec: dict, batch_size: int) -> dict:
    """The settings every arm shares (TrainingArguments names); bf16 = Trainer's autocast (CPU too)."""
    return dict(
        output_dir=spec["output_dir"],
        num_train_epochs=1,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=spec["seed"],
        data_seed=spec["seed"],
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=compute_dtype(spec) == torch.bfloat16,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def load_model(spec: dict):
    """The saved model with its (frozen) weights in the compute dtype, as tunelab loads a LoRA base."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(spec["model"], dtype=compute_dtype(spec), attn_implementation="sdpa")


# ---------------------------------------------------------------- arm a: the usual recipe


def arm_a(spec: dict, meter: Meter, result: dict) -> None:
    """Trainer + DataCollatorForSeq2Seq(padding=True) + peft LoRA + the model's own loss.

    Tokenized per example in `datasets.map`, prompt and response separately, prompt labels -100, as
    in the self-llm tutorials (which load the tokenizer with use_fast=False).
    """
    import pandas as pd
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    tokenizer = AutoTokenizer.from_pretrained(spec["model"], use_fast=False)
    result["tokenizer"] = {"class": type(tokenizer).__name__, "is_fast": tokenizer.is_fast, "use_fast": False}
    process_func = usual_recipe_example(tokenizer, spec["cutoff_len"])

    started = time.perf_counter()
    frame = pd.read_json(spec["train_file"], dtype=False)
    frame["input"] = frame["input"].fillna("")
    raw = Dataset.from_pandas(frame)
    train = raw.map(process_func, remove_columns=raw.column_names)
    result["tokenize_seconds"] = time.perf_counter() - started

    set_seed(spec["seed"])
    model = load_model(spec)
    model.enable_input_require_grads()
    model = get_peft_model(
        model,
        LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            target_modules=LORA_TARGETS,
            r=spec["lora_r"],
            lora_alpha=spec["lora_alpha"],
            lora_dropout=spec["lora_dropout"],
        ),
    )
    args = TrainingArguments(**training_arguments(spec, spec["samples_per_step"]))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True),
    )
    trainer.train()


# ---------------------------------------------------------------- arm b: TRL SFTTrainer, best settings


def arm_b(spec: dict, meter: Meter, result: dict) -> None:
    """SFTTrainer: bfd packing (padding-free), completion-only loss on prompt-completion data, default loss."""
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from transformers import AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    result["tokenizer"] = {"class": type(tokenizer).__name__, "is_fast": tokenizer.is_fast}
    prep = Timer()
    SFTTrainer._prepare_dataset = prep.wrap(SFTTrainer._prepare_dataset)

    started = time.perf_counter()
    records = json.loads(Path(spec["train_file"]).read_text(encoding="utf-8"))
    train = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": user_text(r)}],
                "completion": [{"role": "assistant", "content": r["output"]}],
            }
            for r in records
        ]
    )
    build_seconds = time.perf_counter() - started

    config = SFTConfig(
        **training_arguments(spec, spec["rows_per_step"]),
        max_length=spec["cutoff_len"],
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        completion_only_loss=True,
        loss_type="nll",
    )
    set_seed(spec["seed"])
    model = load_model(spec)
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        target_modules=LORA_TARGETS,
        r=spec["lora_r"],
        lora_alpha=spec["lora_alpha"],
        lora_dropout=spec["lora_dropout"],
    )
    try:
        trainer = SFTTrainer(
            model=model, args=config, train_dataset=train, processing_class=tokenizer, peft_config=lora
        )
        trainer.train()
    finally:
        result["tokenize_seconds"] = build_seconds + prep.seconds


# ---------------------------------------------------------------- arm c: tunelab's default

RUN_SUMMARY = "run_summary.json"  # what tunelab's train(cfg) leaves in its output_dir


def read_run_summary(output_dir: Path) -> dict:
    """The run summary tunelab's `train(cfg)` wrote in `output_dir`; raises if there is none."""
    path = output_dir / RUN_SUMMARY
    if not path.is_file():
        raise FileNotFoundError(
            f"tunelab's train(cfg) left no {RUN_SUMMARY} in {output_dir}: the bench reads "
            "arm c's figures from it; tunelab's run summary changed, update bench/arms.py"
        )
    return json.loads(path.read_text())


def summary_key(summary: dict, key: str):
    """summary[key], or a KeyError that says tunelab's run summary changed (never a silent None)."""
    if key not in summary:
        raise KeyError(
            f"tunelab's {RUN_SUMMARY} has no key {key!r} (it has {sorted(summary)}): tunelab's run "
            "summary changed, update bench/arms.py"
        )
    return summary[key]


def arm_c(spec: dict, meter: Meter, result: dict) -> None:
    """`tunelab.train.run.train(cfg)` with a config from `tunelab.config.from_dict`, defaults otherwise.

    tunelab packs each batch's samples into rows of `cutoff_len`, so its batch size counts samples,
    the same as arm a's.
    """
    from tunelab.config import from_dict
    from tunelab.train.run import train

    meter.prep_only_returns = True  # a prep-only run still ends with the run summary, which times the data

    cfg = from_dict(
        {
            "model": spec["model"],
            "dataset": spec["train_file"],
            "template": "auto",
            "cutoff_len": spec["cutoff_len"],
            "finetuning_type": "lora",
            "lora_r": spec["lora_r"],
            "lora_alpha": spec["lora_alpha"],
            "lora_dropout": spec["lora_dropout"],
            "lora_target": "all-linear",
            "output_dir": spec["output_dir"],
            "overwrite_output_dir": True,
            "num_train_epochs": 1.0,
            "per_device_train_batch_size": spec["samples_per_step"],
            "learning_rate": spec["learning_rate"],
            "lr_scheduler_type": "constant",
            "warmup_ratio": 0.0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "optim": "adamw_torch",
            "seed": spec["seed"],
            "logging_steps": 10_000,
            "save_steps": 10_000,
            "attn_implementation": "sdpa",
            "bf16": compute_dtype(spec) == torch.bfloat16,
            "gradient_checkpointing": False,
            "report_to": "none",
        }
    )
    from transformers import set_seed

    set_seed(spec["seed"])
    train(cfg)
    summary = read_run_summary(Path(spec["output_dir"]))
    result["tokenize_seconds"] = float(summary_key(summary, "data_seconds"))  # building the tokenized datasets
    result["labelled_loss"] = summary_key(summary, "labelled_loss")  # trained with the labelled-position loss
    result["run_summary"] = {
        k: summary_key(summary, k) for k in ("packing", "global_step", "trained_tokens", "train_samples", "dtype")
    }


# ---------------------------------------------------------------- where a step's time goes


def _timed(fn, repeats: int = 2) -> float:
    fn()  # warm-up: first allocations, lazy initialisation
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)  # the least disturbed of the repeats


def profile(spec: dict, meter: Meter, result: dict) -> None:
    """Forward + backward of one step's batch of arm `profile_arm`, split into decoder body and head + loss.

    The batch is the first `samples_per_step` training samples: padded for a, one flat packed row for
    b (TRL's padding-free collation), tunelab's packed rows (its own collator) for c. Body = the decoder alone with a
    random gradient on its output; head + loss = the whole step minus the body. One arm per process:
    an arm that runs after another inherits its heap and pays different page faults. At bf16 the model
    is loaded in bf16 and every timed pass runs under CPU autocast, as in training. With
    `matmul_gflops` the run also times the head's matmul in fp32 and in bf16.
    """
    from peft import LoraConfig, TaskType, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from tunelab.data.packing import PackCollator
    from tunelab.model.loss import labelled_loss

    samples = spec["profile_samples"]
    pad = spec["pad_id"]
    torch.manual_seed(spec["seed"])
    model = load_model(spec)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer adds
    model = get_peft_model(
        model,
        LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            target_modules=LORA_TARGETS,
            r=spec["lora_r"],
            lora_alpha=spec["lora_alpha"],
            lora_dropout=0.0,
        ),
    )
    lm = model.get_base_model()

    width = max(len(s["ids"]) for s in samples)
    padded = {
        "input_ids": torch.full((len(samples), width), pad),
        "labels": torch.full((len(samples), width), IGNORE_INDEX),
        "attention_mask": torch.zeros(len(samples), width, dtype=torch.long),
    }
    for i, s in enumerate(samples):
        n = len(s["ids"])
        padded["input_ids"][i, :n] = torch.tensor(s["ids"])
        padded["attention_mask"][i, :n] = 1
        padded["labels"][i, :n] = torch.tensor(s["labels"])
    flat = {
        "input_ids": torch.tensor([[t for s in samples for t in s["ids"]]]),
        "labels": torch.tensor([[t for s in samples for t in [IGNORE_INDEX] + s["labels"][1:]]]),
        "position_ids": torch.tensor([[p for s in samples for p in range(len(s["ids"]))]]),
    }
    packed = PackCollator(pad, spec["cutoff_len"])([{"input_ids": s["ids"], "labels": s["labels"]} for s in samples])

    def body(batch):
        def run():
            inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
            hidden = lm.model(**inputs, use_cache=False).last_hidden_state
            (hidden * torch.randn_like(hidden)).sum().backward()
            model.zero_grad(set_to_none=True)

        return run

    def whole(loss_fn):
        def run():
            loss_fn().backward()
            model.zero_grad(set_to_none=True)

        return run

    def trl_loss():
        out = model(**flat, fused_lm_head=True)
        return -out.log_probs.sum() / out.label_mask.sum()

    cases = {
        "a": (padded, lambda: model(**padded, use_cache=False).loss),
        "b": (flat, trl_loss),
        "c": (packed, lambda: labelled_loss(model, packed)),
    }
    model.train()
    arm = spec["profile_arm"]
    batch, loss_fn = cases[arm]
    dtype = compute_dtype(spec)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with autocast(dtype):
        total_s = _timed(whole(loss_fn))
    after = resource.getrusage(resource.RUSAGE_SELF)
    with autocast(dtype):
        body_s = _timed(body(batch))
    labels = batch["labels"]
    out = {
        "positions": batch["input_ids"].numel(),
        "real_tokens": int((batch["input_ids"] != pad).sum()),
        "trained_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum()),
        "step_seconds": total_s,
        "body_seconds": body_s,
        "head_and_loss_seconds": max(total_s - body_s, 0.0),
        # kernel time (mostly zeroing freshly mapped pages of large temporaries) per whole step
        "sys_seconds_per_step": (after.ru_stime - usage.ru_stime) / 3,
        "page_faults_per_step": (after.ru_minflt - usage.ru_minflt) / 3,
    }
    mm = {}
    if spec.get("matmul_gflops", True):
        weight = lm.get_output_embeddings().weight.detach()
        for name, mm_dtype in PRECISIONS.items():
            head = weight.to(mm_dtype)
            for n in (1024, 4096):
                h = torch.randn(n, head.shape[1], dtype=mm_dtype)
                seconds = _timed(lambda: h @ head.t())
                mm[f"{name} hidden[{n}] @ head.T"] = 2 * n * head.shape[0] * head.shape[1] / seconds / 1e9
            del head
    result["profile"] = {
        "arms": {arm: out},
        "matmul_gflops": mm,
        "samples": len(samples),
        "packed_rows": packed["input_ids"].shape[0],
        "precision": spec.get("precision", "fp32"),
    }


ARMS = {"a": arm_a, "b": arm_b, "c": arm_c, "profile": profile}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    meter = Meter(spec)
    instrument(meter, spec.get("prep_only", False))
    result = {
        "arm": spec["arm"],
        "model": spec["model_name"],
        "round": spec.get("round"),
        "prep_only": spec.get("prep_only", False),
        "threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
    }
    try:
        ARMS[spec["arm"]](spec, meter, result)
    except PrepOnly:
        pass
    result["prep_seconds"] = meter.prep_seconds
    if meter.steps:
        result.update(meter.summary())
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["wall_seconds"] = time.perf_counter() - meter.process_start
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
