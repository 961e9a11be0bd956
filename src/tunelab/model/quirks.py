"""Known traps of real models, repaired before training, each reported in one log line."""

from __future__ import annotations

import logging
import types

from torch import nn

log = logging.getLogger("tunelab")

_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>", "<unk>")


def ensure_pad_token(tokenizer, model, eot_tokens: list[str]) -> str | None:
    """A pad token that is not an end-of-turn token, so padding can never be confused with a stop."""
    if tokenizer.pad_token is not None and tokenizer.pad_token not in eot_tokens:
        return None
    old = tokenizer.pad_token
    vocab = tokenizer.get_vocab()
    choice = next((t for t in _PAD_CANDIDATES if t in vocab and t not in eot_tokens), None)
    if choice is None and tokenizer.unk_token and tokenizer.unk_token not in eot_tokens:
        choice = tokenizer.unk_token
    if choice is not None:
        tokenizer.pad_token = choice
    else:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        rows = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > rows:
            model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    why = "no pad token" if old is None else f"pad token {old!r} is an end-of-turn token"
    msg = f"{why}: padding with {tokenizer.pad_token!r} (id {tokenizer.pad_token_id})"
    log.info(msg)
    return msg


def set_stop_ids(model, tokenizer, eot_ids: list[int]) -> str:
    """Every end-of-turn id goes into generation_config.eos_token_id, so generation stops after an answer."""
    gen = model.generation_config
    current = gen.eos_token_id if gen.eos_token_id is not None else []
    current = current if isinstance(current, list) else [current]
    ids = list(dict.fromkeys([*eot_ids, *current]))
    gen.eos_token_id = ids
    gen.pad_token_id = tokenizer.pad_token_id
    if gen.bos_token_id is None and tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    added = [i for i in ids if i not in current]
    msg = f"stop ids {ids}" + (f" (added {added} to generation_config.eos_token_id)" if added else "")
    log.info(msg)
    return msg


def fix_input_embeddings(model) -> str | None:
    """Some remote-code models raise from get_input_embeddings(); peft and checkpointing call it."""
    try:
        emb = model.get_input_embeddings()
        if emb is not None:
            return None
    except (NotImplementedError, AttributeError):
        pass
    vocab = getattr(model.config, "vocab_size", None)
    found = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Embedding) and (vocab is None or m.num_embeddings == vocab)
    ]
    if not found:
        return None
    name, emb = found[0]
    model.get_input_embeddings = types.MethodType(lambda self: emb, model)
    msg = f"get_input_embeddings() did not work; using '{name}'"
    log.info(msg)
    return msg


def enable_gradient_checkpointing(model, input_grads: bool) -> str:
    """Non-reentrant checkpointing, input grads on (needed when the embeddings are frozen), no KV cache."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    if input_grads:
        model.enable_input_require_grads()
    model.config.use_cache = False
    msg = "gradient checkpointing on (non-reentrant, input gradients enabled, use_cache off)"
    log.info(msg)
    return msg


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
