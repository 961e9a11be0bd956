"""Tiny models of real transformers architectures, with a byte-level BPE tokenizer trained locally.

Used by the demo and by the tests: no hub, no network, seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def train_tokenizer(texts: list[str], vocab_size: int = 2000, special_tokens: list[str] | None = None):
    """A byte-level BPE (GPT-2 style) fitted to `texts`, wrapped as a fast transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = special_tokens or SPECIAL_TOKENS
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token=specials[0],
        bos_token=None,
        unk_token=None,
        pad_token=None,
        model_max_length=4096,
    )


def tiny_config(arch: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, **extra):
    """A small config of a real architecture: llama, qwen2, gemma3_text, phi3, qwen2_moe, mixtral."""
    from transformers import AutoConfig

    base = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        intermediate_size=hidden * 2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=None,
    )
    if arch == "gemma3_text":
        base.update(head_dim=hidden // heads, sliding_window=128, query_pre_attn_scalar=hidden // heads)
    if arch in ("qwen2_moe", "mixtral"):
        base.update(
            num_experts=4,
            num_local_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=hidden,
            shared_expert_intermediate_size=hidden,
        )
    base.update(extra)
    return AutoConfig.for_model(arch, **base)


def build_tiny_model(out_dir: str | Path, tokenizer, arch: str = "llama", seed: int = 0, **config_kwargs) -> Path:
    """Save a randomly initialised model of `arch` and `tokenizer` into `out_dir`, ready for `model:`."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch, vocab_size=len(tokenizer), **config_kwargs)
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
