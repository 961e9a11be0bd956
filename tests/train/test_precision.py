"""Mixed precision as the engines do it, checked on CPU: what a GPU run would choose, and what it holds.

- bf16 only on GPUs with native bf16 (compute capability >= 8.0), fp16 before; FlashAttention-2 only on
  >= 8.0 in bf16/fp16 (compute capabilities are mocked: no GPU here).
- One process never wraps the model in `nn.DataParallel`, however many GPUs it sees.
- Full fine-tuning with `bf16: true` keeps fp32 master weights, and the whole forward, tunelab's
  labelled-position loss included, runs under autocast (this CPU has bf16 autocast too).
- The loss works through any wrapper: DataParallel, DDP (gloo), peft.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tunelab.model import loader
from tunelab.model import loss as loss_module
from tunelab.train.launch import free_port


@pytest.fixture()
def gpu(monkeypatch):
    """gpu(capability, flash_attn=True): pretend to be on a CUDA device of that compute capability."""
    real_find_spec = importlib.util.find_spec

    def make(capability, flash_attn=True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # says yes on T4/V100 too
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name, *a: object() if name == "flash_attn" and flash_attn else real_find_spec(name, *a),
        )

    return make


@pytest.mark.parametrize(
    "capability, dtype, attention",
    [
        ((7, 0), torch.float16, "sdpa"),  # V100
        ((7, 5), torch.float16, "sdpa"),  # T4
        ((8, 0), torch.bfloat16, "flash_attention_2"),  # A100
        ((9, 0), torch.bfloat16, "flash_attention_2"),  # H100
    ],
)
def test_precision_and_attention_follow_the_compute_capability(gpu, capability, dtype, attention):
    gpu(capability)
    assert loader.compute_dtype(None, None) == dtype
    assert loader.attention_implementation("auto", dtype) == attention
    assert loader.attention_implementation("auto", torch.float32) == "sdpa", "FlashAttention-2 has no fp32"
    assert loader.attention_implementation("eager", dtype) == "eager", "an explicit choice stands"


def test_flash_attention_is_not_picked_when_it_is_not_installed(gpu):
    gpu((9, 0), flash_attn=False)
    assert loader.attention_implementation("auto", torch.bfloat16) == "sdpa"


@pytest.mark.parametrize("capability, tf32", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_tf32_is_on_for_fp32_matmuls_from_ampere_on(gpu, capability, tf32):
    gpu(capability)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        assert loader.enable_tf32() is tf32
        assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_one_process_never_wraps_the_model_in_data_parallel(run_config):
    from tunelab.train.arguments import training_arguments

    args = training_arguments(run_config(), torch.float32, has_eval=False)
    args._n_gpu = 4  # what transformers sets with four GPUs visible
    assert args.n_gpu == 1
    assert args.train_batch_size == args.per_device_train_batch_size


def test_full_fine_tuning_in_bf16_keeps_fp32_masters_and_runs_everything_under_autocast(run_config, monkeypatch):
    from tunelab.train.run import train

    seen = {"linear": set(), "head": []}
    head_loss = loss_module._head_loss

    def watched_head_loss(hidden, weight, *args):
        seen["head"].append((torch.is_autocast_enabled("cpu"), (hidden[:1] @ weight.t()).dtype, weight.dtype))
        return head_loss(hidden, weight, *args)

    def hook(module, args, output):
        # in training the head's call returns the loss (a 0-d fp32 sum), whose matmul is checked below
        if isinstance(module, torch.nn.Linear) and torch.is_tensor(output) and module.training and output.dim():
            seen["linear"].add(output.dtype)

    monkeypatch.setattr(loss_module, "_head_loss", watched_head_loss)
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        result = train(run_config(finetuning_type="full", bf16=True, max_steps=2))
    finally:
        handle.remove()
    trainable = [p for p in result.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable), "master weights stay fp32"
    assert seen["linear"] == {torch.bfloat16}, "every projection ran in bf16"
    assert seen["head"] and all(auto and mm == torch.bfloat16 and w == torch.float32 for auto, mm, w in seen["head"]), (
        "the labelled-position loss ran inside the same autocast: its head matmul in bf16 on fp32 masters"
    )
    assert result.summary["dtype"] == "bfloat16"


def test_the_labelled_loss_runs_through_data_parallel_and_ddp(llama_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100

    def loss_and_grads(wrap):
        model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
        loss_module.install_labelled_forward(model)
        wrapped = wrap(model)
        out = wrapped(input_ids=ids, tunelab_labels=labels, tunelab_num_items=None).loss
        out.backward()
        return float(out), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain, plain_grads = loss_and_grads(lambda m: m)
    for wrap in (torch.nn.DataParallel, "ddp"):
        if wrap == "ddp":
            torch.distributed.init_process_group(
                "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
            )
            wrap = torch.nn.parallel.DistributedDataParallel
        try:
            got, grads = loss_and_grads(wrap)
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        assert got == pytest.approx(plain, rel=1e-6)
        assert len(grads) == len(plain_grads) and all(
            torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, plain_grads)
        )
        assert (
            loss_module.supports_labelled_loss(wrap(AutoModelForCausalLM.from_pretrained(llama_dir)))
            if wrap is torch.nn.DataParallel
            else True
        )
