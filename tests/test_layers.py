"""Imports run one way down the pipeline:
config -> data -> model -> train -> infer -> eval/export -> sweep/serve -> cli.

Every `import` in the package, at module level or inside a function, is read from the source; one that
reaches a later stage fails the test, naming the file and line. What two stages share lives below both.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast  # a pure unit: `make test-fast` runs it

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tunelab"

# Lower numbers are earlier in the pipeline; a module may import its own stage and earlier ones.
STAGES = {
    "__init__": 0,
    "errors": 0,
    "constants": 0,
    "hub": 0,
    "logs": 0,
    "config": 1,
    "run_folder": 1,
    "data": 2,
    "model": 3,
    "train": 4,
    "infer": 5,
    "eval": 6,
    "export": 6,
    "sweep": 7,
    "demo": 7,
    "serve": 7,
    "cli": 8,
    "__main__": 8,
}


def stage_of(module: str) -> int:
    """`tunelab.data.encode` -> the stage of `data`."""
    parts = module.split(".")
    assert parts[0] == "tunelab", module
    top = parts[1] if len(parts) > 1 else "__init__"
    if not ((PACKAGE / top).is_dir() or (PACKAGE / f"{top}.py").is_file()):
        top = "__init__"  # a name defined in tunelab/__init__.py, e.g. __version__
    assert top in STAGES, f"tunelab.{top} has no stage: add it to STAGES"
    return STAGES[top]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every tunelab import in `path`, relative ones resolved."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "tunelab"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "tunelab":
                continue
            if node.module is None or target.count(".") == 0:  # `from . import cache`, `from .. import x`
                found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(PACKAGE)) for p in SOURCES])
def test_no_import_runs_back_up_the_pipeline(path):
    here = stage_of(module_name(path))
    upward = [
        f"{path.relative_to(PACKAGE)}:{line} imports {target}"
        for line, target in imports_of(path)
        if stage_of(target) > here
    ]
    assert not upward, "imports against the pipeline's direction:\n" + "\n".join(upward)


def test_the_walker_sees_relative_and_function_level_imports(tmp_path):
    """The check itself can fail: an upward import inside a function of a data module is found."""
    fake = PACKAGE / "data" / "_layer_probe.py"
    source = "def f():\n    from ..train.run import train\n    from . import encode\n"
    tree_imports = None
    try:
        fake.write_text(source, encoding="utf-8")
        tree_imports = imports_of(fake)
    finally:
        fake.unlink(missing_ok=True)
    assert tree_imports == [(2, "tunelab.train.run"), (3, "tunelab.data.encode")]
    assert stage_of("tunelab.train.run") > stage_of("tunelab.data._layer_probe")
