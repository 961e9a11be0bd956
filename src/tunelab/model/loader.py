"""Load a model's weights for any command, with every known repair applied once.

Training, chat, generate, eval, export and sweep all load a base model through `load_model`, so a
repair made for training (a remote-code `get_input_embeddings` that raises, which peft calls when
it attaches or loads an adapter) holds on every path, and each is reported once, in the log and in
the returned notes.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from ..errors import TunelabError
from ..hub import from_pretrained

log = logging.getLogger("tunelab")


def native_bf16() -> bool:
    """bf16 in hardware: compute capability 8.0 (Ampere) or later. `torch.cuda.is_bf16_supported()` also
    says yes on T4/V100, where bf16 is emulated and slow."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def compute_dtype(bf16: bool | None, fp16: bool | None) -> torch.dtype:
    """auto: bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 on CPU."""
    if bf16:
        return torch.bfloat16
    if fp16:
        return torch.float16
    if not torch.cuda.is_available() or bf16 is False and fp16 is False:
        return torch.float32
    chosen = torch.bfloat16 if native_bf16() else torch.float16
    _once(
        f"precision: {str(chosen).replace('torch.', '')} (compute capability "
        f"{'.'.join(map(str, torch.cuda.get_device_capability()))}"
        f"{', native bf16' if chosen == torch.bfloat16 else ', no native bf16'})"
    )
    return chosen


def attention_implementation(requested: str = "auto", dtype: torch.dtype | None = None) -> str:
    """auto: FlashAttention-2 where it runs (installed, compute capability >= 8.0, bf16/fp16), else sdpa."""
    if requested != "auto":
        return requested
    if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
        return "sdpa"
    if torch.cuda.get_device_capability() < (8, 0):
        _once("attention: sdpa (FlashAttention-2 needs compute capability 8.0 or later)")
        return "sdpa"
    if dtype not in (torch.bfloat16, torch.float16):
        _once(f"attention: sdpa (FlashAttention-2 needs bf16 or fp16, training runs in {dtype})")
        return "sdpa"
    _once("attention: flash_attention_2")
    return "flash_attention_2"


def enable_tf32() -> bool:
    """TF32 for fp32 matmuls on Ampere and later: the fp32 paths (masters, the loss head) at tensor-core speed."""
    if not native_bf16():
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


_SAID: set[str] = set()


def _once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        log.info(message)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weights_format(path: str, allow_pickle: bool, what: str = "model") -> None:
    """Refuse pickle-only weights unless asked: unpickling runs whatever code the file holds."""
    folder = Path(path)
    if not folder.is_dir() or allow_pickle:
        return
    files = [p.name for p in folder.iterdir() if p.is_file()]
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise TunelabError(
            f"{what}: '{path}' has only pickle-based weights ({', '.join(pickles[:3])}); loading a "
            "pickle can run arbitrary code, so tunelab loads safetensors only. Convert them, or set "
            "allow_pickle: true if you trust their source"
        )


def load_model(
    path: str,
    dtype: torch.dtype,
    attn: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    notes: list[str] | None = None,
    compute: torch.dtype | None = None,
    quant_bits: int | None = None,
    empty: bool = False,
    device_map: str | None = None,
):
    """The base model of `path` with weights in `dtype`, repaired; each repair's one-line note is appended
    to `notes`. `compute` is the precision the model will run in (autocast), when it differs from `dtype`;
    `quant_bits` (4 or 8) quantizes the decoder's linear layers with bitsandbytes (QLoRA). `empty`: the
    same model with no weight read (a rank that will be sent its shard, see `_allocate_unread`).
    `device_map` ("auto", ...): accelerate places the layers over the visible GPUs (and CPU)."""
    from .quirks import fix_input_embeddings

    model = _from_pretrained(
        path, dtype, attn, trust_remote_code, allow_pickle, compute or dtype, quant_bits, empty, device_map
    )
    found = [n for n in [_remote_code_note(model, path), fix_input_embeddings(model)] if n]
    if notes is not None:
        notes += found
    return model


def _allocate_unread(model) -> None:
    """Storage for the parameters, never written: an engine that maps an optimizer's parameters by their
    storage (accelerate's FSDP2) needs real tensors, and the OS commits the pages of an untouched
    allocation only when they are written, i.e. when this rank's shard arrives."""
    buffers = dict(model.named_buffers())
    model.to_empty(device="cpu")
    for name, buffer in buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buffer
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model._tunelab_unread = True


def _remote_code_note(model, path: str) -> str | None:
    if type(model).__module__.startswith("transformers."):
        return None
    msg = f"'{path}' runs its own model code ({type(model).__name__}, trust_remote_code)"
    log.info(msg)
    return msg


def _quantization(bits: int | None, compute: torch.dtype):
    if bits is None:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TunelabError(f"load_in_{bits}bit: needs the bitsandbytes package; pip install 'tunelab[qlora]'")
    from transformers import BitsAndBytesConfig

    if bits == 4:  # QLoRA's recipe: NF4, quantized quantization constants, matmuls in the training precision
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def _from_pretrained(
    path: str,
    dtype: torch.dtype,
    attn: str,
    trust_remote_code: bool,
    allow_pickle: bool,
    compute: torch.dtype,
    quant_bits: int | None = None,
    empty: bool = False,
    device_map: str | None = None,
):
    from transformers import AutoConfig, AutoModelForCausalLM

    check_weights_format(path, allow_pickle)
    config = from_pretrained(AutoConfig, path, trust_remote_code, "the config")
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": None if allow_pickle else True}
    if quant_bits:
        kwargs["quantization_config"] = _quantization(quant_bits, compute)
    if device_map:
        kwargs["device_map"] = device_map
    impl = attention_implementation(attn, compute)
    # auto: FlashAttention-2 or sdpa, then whatever the model supports (remote code may know only eager)
    tries = [impl] + (["sdpa", None] if attn == "auto" else [])
    for choice in dict.fromkeys(tries):
        try:
            if empty:
                from accelerate import init_empty_weights

                with init_empty_weights(include_buffers=False):  # buffers (rotary tables) stay real
                    model = AutoModelForCausalLM.from_config(
                        config, attn_implementation=choice, dtype=dtype, trust_remote_code=trust_remote_code
                    )
                _allocate_unread(model)
            else:
                model = AutoModelForCausalLM.from_pretrained(path, config=config, attn_implementation=choice, **kwargs)
            break
        except (ValueError, ImportError) as exc:
            if choice is None or attn != "auto":
                raise TunelabError(f"model: cannot load '{path}' ({str(exc).splitlines()[0]})") from None
            log.info("attention %s unavailable for this model (%s)", choice, str(exc).splitlines()[0])
        except OSError as exc:
            raise TunelabError(f"model: cannot load weights from '{path}' ({str(exc).splitlines()[0]})") from None
    return model
