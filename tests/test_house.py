"""The package's import rules, read from the source with ``ast`` (nothing is imported).

Every ``import`` counts, including those inside functions and under
``TYPE_CHECKING``: a lazy import still ties two modules together. The rules
are the ones ``CONTRIBUTING.md`` states.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dynkv"

# Who may import the extension, vLLM, and each client library.
C_IMPORTERS = {"dynkv.env", "dynkv.layout", "dynkv.memory", "dynkv.ops", "dynkv.tiers.disk"}
VLLM_HOMES = ("dynkv.connector", "dynkv.plugin")
# ZMQ has two homes, one per side: the engines' P/D side channel, and the router's KV-events subscriber
# (the only proxy module that opens sockets other than HTTP ones).
CLIENT_HOMES = {"nixl": {"dynkv.disagg.nixl"}, "zmq": {"dynkv.disagg.wire", "dynkv.proxy.events"},
                "redis": {"dynkv.tiers.shared.redis"}, "mooncake": {"dynkv.tiers.shared.mooncake"}}
TOOLING = ("dynkv.benchmarks", "dynkv.testing")
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _imports(name: str) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import in module ``name``; ``from a import b`` names ``a.b``
    when ``a.b`` is a module, else ``a``."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if _is_package(name) else name.rpartition(".")[0]
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub if sub in MODULES else base, node.lineno))
    return out


def _internal_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _ in _imports(m):
            if target in MODULES and target != m:
                edges[m].add(target)
    return edges


def test_the_walk_finds_the_package() -> None:
    assert {"dynkv", "dynkv.ops", "dynkv.leader.leader", "dynkv.connector.connector"} <= set(MODULES)
    assert "dynkv.memory" in _internal_edges()["dynkv.ops"]


def test_no_import_cycle() -> None:
    edges = _internal_edges()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_no_module_imports_a_package_face_above_it() -> None:
    """A package's face re-exports its modules; a module that imports the face of its own package (or of the
    top package) turns the graph upward. Sibling packages' faces are fine, and the tooling may write
    ``import dynkv`` as users do."""
    bad = []
    for m in MODULES:
        for target, line in _imports(m):
            if target == "dynkv" and _under(m, *TOOLING):
                continue
            if target in MODULES and _is_package(target) and target != m and _under(m, target):
                bad.append(f"{MODULES[m].relative_to(PKG.parent)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_faces_only_re_export() -> None:
    """Every ``__init__.py`` holds a docstring, imports, ``__all__`` and nothing else."""
    bad = []
    for m, path in MODULES.items():
        if not _is_package(m):
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]:
                continue
            bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno}")
    assert not bad, "a package face defines something: " + ", ".join(bad)


def test_who_imports_the_extension_vllm_and_the_clients() -> None:
    bad = []
    for m in MODULES:
        tooling = _under(m, *TOOLING)
        for target, line in _imports(m):
            where = f"{MODULES[m].relative_to(PKG.parent)}:{line}"
            if target == "dynkv._C" and m not in C_IMPORTERS:
                bad.append(f"{where}: dynkv._C outside {sorted(C_IMPORTERS)}")
            top = target.split(".")[0]
            if top == "vllm" and not tooling and not _under(m, *VLLM_HOMES):
                bad.append(f"{where}: vllm outside {VLLM_HOMES}")
            if top in CLIENT_HOMES and not tooling and m not in CLIENT_HOMES[top]:
                bad.append(f"{where}: {top} outside {sorted(CLIENT_HOMES[top])}")
    assert not bad, "\n".join(bad)


def test_product_modules_never_import_the_tooling() -> None:
    bad = [f"{MODULES[m].relative_to(PKG.parent)}:{line} imports {t}"
           for m in MODULES if not _under(m, *TOOLING) and m != "dynkv.cli"
           for t, line in _imports(m) if _under(t, *TOOLING)]
    assert not bad, "\n".join(bad)


def test_long_product_modules_say_why() -> None:
    """A product module past ~500 lines says in its opening docstring why it is kept whole."""
    bad = []
    for m, path in MODULES.items():
        if _under(m, *TOOLING):
            continue
        lines = path.read_text().count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and "kept whole" not in doc:
            bad.append(f"{path.relative_to(PKG.parent)}: {lines} lines")
    assert not bad, "modules past the bound without a reason in their docstring: " + ", ".join(bad)


def test_test_file_names_are_unique() -> None:
    """pytest imports the test folders without packages: two files of one name would collide."""
    names = [p.name for p in Path(__file__).resolve().parent.rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
