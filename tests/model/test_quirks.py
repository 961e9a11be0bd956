"""Quirks repaired before training: pad token, stop ids, broken get_input_embeddings, checkpointing."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab.demo.build import tiny_config
from tunelab.model.quirks import enable_gradient_checkpointing, ensure_pad_token, fix_input_embeddings, set_stop_ids

pytestmark = pytest.mark.fast  # a pure unit: `make test-fast` runs it


@pytest.fixture()
def model(tokenizer):
    return AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer)))


def test_missing_pad_token_is_set_to_a_non_end_of_turn_token(tokenizer, model):
    tok = copy.deepcopy(tokenizer)
    assert tok.pad_token is None
    assert ensure_pad_token(tok, model, ["<|im_end|>", "<|endoftext|>"])
    assert tok.pad_token == "<|pad|>" and model.config.pad_token_id == tok.pad_token_id


def test_pad_token_equal_to_end_of_turn_is_replaced(tokenizer, model):
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = "<|im_end|>"
    ensure_pad_token(tok, model, ["<|im_end|>"])
    assert tok.pad_token not in ("<|im_end|>", None)


def test_a_pad_token_is_added_when_the_vocabulary_has_no_candidate(tokenizer):
    from tunelab.demo.build import train_tokenizer

    tok = train_tokenizer(["just some words"], vocab_size=300, special_tokens=["<eos>"])
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tok)))
    ensure_pad_token(tok, model, ["<eos>"])
    assert tok.pad_token == "<|pad|>"
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)


def test_every_end_of_turn_id_becomes_a_stop_id(tokenizer, model):
    model.generation_config.eos_token_id = 0
    set_stop_ids(model, tokenizer, [2])
    assert model.generation_config.eos_token_id == [2, 0]


def test_raising_get_input_embeddings_is_repaired(model):
    def broken(self):
        raise NotImplementedError

    import types

    model.get_input_embeddings = types.MethodType(broken, model)
    assert fix_input_embeddings(model)
    assert model.get_input_embeddings() is model.model.embed_tokens


def test_gradient_checkpointing_turns_cache_off_and_inputs_require_grad(model):
    enable_gradient_checkpointing(model, input_grads=True)
    assert model.config.use_cache is False
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    out = model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert out.requires_grad
