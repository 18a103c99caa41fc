"""The code version of a function: the project code it runs, read as syntax, not as text.

A stage's cache key must change when the code that computes its output changes, and only
then. `code_identity(fn)` collects that code without a hand-kept list:

* the function itself, the types of its parameters, and every function, class or constant
  of its own module that it names (followed transitively through what those name in turn;
  decorators and other type annotations compute nothing and are not followed);
* every project module it imports or names from another module (a lazy import inside the
  function counts), with everything those modules import, transitively: for another
  module the unit is the whole module.

Each piece is normalised before hashing: the source is parsed and dumped as an abstract
syntax tree with docstrings and decorators removed, so comments, docstrings and
formatting do not count; anything else does.
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import sys
import textwrap
import threading
import types
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

PROJECT = "saec"


def _is_project(name: str) -> bool:
    return name == PROJECT or name.startswith(PROJECT + ".")


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):  # fmt: skip
                node.body = body[1:] or [ast.Pass()]
    return tree


_PARSE_LOCK = threading.RLock()  # re-entrant: a finalizer run during a parse may parse too


def parse(source: str, mode: str = "exec") -> ast.AST:
    """`ast.parse`, safe to call while other threads of the process parse too.

    CPython 3.11 keeps the AST constructor's recursion counter in interpreter-wide state: when
    another thread builds a tree at the same moment (the GIL can change hands while a tree is
    built), the check at the end fails with a spurious `SystemError: AST constructor recursion
    depth mismatch` (python/cpython#106905). It failed a run's code-version hashing under load.
    This module's parses take turns, and a parse that a foreign thread disturbed is done again.
    """
    for _ in range(4):
        try:
            with _PARSE_LOCK:
                return ast.parse(source, mode=mode)
        except SystemError as exc:
            if "recursion depth mismatch" not in str(exc):
                raise
    with _PARSE_LOCK:
        return ast.parse(source, mode=mode)


def _parse(source: str) -> ast.Module:
    return _strip_docstrings(parse(textwrap.dedent(source)))  # type: ignore[return-value]


def normalized(source: str) -> str:
    """The source as syntax: comments, docstrings, layout and a definition's decorators do not count."""
    tree = _parse(source)
    if len(tree.body) == 1 and isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        tree.body[0].decorator_list = []  # how a stage is registered is not what it computes
    return ast.dump(tree, annotate_fields=True, include_attributes=False)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def module_source(name: str) -> str:
    """A project module's source text (tests substitute an edited text here)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise ModuleNotFoundError(f"no Python source for module {name!r}")
    return Path(spec.origin).read_text(encoding="utf-8")


def _module_exists(name: str) -> bool:
    if name in sys.modules:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@lru_cache(maxsize=None)
def _is_package(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return bool(spec and spec.submodule_search_locations is not None)


def _defining_module(base: str, name: str) -> str:
    """The module that defines `name` as imported from `base` (a package re-exports, say)."""
    sub = f"{base}.{name}"
    if _module_exists(sub):
        return sub
    try:
        value = getattr(importlib.import_module(base), name)
    except (ImportError, AttributeError):
        return base
    home = getattr(value, "__module__", None)
    return home if isinstance(home, str) and _is_project(home) and isinstance(value, (types.FunctionType, type)) else base


def _imported(tree: ast.AST, package: str) -> set[str]:
    """Project modules a piece of source imports anywhere (function bodies included).

    `from saec.x import name` counts the module that defines `name`: a package that only
    re-exports it does not bring in everything else it re-exports.
    """
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if _is_project(a.name)}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            if not _is_project(base):
                continue
            for alias in node.names:
                found.add(base if alias.name == "*" else _defining_module(base, alias.name))
    return found


def _names_used(tree: ast.AST) -> set[str]:
    """Names a definition reads, leaving out its decorators and type annotations (they compute nothing)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for sub in node.decorator_list:
                skip |= {id(n) for n in ast.walk(sub)}
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                if a is not None and a.annotation is not None:
                    skip |= {id(n) for n in ast.walk(a.annotation)}
            if node.returns is not None:
                skip |= {id(n) for n in ast.walk(node.returns)}
        if isinstance(node, ast.AnnAssign):
            skip |= {id(n) for n in ast.walk(node.annotation)}
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in skip}


def _parameter_types(tree: ast.Module) -> set[str]:
    """Names in the parameter annotations of the definition in `tree`."""
    fn = tree.body[0]
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return set()
    args = fn.args
    found: set[str] = set()
    for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
        ann = a.annotation
        if isinstance(ann, ast.Constant) and isinstance(ann.value, str):  # a quoted annotation
            try:
                ann = parse(ann.value, mode="eval")
            except SyntaxError:
                continue
        if ann is not None:
            found |= {n.id for n in ast.walk(ann) if isinstance(n, ast.Name)}
    return found


def _package_of(name: str) -> str:
    return name if _is_package(name) else name.rpartition(".")[0]


@lru_cache(maxsize=None)
def _module_entry(name: str, source: str) -> tuple[str, frozenset[str]]:
    """(normalised-source hash, project imports) of a module, cached by its name and text."""
    tree = parse(source)
    return _digest(normalized(source)), frozenset(_imported(tree, _package_of(name)))


def module_closure(names: set[str]) -> dict[str, str]:
    """{module: normalised-source hash} of `names` and every project module they import, transitively."""
    out: dict[str, str] = {}
    todo = sorted(names)
    while todo:
        name = todo.pop()
        if name in out:
            continue
        digest, deps = _module_entry(name, module_source(name))
        out[name] = digest
        todo += [d for d in deps if d not in out]
    return out


def _constant_text(value: Any) -> str | None:
    """A stable text of a plain constant (numbers, text, containers of them); None for anything else."""

    def default(o: Any) -> Any:
        if isinstance(o, (set, frozenset)):
            return sorted(o, key=repr)
        raise TypeError(type(o).__name__)

    try:
        return json.dumps(value, sort_keys=True, default=default)
    except (TypeError, ValueError):
        return None


def _is_typing(value: Any) -> bool:
    """A type expression (an alias such as `tuple[dict, dict]`, a Union, a Literal): computes nothing."""
    return isinstance(value, (types.GenericAlias, types.UnionType)) or type(value).__module__ == "typing"


def _source_of(obj: Any) -> str | None:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return None


def code_identity(fn: Callable) -> dict[str, str]:
    """{piece: hash} of all the project code `fn` runs; see the module docstring."""
    module = sys.modules[fn.__module__]
    names = vars(module)
    package = _package_of(module.__name__)
    own: dict[str, str] = {}
    others: set[str] = set()
    whole_module = False
    todo: list[tuple[str, Any]] = [(fn.__name__, fn)]
    while todo:
        label, obj = todo.pop()
        if label in own:
            continue
        if not isinstance(obj, (types.FunctionType, type)):
            text = _constant_text(obj)
            whole_module |= text is None  # an object made at import time: its module's code made it
            own[label] = _digest(text or "")
            continue
        source = _source_of(obj)
        if source is None:
            whole_module = True
            own[label] = ""
            continue
        own[label] = _digest(normalized(source))
        tree = _parse(source)
        others |= _imported(tree, package)
        used = _names_used(tree)
        if obj is fn:  # the types of its parameters: their methods may run (cfg.resolved_threads())
            used |= _parameter_types(tree)
        for name in sorted(used):
            if name not in names or name in own:
                continue
            value = names[name]
            if callable(value) and hasattr(value, "__wrapped__"):  # functools.lru_cache, wraps, ...
                value = inspect.unwrap(value)
            if isinstance(value, types.ModuleType):
                if _is_project(value.__name__):
                    others.add(value.__name__)
            elif isinstance(value, (types.FunctionType, type)):
                home = value.__module__
                if home == module.__name__:
                    todo.append((name, value))
                elif _is_project(home):
                    others.add(home)
            elif isinstance(value, logging.Logger) or _is_typing(value):
                continue
            else:
                home = getattr(type(value), "__module__", "")
                if _is_project(home) or _constant_text(value) is not None or home == "builtins":
                    todo.append((name, value))  # a constant of this module
                    if _is_project(home):
                        others.add(home)
                else:
                    whole_module = True  # an object of a library, made by this module's code
    if whole_module:
        others.add(module.__name__)
    pieces = {f"{module.__name__}:{k}": v for k, v in own.items()}
    pieces.update(module_closure(others))
    return dict(sorted(pieces.items()))


def project_code_version() -> str:
    """One hash of every module of the project, as syntax: which code a run ran."""
    root = Path(importlib.util.find_spec(PROJECT).origin).parent  # type: ignore[arg-type]
    names = {PROJECT}
    for sub in ("flows", "tasks", "datasets", "artifacts", "deployments"):
        spec = importlib.util.find_spec(f"{PROJECT}.{sub}")
        if spec is None or not spec.submodule_search_locations:
            continue
        for folder in spec.submodule_search_locations:
            for path in Path(folder).rglob("*.py"):
                rel = path.relative_to(folder).with_suffix("")
                parts = [p for p in rel.parts if p != "__init__"]
                names.add(".".join([PROJECT, sub, *parts]))
    names |= {f"{PROJECT}.{p.stem}" for p in root.glob("*.py") if p.stem not in ("__init__", "__main__")}
    return hashlib.sha256(json.dumps(module_closure(names), sort_keys=True).encode()).hexdigest()[:16]
