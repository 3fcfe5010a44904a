"""A module's top level rewritten so that some of its statements run on first use.

`Transform` turns each deferrable statement into `__ldm_defer__(i)`, which binds a `Deferred`
stand-in for every name block i defines: an availability check's block (`if is_x_available():`;
the check itself still runs, and its else branch is kept), a `from X import name` of a module the
rules name (or of names they list), an `import X` of a module they name, a `name = f(...)` of
a function they name. A stand-in runs its block in the module's
namespace the first time it is used (called, asked for an attribute, checked against with
isinstance, subclassed), after which the module holds the real objects. Decorators the rules
name become `__ldm_compiler_mark__(path, called, *args)`. The names `__ldm_defer__` and
`__ldm_compiler_mark__` are the importer's to bind (libraries.py).
"""
from __future__ import annotations

import ast
from typing import NamedTuple


class Rules(NamedTuple):
    checks: tuple[str, ...]  # availability checks whose blocks wait
    imports: tuple[str, ...]  # modules (and their submodules) whose from-imports wait
    calls: tuple[str, ...]  # functions whose module-level assignments wait
    marks: tuple[str, ...]  # dotted decorator prefixes that wait for torch's compiler
    modules: tuple[str, ...] = ()  # top-level modules whose plain `import X` waits
    # module -> names whose from-imports wait, each used only by calling it or asking it for an
    # attribute (a statement importing anything else stays eager: a stand-in cannot be a sentinel
    # compared with `is`, a constant in arithmetic or an exception class in an except clause)
    names: dict[str, frozenset[str]] = {}


class Deferred:
    """A module-level name whose defining statements have not run yet; they run (once, in the
    module's namespace) on its first use, after which it forwards to what they defined."""

    __slots__ = ("_block", "_name")

    def __init__(self, block: "Block", name: str):
        object.__setattr__(self, "_block", block)
        object.__setattr__(self, "_name", name)

    def _real(self):
        return self._block.run()[self._name]

    def __getattr__(self, name):
        return getattr(self._real(), name)

    def __call__(self, *args, **kwargs):
        return self._real()(*args, **kwargs)

    def __instancecheck__(self, obj):
        return isinstance(obj, self._real())

    def __subclasscheck__(self, cls):
        return issubclass(cls, self._real())

    def __mro_entries__(self, bases):
        return (self._real(),)

    def __repr__(self):
        return f"<{self._name}, imported on first use>"


class Block:
    def __init__(self, code, namespace: dict):
        self.code, self.namespace, self.done = code, namespace, False

    def run(self) -> dict:
        if not self.done:  # set once it has run: a failure raises again at the next use
            exec(self.code, self.namespace)
            self.done = True
        return self.namespace


def _bound_names(statements: list[ast.stmt]) -> list[str] | None:
    """The names a block binds, or None if it does anything but import, define and assign."""
    names = []
    for node in statements:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names += [a.asname or a.name.split(".")[0] for a in node.names]
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
            names += [t.id for t in node.targets]
        else:
            return None
    return None if "*" in names else names


def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The module a `from ... import` names, made absolute."""
    if not node.level:
        return node.module or ""
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def _dotted(node: ast.expr) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


class Transform(ast.NodeTransformer):
    """Rewrites a module's top level: deferrable statements become `__ldm_defer__(i)`, which binds
    stand-ins for what block i defines (an availability check around a block is still evaluated,
    so a missing package takes its else branch as before); compiler decorators are deferred."""

    def __init__(self, filename: str, package: str, rules: Rules):
        self.filename, self.package, self.rules, self.blocks = filename, package, rules, []  # blocks: (code, names)

    def module(self, tree: ast.Module) -> ast.Module:
        # a name the module binds elsewhere too (say `torch`, by `import torch.distributed`) stays eager
        self.elsewhere = {name for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
                          for name in _bound_names([node]) or []}
        self.listed: set[str] = set()  # names waiting by the rules' modules and names
        tree.body = [self._top(part) for node in tree.body for part in self._split(node)]
        if self.listed:
            _Annotations(self.listed).visit(tree)
        return tree

    def _split(self, node: ast.stmt) -> list[ast.stmt]:
        """A from-import of listed names beside others becomes two, so that the listed ones wait."""
        if not isinstance(node, ast.ImportFrom):
            return [node]
        listed = self.rules.names.get(_absolute(node, self.package), ())
        wait, rest = [a for a in node.names if a.name in listed], [a for a in node.names if a.name not in listed]
        if not (wait and rest):
            return [node]
        return [ast.copy_location(ast.ImportFrom(node.module, names, node.level), node) for names in (rest, wait)]

    def _top(self, node: ast.stmt) -> ast.stmt:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            return self.visit(node)
        checked = isinstance(node, ast.If) and isinstance(node.test, ast.Call) and not node.test.args \
            and getattr(node.test.func, "id", None) in self.rules.checks
        source = _absolute(node, self.package) if isinstance(node, ast.ImportFrom) else None
        listed = (isinstance(node, ast.Import) and all(a.name in self.rules.modules for a in node.names)) \
            or (source in self.rules.names and all(a.name in self.rules.names[source] for a in node.names))
        if checked:
            statements = node.body
        elif (source is not None and source.startswith(self.rules.imports)) or listed \
                or (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                    and getattr(node.value.func, "id", None) in self.rules.calls):
            statements = [node]
        else:
            return node
        names = _bound_names(statements)
        if not names or (checked and self.elsewhere.intersection(names)):
            return node
        if listed:
            self.listed.update(names)
        block = ast.Module(body=statements, type_ignores=[])
        self.blocks.append((compile(block, self.filename, "exec", dont_inherit=True),  # not this module's futures
                            tuple(dict.fromkeys(names))))
        call = ast.Expr(ast.Call(ast.Name("__ldm_defer__", ast.Load()), [ast.Constant(len(self.blocks) - 1)], []))
        call = ast.fix_missing_locations(ast.copy_location(call, statements[0]))
        if checked:
            node.body = [call]
            return node
        return call

    def visit_FunctionDef(self, node):
        node.decorator_list = [self._mark(d) for d in node.decorator_list]
        return node

    def visit_ClassDef(self, node):
        node.decorator_list = [self._mark(d) for d in node.decorator_list]
        node.body = [self.visit(n) if isinstance(n, (ast.FunctionDef, ast.ClassDef)) else n for n in node.body]
        return node

    def _mark(self, decorator: ast.expr) -> ast.expr:
        called = isinstance(decorator, ast.Call)
        path = _dotted(decorator.func if called else decorator)
        if path is None or not path.startswith(self.rules.marks):
            return decorator
        args = [ast.Constant(path), ast.Constant(called), *(decorator.args if called else [])]
        mark = ast.Call(ast.Name("__ldm_compiler_mark__", ast.Load()), args, decorator.keywords if called else [])
        return ast.fix_missing_locations(ast.copy_location(mark, decorator))  # the new nodes only: cheap


class _Annotations(ast.NodeVisitor):
    """Annotations Python evaluates where they stand (a def's, a module's or a class's variables')
    that do more with a waiting name than name it (`HfApi | None`, `list[ModelCard]`) become
    strings, as `from __future__ import annotations` makes them: an operator would need the real
    object at once."""

    def __init__(self, waiting: set[str]):
        self.waiting = waiting

    def _string(self, annotation: ast.expr | None) -> ast.expr | None:
        if annotation is None or isinstance(annotation, ast.Name) or \
                not any(isinstance(n, ast.Name) and n.id in self.waiting for n in ast.walk(annotation)):
            return annotation
        return ast.copy_location(ast.Constant(ast.unparse(annotation)), annotation)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        a = node.args
        for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg))]:
            arg.annotation = self._string(arg.annotation)
        node.returns = self._string(node.returns)
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Module(self, node: ast.Module) -> None:
        self._variables(node.body)
        self.generic_visit(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._variables(node.body)
        self.generic_visit(node)

    def _variables(self, body: list[ast.stmt]) -> None:
        for statement in body:
            if isinstance(statement, ast.AnnAssign):
                statement.annotation = self._string(statement.annotation)
