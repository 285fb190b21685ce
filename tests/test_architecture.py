"""The package's structure, checked: declared layers (import-linter), no private names across packages,
no function-level imports of our own modules (the usual way to hide an import cycle).

Reference: the contract in `.importlinter` at the repository root, run by import-linter's own engine; the
other two checks walk every module's syntax tree.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "caopd_megatron"


def modules() -> list[tuple[str, ast.Module]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out.append((name.removesuffix(".__init__"), ast.parse(path.read_text(), filename=str(path))))
    return out


def top_package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_layers_contract_holds() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "BROKEN" not in proc.stdout and " kept, 0 broken" in proc.stdout


def test_no_private_name_crosses_a_package() -> None:
    crossings = []
    for name, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("caopd_megatron."):
                for alias in node.names:
                    if alias.name.startswith("_") and top_package(node.module) != top_package(name):
                        crossings.append(f"{name} imports {node.module}.{alias.name}")
    assert not crossings, "\n".join(crossings)


def imported_modules(tree: ast.Module, known: set[str]) -> set[str]:
    """Our modules that ``tree`` imports anywhere (module level or inside a function)."""
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        out |= {n for n in names if n in known}
    return out


def test_no_import_cycle_even_through_function_level_imports() -> None:
    """Lifting every import to module level must leave the module graph acyclic (so none hides a cycle)."""
    trees = dict(modules())
    assert len(trees) > 30, "the package was not found"
    graph = {name: imported_modules(tree, set(trees)) - {name} for name, tree in trees.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):  # a package importing its own submodule is not a cycle
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))
