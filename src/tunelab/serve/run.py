"""Load what `tunelab serve` names and run the server (uvicorn)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import TunelabError
from ..infer.load import BASE, load_inference
from .app import Server, create_app
from .names import served_names

log = logging.getLogger("tunelab")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def build_server(
    model: str,
    adapters: list[str] | None = None,
    api_key: str | None = None,
    trust_remote_code: bool = False,
    max_batch: int = 32,
) -> Server:
    """The base and every adapter `served_names` names, loaded once and served under their ids."""
    base, model_id, named = served_names(model, adapters)
    if model_id in named:
        raise TunelabError(f"--adapter: the name {model_id!r} is the base model's; pick another")
    im = load_inference(base, [BASE, *named.values()] if named else None, trust_remote_code=trust_remote_code)
    variants = dict(zip([model_id, *named], im.variants))
    return Server(im, variants, api_key=api_key, max_batch=max_batch)


def serve(
    model: str,
    adapters: list[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    trust_remote_code: bool = False,
    max_batch: int = 32,
    ui_runs: str | None = None,
) -> None:
    """ui_runs: also serve the web page, over the run folders under this folder."""
    import uvicorn

    if host not in LOCAL_HOSTS and not api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the models", host)
    server = build_server(model, adapters, api_key, trust_remote_code, max_batch)
    log.info("serving %s on http://%s:%d/v1", ", ".join(server.models), host, port)
    if ui_runs is not None:
        log.info("web UI on http://%s:%d/ (runs under %s)", host, port, Path(ui_runs).resolve())
    uvicorn.run(create_app(server, ui_runs), host=host, port=port, log_level="warning")
