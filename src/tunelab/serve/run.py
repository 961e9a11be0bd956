"""Load what `tunelab serve` names and run the server (uvicorn), closed by default."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TunelabError
from ..infer.load import BASE, load_inference
from .app import SERVER_MAX_TOKENS, Server, create_app
from .guard import DEFAULT_MAX_REQUEST_BYTES, LOCAL_HOSTS, resolve_api_key, trusted_hosts
from .names import served_names

log = logging.getLogger("tunelab")


@dataclass
class ServeOptions:
    """Everything a served port opens, each off unless asked for."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # the command-line flag: readable by every local user
    api_key_file: str | None = None
    no_api_key: bool = False  # loopback only: an open API for local scripts
    allowed_hosts: list[str] = field(default_factory=list)
    max_batch: int = 32
    max_queue: int = 256
    max_tokens: int = SERVER_MAX_TOKENS
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    docs: bool = False
    ui_runs: str | None = None  # also serve the web page over the run folders under this folder
    allow_training: bool = False
    allow_hub: bool = False
    max_jobs: int = 1
    served_model_name: str | None = None


def build_server(
    model: str,
    adapters: list[str] | None = None,
    api_key: str | None = None,
    trust_remote_code: bool = False,
    max_batch: int = 32,
    served_model_name: str | None = None,
    max_tokens: int = SERVER_MAX_TOKENS,
    max_queue: int = 256,
) -> Server:
    """The base and every adapter `served_names` names, loaded once and served under their ids."""
    base, model_id, named = served_names(model, adapters)
    model_id = served_model_name or model_id
    if model_id in named:
        raise TunelabError(f"--adapter: the name {model_id!r} is the base model's; pick another")
    im = load_inference(base, [BASE, *named.values()] if named else None, trust_remote_code=trust_remote_code)
    variants = dict(zip([model_id, *named], im.variants))
    return Server(im, variants, api_key=api_key, max_batch=max_batch, max_tokens=max_tokens, max_queue=max_queue)


def serve(
    model: str, adapters: list[str] | None = None, options: ServeOptions | None = None, trust_remote_code: bool = False
) -> None:
    import uvicorn

    from .ui import UiOptions

    o = options or ServeOptions()
    if o.no_api_key and o.host not in LOCAL_HOSTS:
        raise TunelabError(f"--no-api-key: only on a loopback host ({', '.join(LOCAL_HOSTS)}), not {o.host}")
    if o.no_api_key and o.ui_runs is not None:
        raise TunelabError("--no-api-key: the web page (--ui) always has a key")
    key, generated = resolve_api_key(o.api_key, o.api_key_file, need_one=not o.no_api_key)
    server = build_server(
        model, adapters, key, trust_remote_code, o.max_batch, o.served_model_name, o.max_tokens, o.max_queue
    )
    ui = None
    if o.ui_runs is not None:
        ui = UiOptions(
            allow_training=o.allow_training,
            allow_hub=o.allow_hub,
            max_jobs=o.max_jobs,
            served=list(server.models),
            base_path=server.im.base_path,
        )
    app = create_app(server, o.ui_runs, ui, trusted_hosts(o.host, o.allowed_hosts), o.max_request_bytes, o.docs)
    shown = f"[{o.host}]" if ":" in o.host else o.host
    log.info("serving %s on http://%s:%d/v1", ", ".join(server.models), shown, o.port)
    if generated:
        print(f"API key (this run only, not saved): {key}", flush=True)
    elif key is None:
        log.warning("--no-api-key: every local process can use these models")
    if o.ui_runs is not None:
        link = f"http://{shown}:{o.port}/" + (f"#key={key}" if generated else "")
        print(f"web page: {link}  (runs under {Path(o.ui_runs).resolve()})", flush=True)
    uvicorn.run(app, host=o.host, port=o.port, log_level="warning")
