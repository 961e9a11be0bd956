"""The one config object: flat YAML keys, `key=value` overrides, validated once at load.

Training keys keep the names of transformers' `TrainingArguments` so a tutorial's values carry over;
the rest follow LLaMA-Factory where it has a name for the same thing. Every problem in a file is
reported at once, each naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml

from .errors import TunelabError

LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)

GROUPS = ("model", "data", "speed", "adapters", "run", "training", "preference", "distributed")
PREF_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")


def key(
    default: Any,
    help: str,
    *,
    group: str,
    choices: tuple = (),
    positive: bool = False,
    unit_interval: bool = False,
    required: bool = False,
    data: bool = False,
    resume_may_change: bool = False,
) -> Any:
    """A config field whose facts (help, checks, cache and resume roles) sit beside it, so nothing else lists keys.

    data: the key changes the tokenized samples, so the tokenization cache key must cover it.
    resume_may_change: a resumed run may change it, as it changes how long a run trains, logs or saves,
    not what a step computes.
    """
    if group not in GROUPS:
        raise ValueError(f"group {group!r} is not one of {GROUPS}")
    return dataclasses.field(
        default=default,
        metadata={
            "help": help,
            "group": group,
            "choices": tuple(choices),
            "positive": positive,
            "unit_interval": unit_interval,
            "required": required,
            "data": data,
            "resume_may_change": resume_may_change,
        },
    )


@dataclass
class Config:
    model: str = key("", "The base model to fine-tune: a local folder or a hub id.", group="model", required=True)
    model_hub: str = key(
        "hf",
        "Which hub resolves a model or dataset id that is not a local path.",
        group="model",
        choices=("hf", "modelscope"),
        data=True,
    )
    trust_remote_code: bool = key(
        False,
        "Lets a model's own Python code from the hub run; off because that code runs on your machine.",
        group="model",
    )
    allow_pickle: bool = key(
        False,
        "Lets pickle-based .bin/.pt weights load; off because loading a pickle can run code, so only safetensors load.",
        group="model",
    )
    load_in_4bit: bool = key(
        False,
        "QLoRA: the frozen base in 4-bit NF4 (double quantisation, computing in the "
        "training precision) through bitsandbytes; LoRA only.",
        group="model",
    )
    load_in_8bit: bool = key(
        False, "The frozen base in 8-bit (LLM.int8) through bitsandbytes; LoRA only.", group="model"
    )
    attn_implementation: str = key(
        "auto",
        "The attention kernel; auto = FlashAttention-2 where it runs (compute capability 8.0+, bf16/fp16), else sdpa.",
        group="model",
        choices=("auto", "eager", "sdpa", "flash_attention_2"),
    )

    dataset: Union[str, list] = key(
        "",
        "The training data: a file, a folder, a list of them, or a hub dataset name.",
        group="data",
        required=True,
        data=True,
    )
    eval_dataset: Union[str, list, None] = key(
        None, "Held-out data for the eval loss during training, in the same forms as dataset.", group="data", data=True
    )
    dataset_format: str = key(
        "auto",
        "How records are laid out; auto detects it from the first record's fields.",
        group="data",
        data=True,
        choices=("auto", "alpaca", "dolly", "sharegpt", "messages", "text"),
    )
    columns: Union[dict, None] = key(
        None,
        "Our field name -> your column name (e.g. {instruction: question}), so data need not be renamed.",
        group="data",
        data=True,
    )
    template: str = key(
        "auto",
        "The chat template that renders conversations; auto = the tokenizer's own, so "
        "training renders as inference will.",
        group="data",
        data=True,
        choices=("auto", "chatml", "llama3", "gemma", "alpaca", "dolly"),
    )
    system: Union[str, None] = key(
        None, "A system prompt put first in every conversation that has none.", group="data", data=True
    )
    cutoff_len: int = key(
        1024,
        "The longest sample in tokens; longer ones are cut, which bounds memory per step.",
        group="data",
        positive=True,
        data=True,
    )
    max_samples: Union[int, None] = key(
        None, "Use only the first N records, for a quick trial.", group="data", positive=True, data=True
    )
    val_size: float = key(
        0.0,
        "Holds out part of the training data for evaluation: a fraction in [0, 1) or a whole count of records.",
        group="data",
        data=True,
    )
    train_on: str = key(
        "assistant",
        "Which tokens are trained: every assistant answer, only the last one, or all tokens.",
        group="data",
        choices=("assistant", "last", "all"),
        data=True,
    )
    tools: Union[str, None] = key(
        None,
        "A JSON file of tool (function) definitions for records that carry no "
        "`tools` of their own; rendered by the chat template as at inference.",
        group="data",
        data=True,
    )
    reasoning: str = key(
        "keep",
        "Which thinking is trained: every assistant turn's (a turn whose thinking the "
        "template drops from history trains in a sample of its own), only the last turn's, or "
        "none (thinking off, as `enable_thinking: false` at inference).",
        group="data",
        choices=("keep", "last", "drop"),
        data=True,
    )
    expand_turns: bool = key(
        True,
        "A turn the template renders differently once later turns follow (a moved "
        "system prompt, dropped history reasoning) trains in a sample of its own, rendered as "
        "inference renders it; false refuses such conversations instead.",
        group="data",
        data=True,
    )
    bad_records: str = key(
        "error",
        "What a record that cannot be read as a conversation does: stop with an "
        "error naming it, or skip it (counted and named in the data report).",
        group="data",
        choices=("error", "skip"),
        data=True,
    )
    streaming: bool = key(
        False,
        "Reads the training data as it trains, chunk by chunk, never whole (JSONL and "
        "Parquet lazily, hub datasets in streaming mode): for data larger than memory. Needs "
        "max_steps; trains in file order, pass after pass, in one process; no val_size (use "
        "eval_dataset).",
        group="data",
    )
    preprocessing_num_workers: Union[int, None] = key(
        None,
        "Processes that read, render and tokenize the data, "
        "chunk by chunk, with the same samples in the same order as "
        "one; null = every core (up to 32).",
        group="data",
        positive=True,
        resume_may_change=True,
    )
    packing: Union[bool, None] = key(
        None,
        "Samples share rows of cutoff_len tokens with restarting position_ids: "
        "no padding, same samples per step as unpacked; null = on for architectures "
        "where it is exact.",
        group="speed",
    )
    group_by_length: Union[bool, None] = key(
        None,
        "Batches samples of similar length, so less padding is computed; null = on when not packing.",
        group="speed",
    )

    finetuning_type: str = key(
        "lora",
        "lora trains small adapters on a frozen model; full trains every weight.",
        group="adapters",
        choices=("lora", "full"),
    )
    lora_r: int = key(8, "The LoRA rank: more capacity per adapter for more memory.", group="adapters", positive=True)
    lora_alpha: int = key(
        16, "The LoRA scale: an adapter's update is multiplied by lora_alpha / lora_r.", group="adapters", positive=True
    )
    lora_dropout: float = key(
        0.05, "Dropout on the adapters' input, against overfitting small data.", group="adapters", unit_interval=True
    )
    lora_target: Union[str, list] = key(
        "all-linear",
        "Which linear layers get adapters: all-linear, names like q_proj,v_proj, or a regex.",
        group="adapters",
    )
    use_rslora: bool = key(
        False,
        "Scales adapters by lora_alpha / sqrt(lora_r) (rank-stabilized LoRA), so high ranks keep learning.",
        group="adapters",
    )
    use_dora: bool = key(
        False,
        "Weight-decomposed LoRA (DoRA), often closer to full fine-tuning at some cost in speed.",
        group="adapters",
    )

    output_dir: str = key(
        "",
        "The run folder: adapter or model, tokenizer, resolved config, metrics and checkpoints.",
        group="run",
        required=True,
        resume_may_change=True,
    )
    overwrite_output_dir: bool = key(
        False,
        "Allows replacing a finished run in output_dir; off so no run is lost by accident.",
        group="run",
        resume_may_change=True,
    )
    resume_from_checkpoint: Union[str, None] = key(
        None,
        "Continues an interrupted run: auto = the latest complete checkpoint in output_dir, or a checkpoint path.",
        group="run",
        resume_may_change=True,
    )
    report_to: str = key(
        "none",
        "Where metrics go besides metrics.jsonl and loss.png.",
        group="run",
        choices=("none", "tensorboard", "swanlab", "wandb"),
        resume_may_change=True,
    )
    run_name: Union[str, None] = key(
        None, "The run's name in the tracker; null = output_dir's folder name.", group="run", resume_may_change=True
    )

    num_train_epochs: float = key(
        3.0, "Passes over the training data, unless max_steps is set.", group="training", resume_may_change=True
    )
    max_steps: int = key(
        -1,
        "Optimizer steps to train, overriding num_train_epochs; -1 = use num_train_epochs.",
        group="training",
        resume_may_change=True,
    )
    per_device_train_batch_size: int = key(
        1, "Samples per device per forward pass: the main memory knob.", group="training", positive=True
    )
    per_device_eval_batch_size: int = key(
        1, "Samples per device per evaluation forward pass.", group="training", positive=True, resume_may_change=True
    )
    gradient_accumulation_steps: int = key(
        1,
        "Forward passes per optimizer step: a large batch at the memory of a small one.",
        group="training",
        positive=True,
    )
    learning_rate: float = key(1e-4, "The peak learning rate (greater than 0), reached after warmup.", group="training")
    lr_scheduler_type: str = key(
        "cosine", "How the learning rate changes over the run.", group="training", choices=LR_SCHEDULERS
    )
    warmup_ratio: float = key(
        0.0,
        "Share of the steps spent ramping the learning rate up from 0, for stable first steps.",
        group="training",
        unit_interval=True,
    )
    weight_decay: float = key(0.0, "Decoupled weight decay, a mild regularizer.", group="training")
    max_grad_norm: float = key(
        1.0, "Gradients are clipped to this norm, so one bad batch cannot wreck the weights.", group="training"
    )
    optim: str = key(
        "adamw_torch",
        "The optimizer; the 8-bit ones (bitsandbytes) need less optimizer memory.",
        group="training",
        choices=("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adamw_8bit", "paged_adamw_8bit"),
    )
    logging_steps: int = key(
        10, "Log loss and learning rate every this many steps.", group="training", positive=True, resume_may_change=True
    )
    save_steps: int = key(
        500,
        "Write a checkpoint every this many steps, so a crash loses at most that much.",
        group="training",
        positive=True,
        resume_may_change=True,
    )
    save_total_limit: Union[int, None] = key(
        None,
        "Keep only the newest N checkpoints, to bound disk use; null = keep all.",
        group="training",
        positive=True,
        resume_may_change=True,
    )
    eval_steps: Union[int, None] = key(
        None,
        "Evaluate on the held-out data every this many steps; null = every 10 x logging_steps.",
        group="training",
        positive=True,
        resume_may_change=True,
    )
    seed: int = key(
        42,
        "Seeds the validation split, shuffling and adapter init, so a config repeats its run.",
        group="training",
        data=True,
    )
    gradient_checkpointing: bool = key(
        False, "Recomputes activations in the backward pass: less memory for more compute.", group="training"
    )
    on_bad_loss: str = key(
        "stop",
        "What a NaN/inf loss, or one over loss_spike_factor x its running mean, does: "
        "stop (naming the last checkpoint), skip the step, or warn.",
        group="training",
        choices=("stop", "skip", "warn"),
        resume_may_change=True,
    )
    loss_spike_factor: Union[float, None] = key(
        None,
        "A loss over this many times its running mean counts as bad (see on_bad_loss); null = only NaN/inf.",
        group="training",
        positive=True,
        resume_may_change=True,
    )
    bf16: Union[bool, None] = key(
        None,
        "Train in bfloat16; null = auto: bf16 on GPUs that have it, fp16 on other GPUs, fp32 on CPU.",
        group="training",
    )
    fp16: Union[bool, None] = key(None, "Train in float16; null = auto (see bf16).", group="training")
    pure_bf16: bool = key(
        False,
        "Weights, gradients and optimizer states all in bf16, no fp32 master copy: 10 "
        "bytes less per trained parameter than mixed precision, at some cost in accuracy; "
        "AdamW then rounds each update stochastically so that small updates are not lost.",
        group="training",
    )

    stage: str = key(
        "sft",
        "What the run trains: sft (supervised answers), dpo (preferred over rejected answers, any "
        "pref_loss), kto (answers marked desirable or not).",
        group="preference",
        choices=("sft", "dpo", "kto"),
        data=True,
    )
    pref_loss: str = key(
        "sigmoid",
        "The dpo stage's loss: sigmoid (DPO), ipo, hinge, robust (DPO for noisy labels, with label_smoothing), "
        "orpo or simpo (both without a reference model).",
        group="preference",
        choices=PREF_LOSSES,
    )
    pref_beta: float = key(
        0.1,
        "How far the policy may move from the reference (DPO's beta; IPO's tau; ORPO's lambda; KTO's beta).",
        group="preference",
        positive=True,
    )
    pref_ftx: float = key(
        0.0,
        "Weight of a supervised loss on the chosen answers added to the preference loss; 0 = none.",
        group="preference",
    )
    simpo_gamma: float = key(0.5, "SimPO's target reward margin.", group="preference")
    label_smoothing: float = key(
        0.0,
        "The share of preference labels assumed flipped (robust DPO; conservative DPO with sigmoid; simpo); "
        "in [0, 0.5).",
        group="preference",
    )
    kto_chosen_weight: float = key(
        1.0, "KTO's weight of the desirable answers' loss.", group="preference", positive=True
    )
    kto_rejected_weight: float = key(
        1.0, "KTO's weight of the undesirable answers' loss.", group="preference", positive=True
    )
    precompute_ref: bool = key(
        False,
        "Full fine-tuning: the reference model's log-probs are computed once before training (kept in the run "
        "folder for a resume), so no reference copy sits in memory while training.",
        group="preference",
    )

    nproc_per_node: Union[int, None] = key(
        None,
        "Training processes on this machine, one per GPU; null = auto: "
        "every visible GPU, one process without a GPU (2 or more on CPU "
        "run over gloo).",
        group="distributed",
        positive=True,
    )
    nnodes: int = key(
        1,
        "Machines in the job; run the same command on each, with its own node_rank.",
        group="distributed",
        positive=True,
    )
    node_rank: int = key(
        0,
        "This machine's place in the job, 0 to nnodes - 1; node 0 hosts the rendezvous.",
        group="distributed",
        resume_may_change=True,
    )
    master_addr: str = key(
        "127.0.0.1", "Address of node 0, reachable from every node.", group="distributed", resume_may_change=True
    )
    master_port: Union[int, None] = key(
        None,
        "Port of the rendezvous on node 0; null = a free port on one machine, 29500 across machines.",
        group="distributed",
        positive=True,
        resume_may_change=True,
    )
    distributed: str = key(
        "auto",
        "How several processes share the work: ddp (every process holds the whole "
        "model), fsdp2 (PyTorch FSDP2: parameters, gradients and optimizer state sharded), "
        "deepspeed (ZeRO, see zero_stage); auto = ddp when the model and its optimizer state fit "
        "one device, else fsdp2.",
        group="distributed",
        choices=("auto", "ddp", "fsdp2", "deepspeed"),
    )
    zero_stage: int = key(
        3,
        "DeepSpeed ZeRO stage under distributed: deepspeed: 2 shards gradients and optimizer "
        "state, 3 the parameters too.",
        group="distributed",
        choices=(2, 3),
    )
    offload: str = key(
        "none",
        "Moves state to CPU memory under fsdp2/deepspeed: optimizer (its state), params "
        "(parameters too; fsdp2 offloads both together).",
        group="distributed",
        choices=("none", "optimizer", "params"),
    )
    deepspeed: Union[str, None] = key(
        None,
        "Your own DeepSpeed JSON file; tunelab then uses it as it is instead of "
        "writing one (implies distributed: deepspeed).",
        group="distributed",
    )
    device_map: Union[str, None] = key(
        None,
        "One process spreads the model's layers over this machine's GPUs "
        "(accelerate's placement; the layers run one GPU after another): the "
        "fallback for a model no engine can shard, e.g. remote code.",
        group="distributed",
        choices=("auto", "balanced", "sequential"),
    )
    ddp_timeout: int = key(
        300,
        "Seconds a process waits for the others in a collective before the job fails "
        "(a crashed or stuck rank then ends the job instead of hanging it).",
        group="distributed",
        positive=True,
        resume_may_change=True,
    )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def datasets(self) -> list[str]:
        return [self.dataset] if isinstance(self.dataset, str) else list(self.dataset)

    @property
    def eval_datasets(self) -> list[str]:
        if self.eval_dataset is None:
            return []
        return [self.eval_dataset] if isinstance(self.eval_dataset, str) else list(self.eval_dataset)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
DATA_KEYS = tuple(name for name, f in FIELDS.items() if f.metadata["data"])
RESUME_MAY_CHANGE = frozenset(name for name, f in FIELDS.items() if f.metadata["resume_may_change"])


def _allowed_types(name: str) -> tuple:
    declared = FIELDS[name].type
    hint = eval(declared, {"Union": Union}) if isinstance(declared, str) else declared
    if get_origin(hint) is Union:
        return tuple(t if t is not type(None) else type(None) for t in get_args(hint))
    return (hint,)


def _type_name(types: tuple) -> str:
    names = {
        bool: "true/false",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
        type(None): "null",
    }
    return " or ".join(names.get(t, t.__name__) for t in types)


def _coerce(name: str, value: Any) -> tuple[Any, str | None]:
    """Return (value, error). Ints are accepted where floats are; '1e-4' strings (YAML 1.1) become floats."""
    types = _allowed_types(name)
    if value is None and type(None) in types:
        return None, None
    if isinstance(value, bool):
        return (value, None) if bool in types else (value, f"expected {_type_name(types)}")
    if float in types and isinstance(value, str):
        try:
            return float(value), None
        except ValueError:
            pass
    if float in types and isinstance(value, int):
        return float(value), None
    for t in types:
        if t is not type(None) and isinstance(value, t):
            return value, None
    return value, f"expected {_type_name(types)}"


# Values other tools use for what our keys say another way.
VALUE_HINTS = {
    ("finetuning_type", "qlora"): "; QLoRA is finetuning_type: lora with load_in_4bit: true",
    ("finetuning_type", "freeze"): "; train part of a model with finetuning_type: lora and lora_target",
}

# Names other tools use for our keys, so the hint is right where spelling similarity is not.
ALIASES = {
    "batch_size": "per_device_train_batch_size",
    "epochs": "num_train_epochs",
    "lr": "learning_rate",
    "max_length": "cutoff_len",
    "max_seq_length": "cutoff_len",
    "max_len": "cutoff_len",
    "lora_rank": "lora_r",
    "target_modules": "lora_target",
    "model_name_or_path": "model",
    "evaluation_strategy": "eval_steps",
    "torch_dtype": "bf16",
    "dtype": "bf16",
    "grad_accum": "gradient_accumulation_steps",
    "warmup_steps": "warmup_ratio",
}


def unknown_key(key: str) -> str:
    close = [ALIASES[key]] if key in ALIASES else difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.6)
    return f"unknown key '{key}'" + (f"; did you mean '{close[0]}'?" if close else "")


def _check(cfg: dict) -> list[str]:
    problems = []
    bad = set(cfg)
    for key, value in list(cfg.items()):
        if key not in FIELDS:
            problems.append(unknown_key(key))
            cfg.pop(key)
            continue
        value, err = _coerce(key, value)
        if err:
            problems.append(f"{key}: {value!r} is not valid, {err}")
            continue
        cfg[key] = value
        bad.discard(key)
        meta = FIELDS[key].metadata
        if meta["choices"] and value is not None and value not in meta["choices"]:
            hint = VALUE_HINTS.get((key, value), "")
            problems.append(f"{key}: {value!r} is not one of {', '.join(map(str, meta['choices']))}{hint}")
        if meta["positive"] and value is not None and value <= 0:
            problems.append(f"{key}: {value!r} must be greater than 0")
        if meta["unit_interval"] and not 0 <= value < 1:
            problems.append(f"{key}: {value!r} must be in [0, 1)")
    for key in (name for name, f in FIELDS.items() if f.metadata["required"]):
        if not cfg.get(key):
            problems.append(f"{key}: missing; it is required")
    problems += _check_combinations({k: v for k, v in cfg.items() if k not in bad})
    return problems


def _check_combinations(cfg: dict) -> list[str]:
    problems = []
    val_size = cfg.get("val_size", 0.0)
    if val_size < 0 or (val_size >= 1 and val_size != int(val_size)):
        problems.append(f"val_size: {val_size!r} must be a fraction in [0, 1) or a whole count of records")
    if cfg.get("load_in_4bit") and cfg.get("load_in_8bit"):
        problems.append("load_in_4bit and load_in_8bit: both true; choose one")
    if (cfg.get("load_in_4bit") or cfg.get("load_in_8bit")) and cfg.get("finetuning_type") == "full":
        problems.append(
            "finetuning_type: 'full' cannot train a quantized base (load_in_4bit/load_in_8bit); "
            "use finetuning_type lora (QLoRA)"
        )
    if cfg.get("bf16") and cfg.get("fp16"):
        problems.append("bf16 and fp16: both true; choose one")
    if cfg.get("pure_bf16"):
        if cfg.get("fp16") or cfg.get("bf16") is False:
            problems.append(
                f"pure_bf16: true needs bf16 (bf16 is {cfg.get('bf16')!r}, fp16 {cfg.get('fp16')!r}); "
                "leave bf16 null or true"
            )
        if cfg.get("optim", "adamw_torch") not in ("adamw_torch", "adamw_torch_fused"):
            problems.append(
                f"optim: {cfg['optim']!r} cannot step bf16 weights without losing small updates; "
                "pure_bf16 uses tunelab's AdamW with stochastic rounding (optim: adamw_torch)"
            )
    if cfg.get("device_map") and (
        (cfg.get("nproc_per_node") or 1) > 1
        or cfg.get("nnodes", 1) > 1
        or cfg.get("distributed", "auto") in ("fsdp2", "deepspeed")
        or cfg.get("deepspeed")
    ):
        problems.append(
            f"device_map: {cfg['device_map']!r} spreads one process's model over its GPUs; it does not "
            "combine with several processes (nproc_per_node, nnodes) or a sharding engine (distributed)"
        )
    if not 0 <= cfg.get("node_rank", 0) < cfg.get("nnodes", 1):
        problems.append(
            f"node_rank: {cfg.get('node_rank')!r} must be between 0 and nnodes - 1 ({cfg.get('nnodes', 1) - 1})"
        )
    if cfg.get("learning_rate", 1.0) <= 0:
        problems.append(f"learning_rate: {cfg['learning_rate']!r} must be greater than 0")
    if cfg.get("num_train_epochs", 1.0) <= 0 and cfg.get("max_steps", -1) <= 0:
        problems.append("num_train_epochs: must be greater than 0 unless max_steps is set")
    if cfg.get("streaming"):
        if cfg.get("max_steps", -1) <= 0:
            problems.append("streaming: true needs max_steps (a stream's length is not known before it is read)")
        if cfg.get("val_size"):
            problems.append(
                f"val_size: {cfg['val_size']!r} holds records out of the whole data, which streaming "
                "never holds; use eval_dataset with streaming: true"
            )
        if cfg.get("group_by_length"):
            problems.append(
                "group_by_length: true sorts the whole data by length, which streaming never holds; "
                "leave it null or false with streaming: true"
            )
        if (cfg.get("nproc_per_node") or 1) > 1 or cfg.get("nnodes", 1) > 1:
            problems.append(
                "streaming: true trains in one process for now (each process would need its own share "
                "of the stream); set nproc_per_node: 1 and nnodes: 1, or streaming: false"
            )
    problems += _check_preference(cfg)
    columns = cfg.get("columns")
    if columns is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items()):
        problems.append(f"columns: {columns!r} must map field names to column names (strings)")
    return problems


def _check_preference(cfg: dict) -> list[str]:
    problems = []
    stage = cfg.get("stage", "sft")
    smoothing = cfg.get("label_smoothing", 0.0)
    if not 0 <= smoothing < 0.5:
        problems.append(f"label_smoothing: {smoothing!r} must be in [0, 0.5)")
    if cfg.get("pref_ftx", 0.0) < 0:
        problems.append(f"pref_ftx: {cfg['pref_ftx']!r} must be 0 or more")
    if stage == "sft":
        return problems
    if cfg.get("streaming"):
        problems.append(f"streaming: true trains the sft stage only for now; stage {stage!r} reads its data whole")
    if stage == "kto" and cfg.get("pref_loss", "sigmoid") != "sigmoid":
        problems.append(f"pref_loss: {cfg['pref_loss']!r} is a dpo-stage loss; stage kto has its own (leave pref_loss)")
    if smoothing and stage == "dpo" and cfg.get("pref_loss", "sigmoid") not in ("sigmoid", "robust", "simpo"):
        problems.append(
            f"label_smoothing: {smoothing!r} applies to pref_loss sigmoid, robust or simpo, not {cfg['pref_loss']!r}"
        )
    if cfg.get("precompute_ref") and cfg.get("pref_loss") in REFERENCE_FREE and stage == "dpo":
        problems.append(f"precompute_ref: true, but pref_loss {cfg['pref_loss']!r} uses no reference model")
    return problems


def parse_overrides(pairs: list[str]) -> dict:
    """`key=value` strings; values are read as YAML so `lora_r=16` is an int and `bf16=true` a bool."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise TunelabError(f"override '{pair}': expected key=value")
        key, raw = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def from_dict(data: dict, source: str = "config") -> Config:
    cfg = dict(data)
    problems = _check(cfg)
    if problems:
        raise TunelabError(f"{source}: " + "; ".join(problems))
    return Config(**cfg)


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Read a YAML file, apply overrides (they win), and validate the result once."""
    data: dict = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise TunelabError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise TunelabError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise TunelabError(f"{path}: expected a mapping of keys to values at the top level")
        data = loaded or {}
        base = path.parent
        data = _resolve_relative_paths(data, base)
    if overrides:
        data.update(parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    return from_dict(data, source)


def _resolve_relative_paths(data: dict, base: Path) -> dict:
    """Paths in a YAML file are relative to that file, so a config runs the same from any folder: `output_dir`
    always; data, model, tools and DeepSpeed files where they exist there (else where the command runs).
    `key=value` overrides are relative to where the command runs."""

    def fix(p):
        if isinstance(p, str) and not Path(p).is_absolute() and not Path(p).exists() and (base / p).exists():
            return str(base / p)
        return p

    out = dict(data)
    if isinstance(out.get("output_dir"), str) and out["output_dir"] and not Path(out["output_dir"]).is_absolute():
        out["output_dir"] = str(base / out["output_dir"])
    for key in ("dataset", "eval_dataset", "model", "tools", "deepspeed"):
        if key in out:
            out[key] = [fix(p) for p in out[key]] if isinstance(out[key], list) else fix(out[key])
    return out


def dump_config(cfg: Config, path: str | Path, extra: dict | None = None) -> None:
    data = cfg.to_dict()
    if extra:
        data.update(extra)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def _default_text(name: str) -> str:
    meta, default = FIELDS[name].metadata, FIELDS[name].default
    if meta["required"]:
        return "required"
    shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
    return f"`{shown}`"


def _allowed_text(name: str) -> str:
    meta = FIELDS[name].metadata
    types = _allowed_types(name)
    if meta["choices"]:
        return ", ".join(f"`{c}`" for c in meta["choices"]) + (", or null" if type(None) in types else "")
    text = _type_name(tuple(t for t in types if t is not type(None)))
    text += " > 0" if meta["positive"] else " in [0, 1)" if meta["unit_interval"] else ""
    return text + (", or null" if type(None) in types else "")


def _in_group(group: str) -> list[str]:
    return [name for name, f in FIELDS.items() if f.metadata["group"] == group]


def keys_markdown() -> str:
    """README.md's key tables, generated from the field metadata so the documentation cannot drift from the code.

    `scripts/readme_keys.py` pastes this between README's `<!-- keys:start -->` / `<!-- keys:end -->` markers,
    and a test fails when the two differ.
    """
    tables = []
    for group in GROUPS:
        rows = [f"### {group.capitalize()}", "", "| key | default | allowed | what it is for |", "|---|---|---|---|"]
        for name in _in_group(group):
            cells = (f"`{name}`", _default_text(name), _allowed_text(name), FIELDS[name].metadata["help"])
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        tables.append("\n".join(rows))
    return "\n\n".join(tables) + "\n"


def keys_help(width: int = 100) -> str:
    """Every config key with its default, allowed values and purpose, for `tunelab train --help`.

    Meant as an argparse epilog: the layout is already wrapped, so pass
    `formatter_class=argparse.RawDescriptionHelpFormatter` or argparse will reflow it into one paragraph.
    """
    out = ["config keys (in the YAML file, or key=value after it):"]
    for group in GROUPS:
        out += ["", f"{group}:"]
        for name in _in_group(group):
            default = _default_text(name).strip("`")
            head = f"{name} ({default if default == 'required' else 'default ' + default}; {_allowed_text(name)})"
            out += textwrap.wrap(head.replace("`", ""), width, initial_indent="  ", subsequent_indent=" " * 6)
            out += textwrap.wrap(
                FIELDS[name].metadata["help"], width, initial_indent=" " * 6, subsequent_indent=" " * 6
            )
    return "\n".join(out) + "\n"
