"""Find and load a model and its tokenizer: a local folder, the HF hub, or ModelScope."""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

import torch

from ..errors import TunelabError

log = logging.getLogger("tunelab")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(model: str, hub: str = "hf", config_only: bool = False, allow_pickle: bool = False) -> str:
    """A local folder as is; a hub id downloaded (or found in the cache) and returned as a folder.

    `config_only` fetches the json and code files alone: enough to size a model before renting a GPU.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if not _HUB_ID.match(model) or model.startswith((".", "/", "~")):
        raise TunelabError(f"model: folder '{model}' not found (and it is not a hub id like 'Qwen/Qwen2.5-7B-Instruct')")
    try:
        patterns = ["*.json", "*.py"] if config_only else ["*.json", "*.safetensors", "*.model", "*.txt", "*.py",
                                                            "*.jinja", "*.tiktoken"] + (["*.bin"] if allow_pickle else [])
        if hub == "modelscope":
            from modelscope import snapshot_download as ms_download

            return ms_download(model, allow_patterns=patterns)
        from huggingface_hub import snapshot_download

        return snapshot_download(model, allow_patterns=patterns)
    except ImportError as exc:
        raise TunelabError(f"model: the {hub} hub needs an extra package ({exc.name}); "
                           f"pip install 'tunelab[{hub}]'") from None
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise TunelabError(f"model: '{model}' is not a local folder and could not be fetched from the {hub} hub "
                           f"({type(exc).__name__}: {first})") from None


def _remote_code_error(model: str, exc: Exception) -> TunelabError:
    return TunelabError(
        f"model: '{model}' ships its own Python code; set trust_remote_code: true only if you trust its "
        f"author, since that code runs on this machine ({str(exc).splitlines()[0]})"
    )


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise _remote_code_error(path, exc) from None
        raise TunelabError(f"model: cannot load the tokenizer of '{path}' ({exc})") from None
    except OSError as exc:
        raise TunelabError(f"model: cannot load the tokenizer of '{path}' ({str(exc).splitlines()[0]})") from None


def compute_dtype(bf16: bool | None, fp16: bool | None) -> torch.dtype:
    """auto: bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU."""
    if bf16:
        return torch.bfloat16
    if fp16:
        return torch.float16
    if not torch.cuda.is_available() or bf16 is False and fp16 is False:
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def attention_implementation(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


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
        raise TunelabError(f"{what}: '{path}' has only pickle-based weights ({', '.join(pickles[:3])}); loading a "
                           "pickle can run arbitrary code, so tunelab loads safetensors only. Convert them, or set "
                           "allow_pickle: true if you trust their source")


def load_model(path: str, dtype: torch.dtype, attn: str = "auto", trust_remote_code: bool = False,
               allow_pickle: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM

    check_weights_format(path, allow_pickle)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise _remote_code_error(path, exc) from None
        raise TunelabError(f"model: cannot read the config of '{path}' ({exc})") from None
    except OSError as exc:
        raise TunelabError(f"model: '{path}' has no usable config.json ({str(exc).splitlines()[0]})") from None
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": None if allow_pickle else True}
    impl = attention_implementation(attn)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, attn_implementation=impl, **kwargs)
    except (ValueError, ImportError) as exc:
        if impl == "sdpa" or attn != "auto":
            raise TunelabError(f"model: cannot load '{path}' ({str(exc).splitlines()[0]})") from None
        log.info("attention %s unavailable for this model (%s); using sdpa", impl, str(exc).splitlines()[0])
        model = AutoModelForCausalLM.from_pretrained(path, config=config, attn_implementation="sdpa", **kwargs)
    except OSError as exc:
        raise TunelabError(f"model: cannot load weights from '{path}' ({str(exc).splitlines()[0]})") from None
    return model

