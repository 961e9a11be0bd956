"""Sharded engines from config keys: `distributed: fsdp2` and `distributed: deepspeed` + `zero_stage`.

- FSDP2 over 2 processes (gloo): a MoE with LoRA on attention trains the losses of one process, and a
  run resumes from a checkpoint in its second epoch to the uninterrupted weights (DDP too). That FSDP2
  trains like one process and saves whole weights, eval included, is in test_distributed.py.
- The DeepSpeed and FSDP2 configurations tunelab writes are accepted by the engines' own classes.
- `auto`, the error for a model FSDP2 cannot shard, and `device_map` as its fallback.
"""

from __future__ import annotations

import pytest
import torch

from tunelab.train.run import train

COMMON = dict(
    num_train_epochs=1,
    max_steps=-1,
    logging_steps=1,
    lr_scheduler_type="constant",
    lora_dropout=0.0,
    group_by_length=False,
    save_steps=1000,
    seed=7,
    max_samples=22,
)


def _losses(metrics: list[dict]) -> list[float]:
    return [m["loss"] for m in metrics if "loss" in m]


def test_a_moe_trains_lora_on_attention_with_its_experts_sharded_by_fsdp2(tokenizer, run_config, tmp_path):
    """The MoE recipe's shape: LoRA on attention, the routed experts (and routers) frozen and sharded,
    gradient checkpointing on."""
    from safetensors import safe_open

    from tunelab.demo.build import build_tiny_model

    moe = str(build_tiny_model(tmp_path / "moe", tokenizer, "qwen2_moe"))
    keys = dict(
        COMMON,
        model=moe,
        learning_rate=1e-2,
        lora_target="q_proj,k_proj,v_proj,o_proj",
        max_samples=16,
        gradient_checkpointing=True,
    )  # as the recipes run it; recomputation is exact, so losses still match
    one = train(run_config(output_dir=tmp_path / "one", nproc_per_node=1, per_device_train_batch_size=8, **keys))
    two = train(
        run_config(
            output_dir=tmp_path / "two", nproc_per_node=2, per_device_train_batch_size=4, distributed="fsdp2", **keys
        )
    )
    assert two.summary["engine"] == "fsdp2" and two.summary["ranks_reading_weights"] == 1
    assert _losses(two.metrics) == pytest.approx(_losses(one.metrics), abs=1e-4)
    with safe_open(str(tmp_path / "two" / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all("self_attn" in n for n in names)


def test_a_run_resumes_from_its_checkpoint_to_the_uninterrupted_weights(run_config, tmp_path):
    """A run stopped after its checkpoint in the middle of its second epoch (what is left when a job dies
    later) resumes at the same world size to the weights of a run never stopped: same samples, same order.
    FSDP2 here; DDP shares the sampler code, and test_distributed.py kills and resumes a DDP run."""
    engine = "fsdp2"
    from safetensors.torch import load_file

    keys = dict(
        COMMON,
        finetuning_type="lora",
        learning_rate=1e-2,
        nproc_per_node=2,
        per_device_train_batch_size=2,
        distributed=engine,
        save_steps=2,
        max_samples=16,
        num_train_epochs=3,
    )  # 4 steps an epoch
    whole = train(run_config(**{**keys, "output_dir": tmp_path / "whole", "max_steps": 8}))
    train(run_config(**{**keys, "output_dir": tmp_path / "cut", "max_steps": 6}))
    cut = tmp_path / "cut"
    for name in ("run_summary.json", "adapter_model.safetensors"):
        (cut / name).unlink()  # as if the job had died after checkpoint-6
    resumed = train(run_config(**{**keys, "output_dir": cut, "max_steps": 8, "resume_from_checkpoint": "auto"}))
    assert _losses(resumed.metrics)[-2:] == pytest.approx(_losses(whole.metrics)[-2:], abs=1e-6)
    a, b = (
        load_file(str(tmp_path / "whole" / "adapter_model.safetensors")),
        load_file(str(cut / "adapter_model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def _arguments(cfg, engine_name: str, model=None):
    from tunelab.train import engines
    from tunelab.train.arguments import training_arguments

    engine = engines.Engine(engine_name, "test")
    return training_arguments(
        cfg, torch.bfloat16, has_eval=False, engine_keys=engines.training_arguments(cfg, engine, model)
    )


@pytest.mark.parametrize("stage,offload", [(2, "none"), (2, "optimizer"), (3, "none"), (3, "optimizer"), (3, "params")])
def test_the_deepspeed_configuration_is_accepted_by_deepspeed_itself(stage, offload, run_config, tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    from tunelab.train import engines

    cfg = run_config(
        distributed="deepspeed",
        zero_stage=stage,
        offload=offload,
        per_device_train_batch_size=3,
        gradient_accumulation_steps=5,
        max_grad_norm=0.5,
    )
    written = engines.write_engine_config(_arguments(cfg, "deepspeed"), tmp_path)  # what the run folder keeps
    ds = DeepSpeedConfig(str(written))  # every "auto" filled in from the run's own keys
    assert ds.zero_optimization_stage == stage
    assert (ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps) == (3, 5)
    assert ds.train_batch_size == 3 * 5 * ds.world_size and ds.gradient_clipping == 0.5
    assert ds.bfloat16_config.enabled and not ds.float16_config.enabled
    assert (ds.zero_config.offload_optimizer is not None) == (offload != "none")
    assert (ds.zero_config.offload_param is not None) == (offload == "params")
    if stage == 3:
        assert ds.zero_config.gather_16bit_weights_on_model_save, "a ZeRO-3 save must be whole, not shards"


def test_a_users_own_deepspeed_file_is_used_as_it_is(run_config, tmp_path):
    pytest.importorskip("deepspeed")
    import json

    from tunelab.train import engines

    own = tmp_path / "ds.json"
    own.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 2},
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "bf16": {"enabled": "auto"},
            }
        )
    )
    cfg = run_config(deepspeed=str(own))
    assert engines.choose(cfg, 2).name == "deepspeed" and engines.zero_stage(cfg) == 2
    args = _arguments(cfg, "deepspeed")
    assert args.hf_deepspeed_config.config["zero_optimization"] == {"stage": 2}


def test_offloading_parameters_needs_zero_3(run_config):
    from tunelab.errors import TunelabError
    from tunelab.train import engines

    with pytest.raises(TunelabError, match="offload: 'params' needs zero_stage: 3"):
        engines.deepspeed_config(run_config(distributed="deepspeed", zero_stage=2, offload="params"))


@pytest.mark.parametrize("offload", ["none", "params"])
def test_the_fsdp2_configuration_is_accepted_by_accelerate_and_finds_the_decoder_layers(offload, run_config):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy
    from transformers import AutoModelForCausalLM

    cfg = run_config(distributed="fsdp2", offload=offload)
    model = AutoModelForCausalLM.from_pretrained(cfg.model)
    plugin = FullyShardedDataParallelPlugin(**_arguments(cfg, "fsdp2", model).fsdp_plugin_args)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert isinstance(plugin.cpu_offload, CPUOffloadPolicy) == (offload != "none")
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type) and plugin.cpu_ram_efficient_loading
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    plugin.set_auto_wrap_policy(model)  # resolves the layer class names on the model, or raises
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)  # what accelerate shards one by one
    wrapped = [m for m in model.modules() if policy(m)]
    assert len(wrapped) == model.config.num_hidden_layers and type(wrapped[0]).__name__ == "LlamaDecoderLayer"


def test_auto_picks_ddp_when_the_model_fits_one_device_else_fsdp2(run_config):
    from tunelab.train import engines

    cfg = run_config()
    assert engines.choose(cfg, 1).name == "single"
    assert engines.choose(cfg, 2, fits_one_device=True).name == "ddp"
    assert engines.choose(cfg, 2, fits_one_device=None).name == "ddp"
    picked = engines.choose(cfg, 2, fits_one_device=False)
    assert picked.name == "fsdp2" and "does not fit one device" in picked.reason
    assert engines.choose(run_config(distributed="deepspeed"), 2).name == "deepspeed"
    assert engines.choose(run_config(distributed="fsdp2"), 1).name == "single", "on CPU, sharding needs 2+"


def test_a_model_fsdp2_cannot_shard_is_named_and_device_map_is_the_fallback(run_config, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunelab.errors import TunelabError
    from tunelab.train import engines

    model = AutoModelForCausalLM.from_pretrained(run_config().model)
    for module in (model, model.model):  # as remote code that never says which modules are its layers
        module._no_split_modules = None
    with pytest.raises(TunelabError, match="cannot find the decoder layers of LlamaModel.*device_map: auto"):
        engines.layer_classes(model)

    with pytest.raises(TunelabError, match="device_map: 'auto' spreads one process's model.*nproc_per_node"):
        run_config(device_map="auto", nproc_per_node=2)
    with pytest.raises(TunelabError, match="device_map: 'auto' spreads one process's model"):
        run_config(device_map="auto", distributed="fsdp2")
    # on this CPU accelerate's placement puts every layer on the CPU: the same run, placed by accelerate
    keys = dict(COMMON, learning_rate=1e-2, max_steps=2, per_device_train_batch_size=4)
    plain = train(run_config(output_dir=tmp_path / "plain", **keys))
    placed = train(run_config(output_dir=tmp_path / "placed", device_map="auto", **keys))
    assert any(q.startswith("device_map auto: layers placed on cpu") for q in placed.summary["quirks"])
    assert _losses(placed.metrics) == pytest.approx(_losses(plain.metrics), abs=1e-6)


def test_how_many_processes_start_for_each_engine(run_config, monkeypatch):
    """On a machine with 4 GPUs: DDP starts 4, a sharding engine starts its process group even on one GPU,
    device_map keeps one process holding every GPU."""
    from tunelab.train import launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert launch.processes_per_node(run_config()) == 4 and launch.needs_launch(run_config())
    assert launch.processes_per_node(run_config(device_map="auto")) == 1
    assert not launch.needs_launch(run_config(device_map="auto"))
    assert not launch.needs_launch(run_config(nproc_per_node=1))
    assert launch.needs_launch(run_config(nproc_per_node=1, distributed="fsdp2"))
    assert launch.needs_launch(run_config(nproc_per_node=1, distributed="deepspeed"))


def test_auto_compares_the_estimate_with_this_gpu_and_never_fails_a_run_for_it(run_config, monkeypatch):
    from types import SimpleNamespace

    from tunelab.model import estimate
    from tunelab.train import engines

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda i: SimpleNamespace(total_memory=80 * 10**9, major=9, minor=0, name="H100"),
    )
    real = estimate.estimate_memory
    need = real(run_config(), device="cuda", engine="ddp", world=2).total
    assert engines.fits_one_device(run_config(), 2) is True  # a tiny model on an 80 GB GPU
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda i: SimpleNamespace(total_memory=need // 2, major=9, minor=0, name="H100"),
    )
    assert engines.fits_one_device(run_config(), 2) is False
    assert engines.fits_one_device(run_config(distributed="ddp"), 2) is None, "asked for: nothing to decide"

    def broken(*args, **kwargs):
        raise RuntimeError("remote code the estimate cannot build")

    monkeypatch.setattr(estimate, "estimate_memory", broken)
    assert engines.fits_one_device(run_config(), 2) is None
    assert engines.choose(run_config(), 2, None).name == "ddp"
