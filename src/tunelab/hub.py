"""Where a model lives: a local folder as is, or a hub id fetched from the HF hub or ModelScope.

Below every stage, since the data stage needs the tokenizer and the model stage the weights of the
same folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import TunelabError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(model: str, hub: str = "hf", config_only: bool = False, allow_pickle: bool = False) -> str:
    """A local folder as is; a hub id downloaded (or found in the cache) and returned as a folder.

    `config_only` fetches the json and code files alone: enough to size a model before renting a GPU.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if not _HUB_ID.match(model) or model.startswith((".", "/", "~")):
        raise TunelabError(
            f"model: folder '{model}' not found (and it is not a hub id like 'Qwen/Qwen2.5-7B-Instruct')"
        )
    try:
        patterns = (
            ["*.json", "*.py"]
            if config_only
            else ["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.jinja", "*.tiktoken"]
            + (["*.bin"] if allow_pickle else [])
        )
        if hub == "modelscope":
            from modelscope import snapshot_download as ms_download

            return ms_download(model, allow_patterns=patterns)
        from huggingface_hub import snapshot_download

        return snapshot_download(model, allow_patterns=patterns)
    except ImportError as exc:
        raise TunelabError(
            f"model: the {hub} hub needs an extra package ({exc.name}); pip install 'tunelab[{hub}]'"
        ) from None
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise TunelabError(
            f"model: '{model}' is not a local folder and could not be fetched from the {hub} hub "
            f"({type(exc).__name__}: {first})"
        ) from None


def remote_code_error(model: str, exc: Exception) -> TunelabError:
    return TunelabError(
        f"model: '{model}' ships its own Python code; set trust_remote_code: true (on the command line: "
        "--trust-remote-code) only if you trust its author, since that code runs on this machine "
        f"({str(exc).splitlines()[0]})"
    )


def from_pretrained(loader, path: str, trust_remote_code: bool, what: str):
    """`loader.from_pretrained(path)` (AutoConfig, AutoTokenizer), its failures as one line naming `what`:
    remote code that was not trusted, files that cannot be read."""
    try:
        return loader.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise remote_code_error(path, exc) from None
        raise TunelabError(f"model: cannot read {what} of '{path}' ({exc})") from None
    except OSError as exc:
        raise TunelabError(f"model: cannot read {what} of '{path}' ({str(exc).splitlines()[0]})") from None
