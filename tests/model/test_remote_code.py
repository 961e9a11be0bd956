"""A remote-code model whose forward computes no loss and whose get_input_embeddings raises still trains,
and only with trust_remote_code on."""

import json

import pytest

from tunelab.config import from_dict
from tunelab.errors import TunelabError
from tunelab.train.run import train

MODELING = '''
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast


class ToyConfig(LlamaConfig):
    model_type = "toy_llama"


class ToyForCausalLM(LlamaForCausalLM):
    config_class = ToyConfig

    def get_input_embeddings(self):
        raise NotImplementedError("this toy never implemented it")

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return CausalLMOutputWithPast(logits=self.lm_head(hidden))  # no loss, whatever labels say
'''


@pytest.fixture(scope="module")
def remote_dir(tmp_path_factory, tokenizer):
    from tunelab.demo.build import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("remote") / "toy", tokenizer, "llama")
    (path / "modeling_toy.py").write_text(MODELING)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="toy_llama", architectures=["ToyForCausalLM"],
                  auto_map={"AutoConfig": "modeling_toy.ToyConfig", "AutoModelForCausalLM": "modeling_toy.ToyForCausalLM"})
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def _cfg(model, data, out, **kw):
    return from_dict(dict(model=model, dataset=data, output_dir=str(out), max_steps=12, learning_rate=1e-2,
                          per_device_train_batch_size=8, logging_steps=3, lr_scheduler_type="constant", **kw))


def test_remote_code_needs_explicit_trust(remote_dir, chat_file, tmp_path):
    with pytest.raises(TunelabError, match="trust_remote_code"):
        train(_cfg(remote_dir, chat_file, tmp_path / "no"))
    assert not (tmp_path / "no").exists(), "a refused run writes nothing"


def test_remote_code_model_without_loss_trains_with_lora(remote_dir, chat_file, tmp_path):
    result = train(_cfg(remote_dir, chat_file, tmp_path / "yes", trust_remote_code=True, gradient_checkpointing=True))
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    assert losses[-1] < losses[0] - 0.3, losses
    assert any("get_input_embeddings" in q for q in result.summary["quirks"])
