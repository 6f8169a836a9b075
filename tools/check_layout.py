"""The layout's rules, checked (`make lint` runs this): imports run one way, with no cycle.

    python tools/check_layout.py

Two checks; either failing exits 1 with the offending imports listed.

1. The import graph, read from the source with `ast` (every import, also those inside functions
   and under TYPE_CHECKING): each package may import only the packages below it,

       ltrec_core   <- server (the gateway)
       ltrec_core   <- ltrec (modelling)   <- export_scripts   <- experiments, benchmarks

   (`triton_local` stands alone; `tests`, `examples`, `experiments` and `benchmarks` may import
   anything; nothing imports `experiments` or `benchmarks` but themselves and the tests), and no
   two modules of the project import each other, directly or through others.
2. What importing actually loads: the gateway (`server.app`) and every module of the core import
   in a fresh interpreter without loading torch, pandas or the modelling package, so the
   gateway's image stays small.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# package -> the project packages it may import (itself included)
ALLOWED: dict[str, set[str]] = {
    "ltrec_core": {"ltrec_core"},
    "server": {"server", "ltrec_core"},
    "ltrec": {"ltrec", "ltrec_core"},
    "export_scripts": {"export_scripts", "ltrec", "ltrec_core"},
    "triton_local": {"triton_local"},
    "experiments": {"experiments", "export_scripts", "ltrec", "ltrec_core", "server"},
    "benchmarks": {
        "benchmarks",
        "experiments",
        "export_scripts",
        "ltrec",
        "ltrec_core",
        "server",
        "tests",
        "triton_local",
    },
}
OPEN = ("tests", "examples")  # may import anything (and are imported by nothing but themselves)
PROJECT = {*ALLOWED, *OPEN}
# Generated protobuf stubs are the gateway's (they import only each other).
SKIP = ("server/gen/", ".venv/", "build/", "node_modules/")
GATEWAY_MUST_NOT_LOAD = ("torch", "pandas", "ltrec", "export_scripts", "transformers")


def modules() -> Iterator[tuple[str, Path]]:
    for top in sorted(PROJECT):
        for path in sorted((ROOT / top).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if any(relative.startswith(s) or f"/{s}" in relative for s in SKIP):
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(parts), path


def imports(module: str, path: Path) -> set[str]:
    """The project modules `module` imports (for `from a import b`, `a.b` when it is a module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PROJECT}


def check_graph() -> list[str]:
    known = dict(modules())
    graph: dict[str, set[str]] = {}
    problems: list[str] = []
    for module, path in known.items():
        targets = set()
        for name in imports(module, path):
            # the deepest project module the name refers to (`a.b.c` may be a function of `a.b`)
            while name not in known and "." in name:
                name = name.rpartition(".")[0]
            if name in known and name != module:
                targets.add(name)
        graph[module] = targets
        top = module.split(".")[0]
        if top in OPEN:
            continue
        for target in sorted(targets):
            if target.split(".")[0] not in ALLOWED[top]:
                problems.append(f"{module} imports {target}: {top} may import only {ALLOWED[top]}")
    # Cycles between modules (a package importing its own submodules is no cycle).
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if module.startswith(f"{target}."):
                continue
            if state.get(target) == 1:
                cycle = stack[stack.index(target) :] + [target]
                problems.append("import cycle: " + " -> ".join(cycle))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return problems


def check_gateway_loads() -> list[str]:
    core = sorted(m for m, _ in modules() if m.startswith("ltrec_core"))
    program = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in ["server.app", *core])
        + f"print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{GATEWAY_MUST_NOT_LOAD!r})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        return [f"importing the gateway and the core failed:\n{result.stderr}"]
    loaded = result.stdout.split()
    return [f"the gateway or the core loads {name}" for name in loaded]


def main() -> int:
    problems = check_graph() + check_gateway_loads()
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    print(f"layout: {sum(1 for _ in modules())} modules, imports run one way, no cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
