"""The labelled-only chunked loss equals the plain shifted loss, in value and in every gradient (fp32)."""

import pytest
import torch

from tunelab.demo.build import tiny_config
from tunelab.model.loss import causal_lm_loss, labelled_loss, supports_labelled_loss

pytestmark = pytest.mark.fast  # a pure unit: `make test-fast` runs it

ARCHS = ["llama", "qwen2", "phi3", "qwen2_moe", "gemma3_text"]


def _model(arch, **extra):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config(arch, vocab_size=300, hidden=32, **extra)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (3, 21), generator=g)
    labels = ids.clone()
    labels[:, :8] = -100  # prompts
    labels[1, 15:] = -100  # a short answer
    labels[2, :] = -100
    labels[2, 10:13] = ids[2, 10:13]
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _both(model, batch, chunk=5):
    model.zero_grad()
    plain = causal_lm_loss(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
    )
    plain.backward()
    g_plain = _grads(model)
    model.zero_grad()
    ours = labelled_loss(model, batch, chunk=chunk)
    ours.backward()
    return plain, ours, g_plain, _grads(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_training_loss_and_gradients_match(arch):
    extra = {"final_logit_softcapping": 5.0} if arch == "gemma3_text" else {}
    model = _model(arch, **extra)
    assert supports_labelled_loss(model)
    plain, ours, g_plain, g_ours = _both(model, _batch())
    assert ours.item() == pytest.approx(plain.item(), abs=1e-5)
    assert g_plain.keys() == g_ours.keys() and "lm_head.weight" in g_ours
    for name in g_plain:
        assert torch.allclose(g_plain[name], g_ours[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_lora_gradients_match(arch):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(arch), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    plain, ours, g_plain, g_ours = _both(model, _batch(), chunk=4)
    assert ours.item() == pytest.approx(plain.item(), abs=1e-5)
    assert g_ours and all("lora_" in n for n in g_ours)
    for name in g_plain:
        assert torch.allclose(g_plain[name], g_ours[name], atol=1e-5, rtol=1e-4), name


def test_gradient_accumulation_normaliser_is_respected():
    model, batch = _model("llama"), _batch()
    n = int((batch["labels"][:, 1:] != -100).sum())
    assert labelled_loss(model, batch, num_items=2 * n).item() == pytest.approx(labelled_loss(model, batch).item() / 2)


def test_models_with_other_heads_keep_the_plain_loss():
    model = _model("llama")
    model.config.model_type = "some_remote_code_model"
    assert not supports_labelled_loss(model)


class _StandInLiger(torch.nn.Module):
    """Liger's call convention (weight, hidden, targets) computed with plain torch, to check our dispatch."""

    calls = []

    def __init__(self, reduction="mean", softcap=None):
        super().__init__()
        self.reduction, self.softcap = reduction, softcap

    def forward(self, lin_weight, _input, target, bias=None):
        self.calls.append((tuple(lin_weight.shape), tuple(_input.shape), self.reduction, self.softcap))
        logits = _input @ lin_weight.t()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return torch.nn.functional.cross_entropy(logits, target, reduction=self.reduction)


@pytest.mark.parametrize("arch", ["qwen2", "gemma3_text"])
def test_on_a_gpu_liger_gets_the_gathered_rows_in_its_argument_order(arch, monkeypatch):
    from tunelab.model import loss

    model, batch = _model(arch), _batch()
    plain, *_ = _both(model, batch)
    monkeypatch.setattr(loss, "_liger_loss_class", lambda: _StandInLiger)
    monkeypatch.setattr(loss, "_use_liger", lambda hidden: True)
    _StandInLiger.calls.clear()
    fused = labelled_loss(model, batch)
    trained = int((batch["labels"][:, 1:] != -100).sum())
    assert _StandInLiger.calls == [
        ((300, 32), (trained, 32), "sum", getattr(model.config, "final_logit_softcapping", None) or None)
    ]
    assert torch.allclose(fused, plain, atol=1e-5)


def test_liger_is_never_used_on_cpu():
    from tunelab.model import loss

    assert not loss._use_liger(torch.zeros(2, 2))


def test_our_liger_call_binds_to_liger_s_real_interface(monkeypatch):
    """Against the installed Liger's own signatures (its kernel needs a GPU; the call it receives does not)."""
    import inspect

    liger = pytest.importorskip("liger_kernel.transformers", reason="liger-kernel is not installed (GPU extra)")
    from tunelab.model import loss

    real = liger.LigerFusedLinearCrossEntropyLoss
    made = []

    class Recorder(real):
        def __init__(self, **kwargs):
            inspect.signature(real.__init__).bind(None, **kwargs)  # every keyword we pass exists in Liger
            super().__init__(**kwargs)
            made.append(self)

        def forward(self, *args):
            bound = inspect.signature(real.forward).bind(self, *args)
            weight, hidden, target = (bound.arguments[k] for k in ("lin_weight", "_input", "target"))
            assert weight.shape[1] == hidden.shape[1] and hidden.shape[0] == target.shape[0]
            logits = hidden @ weight.t()  # what the kernel computes, on the CPU
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            return torch.nn.functional.cross_entropy(logits, target, reduction=self.reduction)

    model, batch = _model("gemma3_text"), _batch()
    plain, *_ = _both(model, batch)
    monkeypatch.setattr(loss, "_liger_loss_class", lambda: Recorder)
    monkeypatch.setattr(loss, "_use_liger", lambda hidden: True)
    fused = labelled_loss(model, batch)
    assert len(made) == 1 and made[0].reduction == "sum" and made[0].softcap == model.config.final_logit_softcapping
    assert torch.allclose(fused, plain, atol=1e-5)
