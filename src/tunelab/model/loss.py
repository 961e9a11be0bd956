"""Cross-entropy only where labels are: `lm_head` runs on trained positions, in chunks.

With vocabularies of 150k-260k the head and its (tokens x vocab) logits are a large share of a
fine-tuning step, and most positions (prompts, padding) are masked anyway. Here the decoder body
runs as usual, the hidden states of labelled positions are gathered, and the head + softmax run on
those in chunks whose gradients are formed on the spot, so the full logits never exist. The result
equals the plain shifted loss (tested to 1e-5 in fp32) for models whose logits are a plain linear
head on the last hidden state, optionally soft-capped; any other model keeps the plain loss. On a
GPU with Liger installed, its fused linear cross-entropy (Triton) takes the gathered rows instead.
"""

from __future__ import annotations

import functools
import importlib.util
import types

import torch
from torch import nn

from ..constants import IGNORE_INDEX, loss_positions

# Causal LMs whose logits are lm_head(final hidden state) [* soft cap]; anything else uses the plain loss.
PLAIN_HEAD = {
    "llama",
    "mistral",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "mixtral",
    "phi3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "olmo",
    "olmo2",
    "granite_moe_shared",
    "starcoder2",
    "smollm3",
    "glm4",
}
CHUNK_ROWS = 1024


def _causal_lm(model):
    """The transformers CausalLM under any wrapper: DataParallel/DDP (`.module`), torch.compile
    (`._orig_mod`), peft (`get_base_model()`)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        else:
            return model


def supports_labelled_loss(model) -> bool:
    lm = _causal_lm(model)
    config = getattr(lm, "config", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    return (
        getattr(config, "model_type", None) in PLAIN_HEAD
        and isinstance(head, nn.Linear)
        and head.bias is None
        and isinstance(getattr(lm, "model", None), nn.Module)
        and not getattr(config, "logits_scaling", None)
    )


class _ChunkedHeadCE(torch.autograd.Function):
    """Sum of cross-entropy of `hidden @ weight.T` against `targets`, gradients formed chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            y = targets[start : start + chunk]
            logits = (h @ weight.t()).float()
            if softcap:
                tanh = torch.tanh(logits / softcap)
                logits = tanh * softcap
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                grad = torch.softmax(logits, dim=-1)
                grad[torch.arange(len(y), device=y.device), y] -= 1
                if softcap:
                    grad *= 1 - tanh * tanh
                grad = grad.to(weight.dtype)
                if need_h:
                    grad_h[start : start + chunk] = grad @ weight
                if need_w:
                    grad_w += (grad.t() @ h).float()
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


class _ChunkedHeadLogps(torch.autograd.Function):
    """Log-probability of each target under `hidden @ weight.T`, one value per row, chunk by chunk.

    Preference and RL losses weigh each sequence's log-prob differently, so the gradient reaching each row
    is only known in backward. With the head frozen (LoRA) the per-row gradient of log p is formed here,
    once, and backward scales it; a trained head recomputes each chunk's logits in backward instead of
    keeping (rows x vocab) of them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        per_row = torch.empty_like(hidden) if need_h and not need_w else None
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk], targets[start : start + chunk]
            logits, tanh = _capped(h @ weight.t(), softcap)
            lse = torch.logsumexp(logits, dim=-1)
            out[start : start + chunk] = logits.gather(1, y[:, None]).squeeze(1) - lse
            if per_row is not None:
                per_row[start : start + chunk] = _logp_grad(logits, lse, y, tanh, softcap).to(weight.dtype) @ weight
        ctx.softcap, ctx.chunk = softcap, chunk
        if per_row is not None:
            ctx.save_for_backward(per_row)
        elif need_h or need_w:
            ctx.save_for_backward(hidden, weight, targets)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if len(ctx.saved_tensors) == 1:
            (per_row,) = ctx.saved_tensors
            return per_row * grad_out[:, None].to(per_row.dtype), None, None, None, None
        hidden, weight, targets = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            h, y = hidden[start : start + ctx.chunk], targets[start : start + ctx.chunk]
            logits, tanh = _capped(h @ weight.t(), ctx.softcap)
            lse = torch.logsumexp(logits, dim=-1)
            grad = _logp_grad(logits, lse, y, tanh, ctx.softcap)
            grad = (grad * grad_out[start : start + ctx.chunk, None]).to(weight.dtype)
            if need_h:
                grad_h[start : start + ctx.chunk] = grad @ weight
            if need_w:
                grad_w += (grad.t() @ h).float()
        return grad_h, grad_w.to(weight.dtype) if need_w else None, None, None, None


def _capped(logits: torch.Tensor, softcap: float):
    logits = logits.float()
    if not softcap:
        return logits, None
    tanh = torch.tanh(logits / softcap)
    return tanh * softcap, tanh


def _logp_grad(logits, lse, targets, tanh, softcap) -> torch.Tensor:
    """d log p(target) / d raw logits: one-hot minus softmax, through the soft cap."""
    grad = -torch.exp(logits - lse[:, None])
    grad[torch.arange(len(targets), device=targets.device), targets] += 1
    if softcap:
        grad *= 1 - tanh * tanh
    return grad


def head_logps(hidden, weight, targets, softcap: float = 0.0, chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Per-row log-probs of `targets` under the linear head, never holding more than `chunk` rows of logits."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedHeadLogps.apply(hidden, weight, targets, float(softcap), chunk)
    with torch.no_grad():
        return _ChunkedHeadLogps.forward(_NoGrad(), hidden, weight, targets, float(softcap), chunk)


class _NoGrad:
    """The context `_ChunkedHeadLogps.forward` sees when nothing will call backward."""

    needs_input_grad = (False, False, False, False, False)

    def save_for_backward(self, *tensors):
        return None


@functools.lru_cache(maxsize=1)
def _liger_loss_class():
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:  # an install without Triton or with a mismatched torch: keep our own
        return None
    return LigerFusedLinearCrossEntropyLoss


def _use_liger(hidden: torch.Tensor) -> bool:
    return hidden.is_cuda and _liger_loss_class() is not None


def _head_loss(hidden, weight, targets, softcap: float, chunk: int) -> torch.Tensor:
    """Summed cross-entropy of the head over the gathered rows: Liger's kernel on a GPU, else ours."""
    if _use_liger(hidden):
        kwargs = {"softcap": softcap} if softcap else {}
        try:
            fused = _liger_loss_class()(reduction="sum", **kwargs)
        except TypeError:  # a Liger too old for soft-capping
            fused = None
        if fused is not None:
            out = fused(weight, hidden, targets)
            return out[0] if isinstance(out, tuple) else out
    return _ChunkedHeadCE.apply(hidden, weight, targets, float(softcap), chunk)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items=None) -> torch.Tensor:
    """Shifted cross-entropy over labelled positions, summed, divided by `num_items` (default: their count).

    Computed here rather than by the model, so a model whose forward ignores `labels` still trains,
    and so gradient accumulation weighs every trained token equally. Eval calls it too, so an eval
    loss is the training loss on other data.
    """
    logits = logits[:, :-1, :].float()
    targets = labels[:, 1:].to(logits.device)
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss / _normaliser(num_items, (targets != IGNORE_INDEX).sum(), loss.device)


def _normaliser(num_items, count, device) -> torch.Tensor:
    if num_items is None:
        num_items = count
    if not torch.is_tensor(num_items):
        num_items = torch.tensor(num_items)
    return num_items.to(device).clamp(min=1)


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """Tokens a shifted loss predicts (labelled positions after the first), as a tensor: no host sync."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def labelled_loss(model, inputs: dict, num_items=None, chunk: int = CHUNK_ROWS, positions=None) -> torch.Tensor:
    """Summed cross-entropy over labelled positions divided by `num_items` (trained tokens in the step).

    Called on the CausalLM itself: training reaches it through the model's own forward (see
    `install_labelled_forward`), so that every wrapper's forward (autocast, DDP, FSDP, DeepSpeed) runs it.
    `positions` (from `loss_positions`, made by the collator on the host) spare the GPU a host sync.
    """
    lm = _causal_lm(model)
    labels = inputs["labels"]
    body_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
    hidden = lm.model(**body_inputs, use_cache=False).last_hidden_state
    if positions is None:
        positions = loss_positions(labels)
    positions = positions.to(hidden.device)
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    targets = labels.reshape(-1).to(hidden.device).index_select(0, positions + 1)
    softcap = getattr(lm.config, "final_logit_softcapping", None) or 0.0
    loss = _as_head_forward(lm.get_output_embeddings(), picked, targets, float(softcap), chunk)
    return loss / _normaliser(num_items, positions.numel(), loss.device)


def labelled_logps(model, inputs: dict, positions=None, segments=None, sequences=None, chunk: int = CHUNK_ROWS):
    """(summed log-prob, token count) of each sequence's labelled tokens, shape (sequences,), both fp32.

    A sequence is a row, or with `segments` (one sequence index per entry of `positions`, for rows that pack
    several) whatever the collator says. The head runs on labelled positions only, as for the SFT loss, so a
    preference pair's two completions cost their own tokens, never (tokens x vocab) logits of whole rows.
    """
    lm = _causal_lm(model)
    labels = inputs["labels"]
    if positions is None:
        positions = loss_positions(labels)
    body_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
    targets = labels.reshape(-1).index_select(0, positions.to(labels.device) + 1)
    if supports_labelled_loss(lm):
        hidden = lm.model(**body_inputs, use_cache=False).last_hidden_state
        positions = positions.to(hidden.device)
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        softcap = float(getattr(lm.config, "final_logit_softcapping", None) or 0.0)
        head = lm.get_output_embeddings()
        logps = _as_head_forward(
            head,
            picked,
            targets.to(hidden.device),
            softcap,
            chunk,
            fn=lambda h, y: head_logps(h, head.weight, y, softcap, chunk),
        )
    else:
        logits = lm(**body_inputs, use_cache=False).logits
        positions = positions.to(logits.device)
        flat = logits.reshape(-1, logits.shape[-1]).index_select(0, positions).float()
        logps = flat.log_softmax(-1).gather(1, targets.to(flat.device)[:, None]).squeeze(1)
    if segments is None:
        segments, sequences = positions // labels.shape[1], labels.shape[0]
    segments = segments.to(logps.device)
    sums = torch.zeros(sequences, dtype=torch.float32, device=logps.device).index_add(0, segments, logps)
    counts = torch.zeros(sequences, dtype=torch.float32, device=logps.device).index_add(
        0, segments, torch.ones_like(logps)
    )
    return sums, counts


def _as_head_forward(head: nn.Linear, hidden, targets, softcap: float, chunk: int, fn=None) -> torch.Tensor:
    """The head loss run as `head`'s own forward, so the hooks engines put on a module's call give it whole.

    Outside a call, a sharded head's weight is a shard (FSDP2: a DTensor; ZeRO-3: an empty tensor). Called
    as the module, FSDP2 unshards it and hooks up the gradient's reduce-scatter, ZeRO-3 gathers it.
    """
    own = head.__dict__.get("forward")
    head.forward = fn or (lambda h, y: _head_loss(h, head.weight, y, softcap, chunk))
    try:
        return head(hidden, targets)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def summed_loss(model, inputs: dict, labels: torch.Tensor, positions=None, labelled: bool = True):
    """Summed cross-entropy over a batch's labelled positions, and how many there are, for an eval to
    divide once over a whole set. `labelled`: through the labelled forward (see `install_labelled_forward`),
    else the plain shifted loss on the model's logits."""
    if labelled:
        summed = model(**inputs, tunelab_labels=labels, tunelab_num_items=1, tunelab_positions=positions).loss
    else:
        summed = causal_lm_loss(model(**inputs).logits, labels, num_items=1)
    return summed, (positions.numel() if positions is not None else trained_positions(labels))


def install_labelled_forward(model) -> None:
    """Let the CausalLM under `model` compute the labelled loss inside its own forward.

    Given `tunelab_labels` (and `tunelab_num_items`, `tunelab_positions`), the forward returns only that
    loss; without them it is the model's own forward. Running inside forward matters: mixed-precision autocast, DDP's
    gradient hooks, FSDP's unsharding and ZeRO-3's gathering all wrap `forward`, not code that reaches
    into the model from outside.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    lm = _causal_lm(model)
    if getattr(lm, "_tunelab_labelled_forward", False):
        return
    original = lm.forward
    from .outputs import SequenceLogps

    def forward(
        self,
        *args,
        tunelab_labels=None,
        tunelab_num_items=None,
        tunelab_positions=None,
        tunelab_sequences=None,
        tunelab_segments=None,
        **kwargs,
    ):
        if tunelab_labels is None:
            return original(*args, **kwargs)
        if args:
            kwargs["input_ids"] = args[0]
        inputs = {k: v for k, v in kwargs.items() if v is not None}
        inputs["labels"] = tunelab_labels
        if tunelab_sequences is not None:
            logps, tokens = labelled_logps(self, inputs, tunelab_positions, tunelab_segments, tunelab_sequences)
            return SequenceLogps(logps=logps, tokens=tokens)
        loss = labelled_loss(self, inputs, tunelab_num_items, positions=tunelab_positions)
        return CausalLMOutputWithPast(loss=loss)

    lm.forward = types.MethodType(forward, lm)
    lm._tunelab_labelled_forward = True
