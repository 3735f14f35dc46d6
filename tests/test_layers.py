"""The package's folders are its layers: every import (module-level or inside a function) points
down or sideways, never up, and no two modules import each other in a cycle."""

import ast
from pathlib import Path

import nkat_gguf
from nkat_gguf.formats.roles import ROLES

PKG = Path(nkat_gguf.__file__).parent
# Lower numbers sit lower. A module may import from its own layer or any lower one.
LAYERS = {
    "__init__": 0, "errors": 0, "util": 0, "_nkat_native": 1,
    "formats": 1, "theta": 2, "runtime": 3, "measure": 4, "recipe": 4, "optimize": 5, "integrations": 5,
    "jobs": 6, "commands": 7, "cli": 8,
}
# The math imports nothing of ours but the errors (ARCHITECTURE: numpy in, numpy out).
PURE_MATH = {"nkat_gguf.theta.lowrank", "nkat_gguf.recipe.allocate"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every nkat_gguf module `path` imports, resolved to absolute names (a module or a package)."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("nkat_gguf"):
                continue
            for alias in node.names:  # `from pkg import module` names a module
                sub = f"{target}.{alias.name}"
                found.add(sub if (PKG.parent / sub.replace(".", "/")).with_suffix(".py").exists() else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("nkat_gguf.")}
    return found - {name}


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else "__init__"]


GRAPH = {module_name(p): imports_of(p) for p in PKG.rglob("*.py")}


def test_every_folder_is_a_known_layer():
    for module in GRAPH:
        layer(module)  # KeyError names a module outside the layer table


def test_no_import_points_up():
    upward = [f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets if layer(t) > layer(m)]
    assert upward == []


def test_the_theta_math_imports_only_errors():
    for module in PURE_MATH:
        assert GRAPH[module] <= {"nkat_gguf.errors"}, module


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m, path):
        state[m] = 1
        for t in sorted(GRAPH.get(m, ())):
            if state.get(t) == 1:
                raise AssertionError(" -> ".join(path[path.index(t):] + [t]) if t in path else f"{m} -> {t}")
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


def literal_strings(path: Path):
    """(line, text) of every string literal in `path` but docstrings (f-string pieces included)."""
    tree = ast.parse(path.read_text())
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def extra_keys(path: Path):
    """(line, key) of string keys written into or read from an NkatMeta.extra (stored as nkat.<key>):
    `extra = {...}`, `extra={...}`, `extra["..."]`, `.extra.get("...")`."""
    def named_extra(node) -> bool:
        return (isinstance(node, ast.Name) and node.id == "extra") or (isinstance(node, ast.Attribute)
                                                                      and node.attr == "extra")

    for node in ast.walk(ast.parse(path.read_text())):
        given = None
        if isinstance(node, ast.keyword) and node.arg == "extra":
            given = node.value
        elif isinstance(node, ast.Assign) and any(named_extra(t) for t in node.targets):
            given = node.value
        for d in ast.walk(given) if given is not None else ():  # {...} | (extra or {}) too
            if isinstance(d, ast.Dict):
                yield from ((k.lineno, k.value) for k in d.keys if isinstance(k, ast.Constant))
        if isinstance(node, ast.Subscript) and named_extra(node.value) and isinstance(node.slice, ast.Constant):
            yield node.lineno, node.slice.value
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and named_extra(node.func.value) and node.args and isinstance(node.args[0], ast.Constant)):
            yield node.lineno, node.args[0].value


def test_nkat_keys_are_spelled_only_in_formats_keys():
    keys = PKG / "formats" / "keys.py"
    spelled = [f"{p.relative_to(PKG)}:{line} {text!r}" for p in PKG.rglob("*.py") if p != keys
               for line, text in literal_strings(p) if text.startswith("nkat.")]
    spelled += [f"{p.relative_to(PKG)}:{line} extra {key!r}" for p in PKG.rglob("*.py") if p != keys
                for line, key in extra_keys(p)]
    assert spelled == []


def test_tensor_role_tables_live_in_formats():
    """A literal collection naming two or more tensor roles is a role table: formats/ holds them."""
    tables = []
    for p in PKG.rglob("*.py"):
        if p.relative_to(PKG).parts[0] == "formats":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
                items = node.keys + node.values if isinstance(node, ast.Dict) else node.elts
                named = [i.value for i in items if isinstance(i, ast.Constant) and i.value in ROLES]
                if len(named) >= 2:
                    tables.append(f"{p.relative_to(PKG)}:{node.lineno} {named}")
    assert tables == []
