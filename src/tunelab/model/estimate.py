"""Peak training memory per device, from the model's config.json alone (no weights are read).

The model is built on the meta device, so parameters and LoRA parameters are counted exactly, with
the same target rule as training. Activations are what autograd keeps in tunelab's recipe, per token
and layer, for batches padded to cutoff_len (the worst case): each norm's fp32 input (and its
normalised output when norms train), q, k, v (kv heads repeated when sdpa gets a padding mask) and
the attention output, the gated MLP's gate, activation and up outputs, the input of every trained
Linear (once per shared input), per LoRA module its dropout output and mask, and with sdpa and
padding a float copy of the batch x seq x seq mask per layer. The loss is tunelab's labelled-only
chunked loss where the model supports it (one chunk of fp32 logits at a time), else the plain
loss's three fp32 copies of batch x seq x vocab. Gradient checkpointing keeps each layer's input and recomputes
one layer at a time.

Peak = weights + optimizer states + the largest of: activations + logits/loss (end of forward),
gradients + optimizer-step temporaries (step), and gradients + one layer's activations and backward
working set (first layer, or the recomputed layer). Checked against the measured peak of real
training runs on CPU in tests/model/test_estimate.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import REFERENCE_FREE, Config
from ..errors import TunelabError
from ..hub import resolve_model_path
from .adapters import decoder_layer, resolve_targets
from .loader import attention_implementation, compute_dtype
from .loss import CHUNK_ROWS, supports_labelled_loss

GiB, MiB = 2**30, 2**20
_OUT_PROJ = ("o_proj", "out_proj", "dense", "wo", "c_proj", "o")  # its input is the saved attention output
_DOWN_PROJ = ("down_proj", "w2", "fc2", "dense_4h_to_h")  # its input is the MLP product, not gate/up's input
CUDA_CONTEXT = 512 * MiB  # CUDA context and kernels: outside torch's allocator, in nvidia-smi


@dataclass
class Estimate:
    model: str
    params: int  # of the model itself; LoRA adds `trainable` on top
    trainable: int
    dtype: str
    device: str
    parts: dict[str, int]  # bytes in display order; they do not add up to the peak (see notes)
    total: int  # peak bytes per device
    notes: list[str] = field(default_factory=list)


def _meta_model(path: str, trust_remote_code: bool, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    except (OSError, ValueError, KeyError, ImportError, AttributeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TunelabError(f"model: cannot build '{path}' from its config.json ({first})") from None
    return model, config.get_text_config()


def _dims(tc) -> dict:
    h, heads = tc.hidden_size, tc.num_attention_heads
    d = getattr(tc, "head_dim", None) or h // heads
    inter, experts = getattr(tc, "intermediate_size", None) or 4 * h, 0
    if getattr(tc, "num_experts_per_tok", None):  # MoE: top-k experts (+ a shared one) per token; approximate
        expert = getattr(tc, "moe_intermediate_size", None) or inter
        inter = tc.num_experts_per_tok * expert + (getattr(tc, "shared_expert_intermediate_size", None) or 0)
        experts = tc.num_experts_per_tok * (h + expert)  # fused experts' inputs, kept when they train
    kv = getattr(tc, "num_key_value_heads", None) or heads
    return dict(h=h, heads=heads, a=heads * d, kv=kv * d, i=inter, experts=experts, vocab=tc.vocab_size)


def _dtype(cfg: Config, device: str) -> torch.dtype:
    """What training would load the model in: compute_dtype on this machine, bf16 assumed on another's GPU."""
    if cfg.pure_bf16:
        return torch.bfloat16
    if device == "cuda" and torch.cuda.is_available() or device == "cpu" and not torch.cuda.is_available():
        return compute_dtype(cfg.bf16, cfg.fp16)
    if cfg.bf16 or cfg.fp16:
        return torch.bfloat16 if cfg.bf16 else torch.float16
    return torch.float32 if device == "cpu" or (cfg.bf16 is False and cfg.fp16 is False) else torch.bfloat16


def _attention(cfg: Config, device: str) -> str:
    if cfg.attn_implementation != "auto" or device == "cpu":
        return "sdpa" if cfg.attn_implementation == "auto" else cfg.attn_implementation
    if torch.cuda.is_available():
        return attention_implementation("auto", _dtype(cfg, device))
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"


def _loss_bytes(cfg: Config, dims: dict, act: int, labelled: bool) -> int:
    """The loss's peak: the plain loss holds fp32 copies of every position's logits; tunelab's
    labelled-only loss holds the gathered hidden states, their gradient and one chunk's logits
    (worst case: every position labelled), plus the head's fp32 gradient in full training."""
    b, s, v, h = cfg.per_device_train_batch_size, cfg.cutoff_len, dims["vocab"], dims["h"]
    n = b * (s - 1)
    if labelled:
        chunk = min(n, CHUNK_ROWS)
        head_grad = v * h * 4 if cfg.finetuning_type == "full" else 0
        return int(2 * n * h * act + chunk * v * (act + 4 + (4 if act < 4 else 0)) + head_grad)
    forward = n * v * (act + (4 if act < 4 or b > 1 else 0) + 4)  # logits, fp32 or reshape copy, log-softmax
    return int(max(forward, 12 * n * v))  # backward: log-softmax output, its gradient, the incoming gradient


def _activations(model, cfg: Config, dims: dict, act: int, device: str, lora: list[str], attn: str):
    """(bytes kept for backward at the end of forward, one layer's bytes, logits/loss peak, notes)."""
    b, s = cfg.per_device_train_batch_size, cfg.cutoff_len
    h, a, full = dims["h"], dims["a"], cfg.finetuning_type == "full"
    padded = b > 1 and attn != "flash_attention_2"  # padding: a mask goes to attention, kv heads are repeated
    kv = a if attn == "eager" or padded and attn == "sdpa" else dims["kv"]  # repeat_kv before attention
    per_layer: dict[str, float] = {}  # bytes per token

    def add(layer, nbytes):
        per_layer[layer] = per_layer.get(layer, 0.0) + nbytes

    core = (2 * a + 2 * kv + 3 * dims["i"] + (dims["experts"] if full else 0)) * act + 4 * dims["heads"]
    if attn == "eager":
        core += dims["heads"] * s * (4 + (act if act < 4 else 0))  # fp32 softmax output (+ its cast)
    elif padded:
        core += s * act  # sdpa converts the boolean mask to a float copy per layer and keeps it
    for name, m in model.named_modules():
        layer = decoder_layer(name)
        weight = getattr(m, "weight", None)
        if layer == name:
            add(layer, core)
        elif layer and "norm" in type(m).__name__.lower() and weight is not None and weight.dim() == 1:
            width = h if weight.numel() == h else (a if "q" in name.rsplit(".", 1)[-1] else dims["kv"])
            add(layer, width * (4 + (act if full else 0)))  # fp32 input; normalised output when norms train
    linears = resolve_targets(model, "all-linear") if full else []
    own_copy = cfg.lora_dropout > 0 or act < 4  # dropout output, or peft's cast to the fp32 adapter dtype
    mask = 0 if cfg.lora_dropout == 0 else (1 if device == "cuda" else 4)
    lora_in = act if device == "cuda" and act < 4 else 4  # under autocast the matmul keeps a half copy
    shared = set()
    for name in linears + lora:
        m = model.get_submodule(name)
        layer, short = decoder_layer(name) or "outside", name.rsplit(".", 1)[-1]
        if full or not own_copy:  # one saved input per group of Linears reading the same tensor
            key = (name.rsplit(".", 1)[0], m.in_features, short in _DOWN_PROJ)
            if short not in _OUT_PROJ and key not in shared:
                shared.add(key)
                add(layer, m.in_features * act)
        else:
            add(layer, m.in_features * (lora_in + mask))
        if not full:  # lora_A's output, kept by lora_B; DoRA also keeps the base and LoRA outputs
            add(layer, cfg.lora_r * lora_in + (2 * m.out_features * lora_in if cfg.use_dora else 0))
    outside = per_layer.pop("outside", 0.0) + h * 4 + (2 * h * act if full else 0)  # final norm, lm_head input
    tokens = b * s
    bool_mask = b * s * s if padded else 0
    # one layer's saved tensors plus its backward working set: the incoming gradient, MLP-sized gradients
    one_layer = int(tokens * (max(per_layer.values(), default=0.0) + h * 4 + 2 * dims["i"] * act))
    if cfg.gradient_checkpointing:
        saved = tokens * (len(per_layer) * h * act + outside) + bool_mask
    else:
        saved = tokens * (sum(per_layer.values()) + outside) + bool_mask
    loss = _loss_bytes(cfg, dims, act, supports_labelled_loss(model))
    notes = []
    if padded and attn == "sdpa":
        notes.append(
            f"sdpa with padded batches keeps a {b}x{s}x{s} mask copy per layer "
            f"({b * s * s * act * len(per_layer) / MiB:,.0f} MiB); flash_attention_2 needs none"
        )
    if attn == "eager":
        notes.append("eager attention keeps batch x heads x seq x seq scores per layer")
    return int(saved), one_layer, int(loss), notes


ENGINES = ("single", "ddp", "fsdp2", "zero2", "zero3")


def estimate_memory(
    cfg: Config,
    device: str | None = None,
    quant_bits: int | None = None,
    engine: str = "single",
    world: int = 1,
    offload: str = "none",
) -> Estimate:
    """Peak memory of training `cfg` on one device: "cuda" or "cpu" (default: what this machine trains on).

    `quant_bits` (4 or 8) estimates a bitsandbytes-quantized frozen base (QLoRA): tunelab's config has no
    key for it, so it is an argument here (a `quantization_bit` config key is used if one appears).
    `engine` over `world` processes: what each rank holds (see `_per_rank`).
    """
    if engine not in ENGINES:
        raise TunelabError(f"engine: {engine!r} is not one of {', '.join(ENGINES)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu"):
        raise TunelabError(f"device: {device!r} is not cuda or cpu")
    dtype = _dtype(cfg, device)
    act = torch.finfo(dtype).bits // 8
    quant_bits = quant_bits or (4 if cfg.load_in_4bit else 8 if cfg.load_in_8bit else None)
    full = cfg.finetuning_type == "full"
    if quant_bits not in (None, 4, 8):
        raise TunelabError(f"quant_bits: {quant_bits!r} is not 4 or 8")
    if quant_bits and full:
        raise TunelabError("quant_bits: a quantized base trains only with finetuning_type lora")
    model, tc = _meta_model(
        resolve_model_path(cfg.model, cfg.model_hub, config_only=True), cfg.trust_remote_code, dtype
    )
    dims = _dims(tc)
    params = sum(p.numel() for p in model.parameters())
    weights, notes, lora = params * act, [], []
    embed = model.get_input_embeddings().weight
    head = getattr(model.get_output_embeddings(), "weight", None)
    master = 2 if cfg.pure_bf16 else 4  # bytes of a trained weight, its gradient and each AdamW moment
    if cfg.pure_bf16:
        notes.append("pure_bf16: trained weights, their gradients and AdamW states in bf16, no fp32 master copy")
    if full:  # fp32 master weights, gradients and AdamW states; autocast's half copies live from forward to backward
        trainable, grad_bytes = params, master
        weights = params * master + (params * act if act < master else 0)
        if act < 4 and not cfg.pure_bf16:
            notes.append(
                f"full fine-tuning: fp32 master weights plus their {str(dtype).replace('torch.', '')} "
                "copies under autocast"
            )
        largest = max(p.numel() for p in model.parameters())
        head_grad = head.numel() * master if head is not None else 0
        late_grads = trainable - (embed.numel() if head is not embed else 0)
    else:
        lora = resolve_targets(model, cfg.lora_target)
        mods = [model.get_submodule(n) for n in lora]
        sizes = [cfg.lora_r * (m.in_features + m.out_features) + (m.out_features if cfg.use_dora else 0) for m in mods]
        trainable, grad_bytes, largest, head_grad = sum(sizes), master, max(sizes, default=0), 0
        late_grads = trainable
        weights += trainable * master
        if not cfg.pure_bf16:
            notes.append(
                f"LoRA r={cfg.lora_r} on {len(lora)} modules; adapters, their gradients and AdamW states in fp32"
            )
    sequences = cfg
    if cfg.stage != "sft":  # both completions of each pair (KTO: each completion and its KL one) in one forward
        sequences = dataclasses.replace(cfg, per_device_train_batch_size=2 * cfg.per_device_train_batch_size)
        notes.append(
            f"stage {cfg.stage}: {2 * cfg.per_device_train_batch_size} sequences per forward "
            f"({cfg.per_device_train_batch_size} {'pairs' if cfg.stage == 'dpo' else 'examples and their KL ones'})"
        )
    saved, one_layer, loss, act_notes = _activations(model, sequences, dims, act, device, lora, _attention(cfg, device))
    reference = 0
    needs_reference = cfg.stage == "kto" or (cfg.stage == "dpo" and cfg.pref_loss not in REFERENCE_FREE)
    if needs_reference and full and not cfg.precompute_ref:
        reference = params * master
        notes.append("reference: a frozen copy of the starting weights (precompute_ref: true keeps none)")
    elif needs_reference:
        notes.append(
            "reference: the base with adapters off, no copy"
            if not full
            else "reference: log-probs computed before training, no copy"
        )
    if quant_bits:
        linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and decoder_layer(n)]
        n_q = sum(m.weight.numel() for m in linears)
        weights -= int(n_q * (act - (0.5 + 1 / 64 + 4 / 64 / 256 if quant_bits == 4 else 1.0)))  # nf4, double quant
        one_layer += max(m.weight.numel() for m in linears) * act  # one dequantized weight at a time
        notes.append(
            f"{quant_bits}-bit base (bitsandbytes): {n_q:,} decoder Linear weights quantized; "
            "embeddings, lm_head and norms stay in the compute dtype"
        )
    gradients = trainable * grad_bytes
    layer = _largest_layer(model) * act
    if cfg.pure_bf16:  # bf16 moments; the step works in fp32 on slices of 2**22 elements (about 9 copies)
        states, step_tmp = 2 * trainable * 2, 9 * min(largest, 1 << 22) * 4
    elif cfg.optim in ("adamw_8bit", "paged_adamw_8bit"):
        states, step_tmp = trainable * 2, largest * grad_bytes
    elif cfg.optim == "sgd":
        states, step_tmp = 0, 0
    elif cfg.optim == "adafactor":  # factored second moments: small
        states, step_tmp = trainable * grad_bytes // 64, 2 * largest * grad_bytes
    else:  # torch AdamW: exp_avg, exp_avg_sq in the parameter's dtype; foreach (cuda) makes one sqrt copy of all,
        states = 2 * trainable * grad_bytes  # the per-parameter loop (cpu) two temporaries of one parameter
        foreach = device == "cuda" and cfg.optim == "adamw_torch"
        step_tmp = (trainable if foreach else 0 if cfg.optim.endswith("fused") else 2 * largest) * grad_bytes
    rank = _per_rank(engine, world, offload, weights, params * act, gradients, states, layer, notes)
    weights, gradients, states, shard = rank["weights"], rank["gradients"], rank["states"], rank["shard"]
    candidates = [
        saved + max(loss, loss // 3 + head_grad),  # end of forward / loss backward
        gradients + step_tmp // shard,  # optimizer step
        late_grads * grad_bytes // shard + one_layer,
    ]  # backward through the first layer
    if cfg.gradient_checkpointing:
        candidates.append(saved + one_layer + head_grad)  # recompute of the last layer
    total = weights + states + max(candidates) + rank["gathered"] + reference
    acts = saved + (one_layer if cfg.gradient_checkpointing else 0)
    parts = {
        "weights": weights,
        "gradients": gradients,
        "optimizer states": states,
        "activations": acts,
        "logits/loss": loss,
    }
    if rank["gathered"]:
        parts["gathered layers"] = rank["gathered"]
    if reference:
        parts["reference model"] = reference
    notes += act_notes
    if cfg.gradient_checkpointing:
        notes.append("gradient checkpointing: each layer's input is kept, one layer is recomputed at a time")
    if device == "cuda":
        parts["CUDA context"] = CUDA_CONTEXT
        total += CUDA_CONTEXT
        notes.append("the caching allocator can reserve 5-15% more than this (fragmentation)")
    else:
        notes.append(
            "on CPU, glibc malloc keeps freed activation memory: RSS can read 1.1-3x this "
            "unless MALLOC_MMAP_THRESHOLD_=65536 is set"
        )
    notes.append(
        "peak = weights + optimizer states + the larger of activations + logits/loss and gradients + "
        "optimizer step: gradients build up while backward frees activations"
    )
    return Estimate(cfg.model, params, trainable, str(dtype).replace("torch.", ""), device, parts, int(total), notes)


def _largest_layer(model) -> int:
    """Parameters of the largest decoder layer: what a sharding engine gathers whole at a time."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    sizes = [sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ in names]
    return max(sizes, default=0)


def _per_rank(
    engine: str,
    world: int,
    offload: str,
    weights: int,
    compute_copy: int,
    gradients: int,
    states: int,
    layer: int,
    notes: list[str],
) -> dict:
    """What one of `world` ranks holds of the weights, gradients and optimizer states under `engine`.

    ddp: everything, plus the gradient buckets DDP reduces in (a second copy of the gradients).
    zero2: the weights in the compute precision; fp32 masters, gradients and states split N ways.
    fsdp2 / zero3: everything split N ways, plus the layers being gathered (this one and the next,
    prefetched). Offloading moves the optimizer states (and masters) or everything to CPU memory.
    """
    n = max(world, 1)
    if engine in ("single", "ddp"):
        buckets = engine == "ddp" and n > 1
        if buckets:
            notes.append(f"ddp over {n} processes: each holds the whole model, plus DDP's gradient buckets")
        return {
            "weights": weights,
            "gradients": gradients * (2 if buckets else 1),
            "states": states,
            "gathered": 0,
            "shard": 1,
        }
    masters = max(weights - compute_copy, 0)
    if engine == "zero2":
        weights = compute_copy + (0 if offload != "none" else masters // n)
        gathered = 0
    else:
        weights = 0 if (offload == "params" or engine == "fsdp2" and offload != "none") else weights // n
        gathered = 2 * layer
    states = 0 if offload != "none" else states // n
    gradients = 0 if engine == "fsdp2" and offload != "none" else gradients // n
    notes.append(
        f"{engine} over {n} processes: weights, gradients and optimizer states split {n} ways"
        + (f", offload {offload} to CPU memory" if offload != "none" else "")
        + (
            "; each holds the whole model in the compute precision"
            if engine == "zero2"
            else "; two decoder layers gathered whole at a time"
        )
    )
    return {"weights": weights, "gradients": gradients, "states": states, "gathered": gathered, "shard": n}


def human_size(n: float) -> str:
    return f"{n / GiB:8.2f} GiB" if n >= GiB else f"{n / MiB:8.1f} MiB"


def format_estimate(est: Estimate) -> str:
    """Parameters, then each part of the memory and the peak per device, then the notes."""
    pct = 100 * est.trainable / max(est.params, 1)
    lines = [
        f"model: {est.model}",
        f"parameters: {est.params:,}   trainable: {est.trainable:,} ({pct:.2f}%)",
        f"dtype: {est.dtype} on {est.device}",
        "",
    ]
    width = max(len(k) for k in est.parts) + 2
    lines += [f"  {name:<{width}}{human_size(n)}" for name, n in est.parts.items()]
    lines += ["  " + "-" * (width + 12), f"  {'peak per device':<{width}}{human_size(est.total)}", ""]
    lines += [f"- {note}" for note in est.notes]
    return "\n".join(lines)
