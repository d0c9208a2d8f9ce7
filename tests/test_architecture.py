"""The package's imports go one way: no import cycle, and no layer imports a higher one.

The module graph is read from the source with `ast`: every ``import`` and ``from ... import`` in
every module of ``alignlab/``, those inside functions and under ``TYPE_CHECKING`` included (an import
deferred into a function is still a dependency). ``from alignlab.x import y`` is an edge to
``alignlab.x.y`` when that is a module, else to ``alignlab.x``. A package's ``__init__`` importing its
own submodules is normal and is not an edge. docs/architecture.md describes the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "alignlab"

#: the layers, lowest first, as module names without the ``alignlab.`` prefix ("losses.*": the
#: package's submodules). A module may import its own layer or lower ones, never a higher one.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["errors", "chunked", "builtin", "report", "checkpoints", "rundir", "sweeps"]),
    ("config", ["config", "stages"]),
    ("losses", ["losses", "losses.*"]),
    ("parts", ["data", "data.*", "models", "distributed"]),
    ("step", ["forward", "reference", "scorers"]),
    ("trainer", ["trainer"]),
    ("run", ["compose", "train", "evaluate"]),
    ("entry", ["cli", "api", "bench", "bench.*"]),
]

#: what a loss may import inside the package: the loss contract and the chunked kernels.
LOSS_IMPORTS = ("losses.base", "chunked")


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Module name (without ``alignlab.``; "" for the package itself) -> its file."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def import_statements(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, str]]:
    """Every import of module `name` as (target, line, where): target is a package module (without
    ``alignlab.``) or ``"ext:NAME"``, NAME the top-level name of a module outside the package; where
    is "top" (runs on import), "function" (inside a function) or "typing" (under ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int, str]] = []

    def add(full: str, line: int, where: str) -> None:
        if full != "alignlab" and not full.startswith("alignlab."):
            found.append((f"ext:{full.partition('.')[0]}", line, where))
            return
        target = full[len("alignlab.") :] if full != "alignlab" else ""
        while target and target not in modules:  # `import alignlab.x.Y`: Y is no module
            target = target.rpartition(".")[0]
        if target != name:
            found.append((target, line, where))

    def visit(node: ast.AST, where: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            where = "function"
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            where = "typing"
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno, where)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package `level - 1` levels above this one
                parts = ["alignlab", *package.split(".")] if package else ["alignlab"]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                full = f"{base}.{alias.name}"
                short = full[len("alignlab.") :] if full.startswith("alignlab.") else None
                add(full if short in modules else base, node.lineno, where)
        for child in ast.iter_child_nodes(node):
            visit(child, where)

    visit(tree, "top")
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The package modules `name` imports, wherever the import is -> the line of the first one."""
    found: dict[str, int] = {}
    for target, line, _ in import_statements(name, path, modules):
        own_submodule = path.name == "__init__.py" and (not name or target.startswith(f"{name}."))
        if not target.startswith("ext:") and not own_submodule:
            found[target] = min(line, found.get(target, line))
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, dict[str, int]]:
    modules = module_files(package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, iterative)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt) and nxt in graph:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def tangled(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module: each is one knot of cycles."""
    reach = {a: set(targets) & set(graph) for a, targets in graph.items()}
    changed = True
    while changed:  # transitive closure; the package has a few dozen modules
        changed = False
        for a in reach:
            more = set().union(*(reach[b] for b in reach[a])) - reach[a]
            if more:
                reach[a] |= more
                changed = True
    knots = {tuple(sorted(b for b in reach[a] if a in reach[b])) for a in graph if a in reach[a]}
    return sorted(list(knot) for knot in knots if len(knot) > 1)


def layer_of(module: str) -> int | None:
    for index, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if module == pattern or pattern.endswith(".*") and module.startswith(pattern[:-1]):
                return index
    return None


def _matches(module: str, patterns) -> bool:
    return any(module == p or p.endswith(".*") and module.startswith(p[:-1]) for p in patterns)


def _describe(cycle: list[str], graph) -> str:
    steps = [
        f"alignlab.{a or '__init__'} -> alignlab.{b} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])
    ]
    knots = "; ".join(f"{len(knot)} modules: {', '.join(knot)}" for knot in tangled(graph))
    return (
        f"import cycle of {len(cycle) - 1} modules:\n  "
        + "\n  ".join(steps)
        + f"\nall cycles' modules: {knots}"
    )


def test_no_import_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, _describe(cycle, graph)


def test_layers_import_downward_only():
    graph = import_graph()
    unplaced = sorted(m for m in graph if m and layer_of(m) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS in {__name__}): {unplaced}"
    upward = [
        f"alignlab.{a} ({LAYERS[layer_of(a)][0]}) imports alignlab.{b} ({LAYERS[layer_of(b)][0]}), "
        f"line {line}"
        for a, targets in sorted(graph.items())
        if a
        for b, line in sorted(targets.items())
        if b and layer_of(b) > layer_of(a)
    ]
    assert not upward, "a lower layer imports a higher one:\n  " + "\n  ".join(upward)


def test_losses_import_only_the_loss_contract():
    graph = import_graph()
    outside = [
        f"alignlab.{a} imports alignlab.{b} (line {line})"
        for a, targets in sorted(graph.items())
        if _matches(a, ["losses", "losses.*"])
        for b, line in sorted(targets.items())
        if not _matches(b, LOSS_IMPORTS)
    ]
    assert not outside, "a loss depends on losses/, chunked.py and torch only:\n  " + "\n  ".join(outside)


#: third-party modules worth deferring into a function: importing them takes seconds (or a GPU stack).
HEAVY = {
    "torch",
    "transformers",
    "trl",
    "deepspeed",
    "datasets",
    "peft",
    "accelerate",
    "matplotlib",
    "wandb",
    "bitsandbytes",
    "tokenizers",
    "safetensors",
    "vaderSentiment",
}


def heavy_at_import(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the `HEAVY` modules importing it loads (its own import-time imports, transitively)."""
    modules = module_files(package)
    statements = {name: import_statements(name, path, modules) for name, path in modules.items()}
    heavy = {
        name: {t[4:] for t, _, where in found if where == "top" and t[4:] in HEAVY}
        for name, found in statements.items()
    }
    changed = True
    while changed:
        changed = False
        for name, found in statements.items():
            more = set().union(*(heavy[t] for t, _, where in found if where == "top" and t in heavy))
            more -= heavy[name]
            if more:
                heavy[name] |= more
                changed = True
    return heavy


def needless_deferrals(package: Path = PACKAGE) -> list[str]:
    """Imports of package modules inside functions that defer nothing heavy: the imported module loads
    no `HEAVY` module that the importing one does not load already (such an import only hides an edge)."""
    modules = module_files(package)
    heavy = heavy_at_import(package)
    return sorted(
        {
            f"alignlab.{name}, line {line}: alignlab.{target} "
            f"(it loads {sorted(heavy[target]) or 'nothing heavy'})"
            for name, path in modules.items()
            for target, line, where in import_statements(name, path, modules)
            if where == "function" and target in modules and heavy[target] <= heavy[name]
        }
    )


def test_imports_inside_functions_only_defer_heavy_modules():
    needless = needless_deferrals()
    assert not needless, (
        "imports inside functions that defer nothing heavy; import them at the top:\n  "
        + "\n  ".join(needless)
    )


# The checker itself, on small packages written here: a test that cannot fail proves nothing.


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "alignlab"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checker_finds_a_cycle_through_an_import_inside_a_function(tmp_path):
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from alignlab.b import thing\n",
            "b.py": "def thing():\n    from alignlab import c\n",
            "c.py": "import alignlab.a\n",
        },
    )
    graph = import_graph(root)
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert tangled(graph) == [["a", "b", "c"]]
    assert "alignlab.b -> alignlab.c (line 2)" in _describe(find_cycle(graph), graph)


def test_checker_reads_packages_and_relative_imports(tmp_path):
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "losses/__init__.py": "from alignlab.losses import dpo\nfrom .base import Loss\n",
            "losses/base.py": "Loss = object\n",
            "losses/dpo.py": "from ..losses.base import Loss\nfrom alignlab.losses.base import Loss as L\n",
            "config.py": "from alignlab.losses.base import Loss\n",
        },
    )
    graph = import_graph(root)
    assert graph["losses"] == {}  # a package importing its own submodules
    assert graph["losses.dpo"] == {"losses.base": 1}
    assert graph["config"] == {"losses.base": 1}
    assert find_cycle(graph) is None
    graph["losses.base"]["config"] = 1
    assert find_cycle(graph) == ["config", "losses.base", "config"]


@pytest.mark.parametrize(
    "module, layer",
    [("errors", "foundation"), ("losses.dpo", "losses"), ("cli", "entry"), ("data.collate", "parts")],
)
def test_layer_names(module, layer):
    assert LAYERS[layer_of(module)][0] == layer


def test_checker_tells_a_needless_deferral_from_a_heavy_one(tmp_path):
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "light.py": "import json\n",
            "heavy.py": "import torch\n",
            "cli.py": (
                "def main():\n    from alignlab import heavy  # deferred: torch\n"
                "    from alignlab import light\n"
            ),
            "models.py": "import torch\n\ndef load():\n    from alignlab.heavy import x\n",
            "data.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import transformers\n",
        },
    )
    assert heavy_at_import(root)["data"] == set() and heavy_at_import(root)["cli"] == set()
    assert needless_deferrals(root) == [
        "alignlab.cli, line 3: alignlab.light (it loads nothing heavy)",
        "alignlab.models, line 4: alignlab.heavy (it loads ['torch'])",
    ]
