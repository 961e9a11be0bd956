"""Which models a `tunelab serve` command line names, and under which ids; read without starting a server."""

from __future__ import annotations

from pathlib import Path

from ..errors import TunelabError
from ..infer.load import split_run_folder


def parse_adapters(specs: list[str] | None) -> dict[str, str]:
    """`NAME=DIR` (or `DIR`, named after its folder) -> {name: dir}."""
    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, folder = spec.partition("=")
        name, folder = (name, folder) if sep else (Path(spec).name, spec)
        if not name or not folder:
            raise TunelabError(f"--adapter: {spec!r} is not NAME=DIR")
        if name in out:
            raise TunelabError(f"--adapter: the name {name!r} is given twice")
        out[name] = folder
    return out


def served_names(model: str, adapters: list[str] | None) -> tuple[str, str, dict[str, str]]:
    """(the base to load, the base's model id, {adapter id: folder}): the base is served under the `--model`
    name, each adapter under its own; a LoRA run folder given alone as `--model` serves its base and itself."""
    named = parse_adapters(adapters)
    base, implied = split_run_folder(model, None if named else adapters)
    if implied:
        return base, base, {Path(implied[0]).name: implied[0]}
    return model, model, named
