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
    """(line, absolute name) of every tunelab import in `path`, relative ones resolved: a module, or a name in
    one (`tunelab.data.encode.Encoder`)."""
    return imports_in(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")


def imports_in(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """imports_of for the source text of `module` (nothing is written anywhere)."""
    package = module if is_package else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
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
            # each name as `module.name`: a submodule (`from ..data import encode`) or a name in one
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
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


def test_the_walker_sees_relative_and_function_level_imports():
    """The check itself can fail: an upward import inside a function of a data module is found."""
    source = "def f():\n    from ..train.run import train\n    from . import encode\n"
    found = imports_in(source, "tunelab.data._layer_probe")
    assert found == [(2, "tunelab.train.run.train"), (3, "tunelab.data.encode")]
    assert stage_of("tunelab.train.run") > stage_of("tunelab.data._layer_probe")


def component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


# Components of one stage are peers and stay apart (eval and export; sweep, demo and serve), except for these.
# Stage 0 is the shared floor: its modules may use one another.
PEERS_ALLOWED = {("__main__", "cli"), ("run_folder", "config")}


def peer_imports(imports: dict[str, list[tuple[int, str]]]) -> list[str]:
    """`module:line imports target` for each import of another component of the same stage."""
    return [
        f"{module}:{line} imports {target}"
        for module, found in imports.items()
        for line, target in found
        if stage_of(target) == stage_of(module) > 0
        and component(target) != component(module)
        and (component(module), component(target)) not in PEERS_ALLOWED
    ]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import circle of `graph` (module -> the modules it imports), once, starting at its least name."""
    found: set[tuple[str, ...]] = set()

    def walk(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                loop = path[path.index(nxt) :]
                start = loop.index(min(loop))
                found.add(tuple(loop[start:] + loop[:start]))
            elif nxt in graph:
                walk(nxt, path + [nxt])

    for node in sorted(graph):
        walk(node, [node])
    return [list(c) + [c[0]] for c in sorted(found)]


def module_graph() -> dict[str, set[str]]:
    """Every package module -> the package modules it imports (at module level or inside a function)."""
    modules = {module_name(p) for p in SOURCES}

    def resolve(target: str) -> str | None:  # `tunelab.data.encode.Encoder` -> `tunelab.data.encode`
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    graph = {}
    for path in SOURCES:
        module = module_name(path)
        targets = {resolve(t) for _, t in imports_of(path)}
        graph[module] = {t for t in targets if t and t != module and not module.startswith(t + ".")}
    return graph


def test_no_component_imports_a_peer_of_its_own_stage():
    found = peer_imports({module_name(p): imports_of(p) for p in SOURCES})
    assert not found, "imports between peers of one stage:\n" + "\n".join(found)


def test_no_modules_import_each_other_in_a_circle():
    found = circles(module_graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_peer_and_circle_checks_can_fail():
    probe = {"tunelab.eval.evaluate": imports_in("from ..export import merge\n", "tunelab.eval.evaluate")}
    assert peer_imports(probe) == ["tunelab.eval.evaluate:1 imports tunelab.export.merge"]
    assert not peer_imports({"tunelab.run_folder": [(1, "tunelab.config")]})
    graph = {"tunelab.train.run": {"tunelab.train.launch"}, "tunelab.train.launch": {"tunelab.train.run"}}
    assert circles(graph) == [["tunelab.train.launch", "tunelab.train.run", "tunelab.train.launch"]]
    assert not circles({"a": {"b"}, "b": set()})
