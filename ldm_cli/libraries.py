"""diffusers and transformers, imported for what a run uses.

Importing one model class cost a plain SD1.5 run seconds of code it never calls: diffusers'
`models.unets`, `models.transformers`, `hooks`... import every module they hold; `torch._dynamo`
(and sympy with it) comes in for decorators that only matter to a compiled model; peft, scipy,
jinja2 and torch.distributed's tensors come in at module level for LoRA training, losses, chat
templates and sharded loading; transformers lists what its ~600 model folders export by reading
their files, at every start. `install()` puts an import hook in front of diffusers' and
transformers' modules that changes when those things load, never what the modules do, and
leaves the packages' files as they are:

- the eager subpackages load as lazy packages: one of their modules imports alone, and the
  package's own `__init__` runs the first time something asks it for a name it does not hold;
- decorators from torch's compiler (`@torch._dynamo.X`, `@torch.compiler.disable`, diffusers'
  `maybe_allow_in_graph`) are recorded, and `prepare_compile()` applies them before `--compile`
  (until something is compiled they change nothing);
- what a module-level `if is_peft_available():` block defines (likewise scipy, jinja2,
  torch.distributed), and names it imports from torch's compiler or distributed tensors, are
  stand-ins that run their statements on first use (the availability check itself still runs);
- transformers' listings of its model folders are kept in ldm's cache, stamped with the files'
  times and sizes, and so is the bytecode of every module rewritten here.
A module that needs none of this loads exactly as Python would load it, from its own bytecode.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.abc
import importlib.machinery
import marshal
import os
import shutil
import sys
import types

from ldm_cli import cache

ROOTS = ("diffusers.", "transformers.")
# Subpackages whose __init__ imports every sibling, or scans for them.
EAGER_PACKAGES = frozenset(f"diffusers.{p}" for p in (
    "models.autoencoders", "models.controlnets", "models.transformers", "models.unets", "hooks",
)) | {"transformers.models"}  # it reads the files of its ~600 model families
TORCH_UTILS = "diffusers.utils.torch_utils"
PEFT_UTILS = "diffusers.utils.peft_utils"
IMPORT_UTILS = "transformers.utils.import_utils"
DEFERRED_CHECKS = ("is_peft_available", "is_scipy_available", "is_torch_distributed_available",
                   "_check_distributed_checkpointing_available", "is_jinja_available",
                   "is_transformers_available")  # diffusers' loaders import Auto classes with it
COMPILER_MARKS = ("torch._dynamo.", "torch.compiler.disable", "torch.compiler.allow_in_graph")
# A module-level `name = f(...)` of these becomes a stand-in: transformers' processors import a
# second copy of the whole package with it (~0.6 s, most of it listing every model family).
DEFERRED_CALLS = ("direct_transformers_import",)
# Module-level `from X import name` of these become stand-ins: torch's compiler and distributed
# tensors (both import sympy), transformers' parallelism (it registers distributed styles) and
# its Auto classes (their package reads every file of its folder for names, ~0.5 s).
DEFERRED_IMPORTS = ("torch._dynamo", "torch.distributed.tensor", "transformers.distributed.expert_parallel",
                    "transformers.distributed.tensor_parallel", "transformers.models.auto")
IMPORT_MARKERS = ("torch._dynamo", "torch.distributed.tensor", "expert_parallel import", "tensor_parallel import",
                  "models.auto")
_marks: list = []  # (cell or None, target, path, called, args, kwargs): compiler decorations owed


def _compiler_loaded() -> bool:
    return "torch._dynamo" in sys.modules


def _resolve(path: str):
    import torch._dynamo  # noqa: F401  (what every mark is made of)

    target = sys.modules["torch"]
    for part in path.split(".")[1:]:
        target = getattr(target, part)
    return target


def _apply(path: str, fn, called: bool, args: tuple, kwargs: dict):
    decorator = _resolve(path)
    return decorator(*args, **kwargs)(fn) if called else decorator(fn)


def compiler_mark(path: str, called: bool, *args, **kwargs):
    """`@path` or `@path(*args, **kwargs)`, applied now if the compiler is loaded, else when it is:
    a class is marked in place later; a function becomes a wrapper whose target is swapped."""
    def decorate(fn):
        if _compiler_loaded():
            return _apply(path, fn, called, args, kwargs)
        if isinstance(fn, type):
            _marks.append((None, fn, path, called, args, kwargs))
            return fn
        cell = [fn]

        @functools.wraps(fn)
        def call(*a, **k):
            if cell[0] is fn and _compiler_loaded():  # brought in by someone else meanwhile
                cell[0] = _apply(path, fn, called, args, kwargs)
            return cell[0](*a, **k)

        _marks.append((cell, fn, path, called, args, kwargs))
        return call
    return decorate


def _record_allow_in_graph(cls):
    return compiler_mark("torch._dynamo.allow_in_graph", False)(cls)


class _Deferred:
    """A module-level name whose defining statements have not run yet; they run (once, in the
    module's namespace) on its first use, after which it forwards to what they defined."""

    __slots__ = ("_block", "_name")

    def __init__(self, block: "_Block", name: str):
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


class _Block:
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


class _Transform(ast.NodeTransformer):
    """Rewrites a module's top level: deferrable statements become `__ldm_defer__(i)`, which binds
    stand-ins for what block i defines (an availability check around a block is still evaluated,
    so a missing package takes its else branch as before); compiler decorators are deferred."""

    def __init__(self, filename: str, package: str):
        self.filename, self.package, self.blocks = filename, package, []  # blocks: (code, names)

    def module(self, tree: ast.Module) -> ast.Module:
        # a name the module binds elsewhere too (say `torch`, by `import torch.distributed`) stays eager
        self.elsewhere = {name for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
                          for name in _bound_names([node]) or []}
        tree.body = [self._top(node) for node in tree.body]
        return tree

    def _top(self, node: ast.stmt) -> ast.stmt:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            return self.visit(node)
        checked = isinstance(node, ast.If) and isinstance(node.test, ast.Call) and not node.test.args \
            and getattr(node.test.func, "id", None) in DEFERRED_CHECKS
        if checked:
            statements = node.body
        elif (isinstance(node, ast.ImportFrom) and _absolute(node, self.package).startswith(DEFERRED_IMPORTS)) \
                or (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                    and getattr(node.value.func, "id", None) in DEFERRED_CALLS):
            statements = [node]
        else:
            return node
        names = _bound_names(statements)
        if not names or (checked and self.elsewhere.intersection(names)):
            return node
        self.blocks.append((compile(ast.Module(body=statements, type_ignores=[]), self.filename, "exec"),
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
        if path is None or not path.startswith(COMPILER_MARKS):
            return decorator
        args = [ast.Constant(path), ast.Constant(called), *(decorator.args if called else [])]
        mark = ast.Call(ast.Name("__ldm_compiler_mark__", ast.Load()), args, decorator.keywords if called else [])
        return ast.fix_missing_locations(ast.copy_location(mark, decorator))  # the new nodes only: cheap


class _Narrowed(importlib.abc.Loader):
    """Runs one module as its own loader would, with the changes it needs."""

    def __init__(self, real: importlib.abc.SourceLoader, source: str, lazy: bool):
        self.real, self.source, self.lazy = real, source, lazy

    def create_module(self, spec):
        if self.lazy:
            module = _LazyPackage(spec.name)
            module._ldm_init = self.real
            return module
        return self.real.create_module(spec)

    def exec_module(self, module) -> None:
        if self.lazy:
            return  # deferred to the first missing name
        if module.__name__ == TORCH_UTILS and not _compiler_loaded():
            self._torch_utils(module)
        elif self.source is None:
            self.real.exec_module(module)
        else:
            code, blocks = _transformed(module.__file__, module.__package__ or "", self.source)
            namespace = module.__dict__

            def defer(index: int) -> None:
                block = _Block(blocks[index][0], namespace)
                for name in blocks[index][1]:
                    namespace[name] = _Deferred(block, name)

            namespace["__ldm_compiler_mark__"], namespace["__ldm_defer__"] = compiler_mark, defer
            exec(code, namespace)
        if module.__name__ == PEFT_UTILS:
            _skip_unit_lora_scale(module)
        if module.__name__ == IMPORT_UTILS:
            _kept_listings(module)

    def _torch_utils(self, module) -> None:
        """diffusers' utilities try `from torch._dynamo import allow_in_graph`: held off, they fall
        back to a no-op decorator, which every model module then gets as ldm's recorder."""
        sys.meta_path.insert(0, _HOLD_OFF_COMPILER)
        try:
            self.real.exec_module(module)
        finally:
            sys.meta_path.remove(_HOLD_OFF_COMPILER)
        module.maybe_allow_in_graph = _record_allow_in_graph


def _kept(kind: str, stamp: list, compute):
    """compute(), kept in ldm's cache under `stamp` (which names everything it depends on) as
    Python keeps bytecode: marshalled, written whole, recomputed when missing or damaged."""
    name = hashlib.sha256(repr(stamp).encode()).hexdigest()[:32] + ".bin"
    kept = _generation() / kind / name
    try:
        return marshal.loads(kept.read_bytes())
    except (OSError, ValueError, EOFError, TypeError):  # not kept yet, or damaged
        pass
    value = compute()
    try:
        if not kept.parent.parent.exists():  # a new Python or ldm: what older ones kept goes
            for old in kept.parent.parent.parent.glob("*"):
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        kept.parent.mkdir(parents=True, exist_ok=True)
        partial = kept.with_name(f".{name}.{os.getpid()}")
        partial.write_bytes(marshal.dumps(value))
        os.replace(partial, kept)
    except OSError:  # no cache folder to write: computed again next time
        pass
    return value


@functools.lru_cache(maxsize=1)
def _generation():
    """This Python's and this ldm's folder of kept imports."""
    return cache.root() / "imports" / hashlib.sha256(repr(_stamp(__file__)).encode()).hexdigest()[:16]


def _stamp(*paths: str) -> list:
    stamp = [sys.version, *paths]
    for path in paths:
        stat = os.stat(path)
        stamp += [stat.st_mtime_ns, stat.st_size]
    return stamp


def _transformed(filename: str, package: str, source: str) -> tuple[types.CodeType, list]:
    """The module's rewritten code and its deferred blocks (rewriting and compiling them each run
    took ~0.8 s); a changed module, or a changed rewrite, is compiled anew."""
    def compute():
        transform = _Transform(filename, package)
        code = compile(transform.module(ast.parse(source)), filename, "exec")
        return code, transform.blocks
    return _kept("code", _stamp(filename), compute)


def _kept_listings(import_utils: types.ModuleType) -> None:
    """transformers lists what each model folder exports by reading every file in it, at each
    start (~0.5 s for the models folder and the Auto classes' folder); the listing depends on
    nothing but those files, so it is kept, stamped with each file's time and size."""
    original = import_utils.define_import_structure

    @functools.lru_cache
    def define_import_structure(module_path, prefix=None):
        folder = module_path if os.path.isdir(module_path) else os.path.dirname(module_path)
        stamp = [str(module_path), prefix]
        for parent, folders, names in os.walk(folder):
            folders.sort()
            stamp += [(parent, n, *_stamp(os.path.join(parent, n))[-2:]) for n in sorted(names) if n.endswith(".py")]
        return _kept("listings", stamp, lambda: original(module_path, prefix))

    import_utils.define_import_structure = define_import_structure


class _LazyPackage(types.ModuleType):
    """A package whose submodules import alone; its __init__ runs when a missing name is asked for."""

    def __getattr__(self, name: str):
        init = None if name.startswith("__") else self.__dict__.pop("_ldm_init", None)
        if init is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        init.exec_module(self)
        # a package whose __init__ puts another module in its place (transformers' lazy modules)
        return getattr(sys.modules.get(self.__name__, self), name) if sys.modules.get(self.__name__) is not self \
            else getattr(self, name)


class _HoldOffCompiler(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch._dynamo":
            raise ImportError("torch._dynamo is imported when --compile asks for it")
        return None


_HOLD_OFF_COMPILER = _HoldOffCompiler()


def _skip_unit_lora_scale(peft_utils: types.ModuleType) -> None:
    """Every model's forward calls (un)scale_lora_layers, which import peft before seeing that a
    weight of 1 (the only one ldm passes: it merges LoRAs itself) changes nothing: return first."""
    def unit_weight_returns(original, also_none: bool):
        @functools.wraps(original)
        def call(model, weight=None):
            if weight == 1.0 or (also_none and weight is None):
                return None
            return original(model, weight)
        return call

    peft_utils.scale_lora_layers = unit_weight_returns(peft_utils.scale_lora_layers, False)
    peft_utils.unscale_lora_layers = unit_weight_returns(peft_utils.unscale_lora_layers, True)


def _needs_change(source: str) -> bool:
    return any(f"\nif {check}():" in source for check in DEFERRED_CHECKS) \
        or any(marker in source for marker in IMPORT_MARKERS + DEFERRED_CALLS) or any(f"@{mark}" in source for mark in COMPILER_MARKS)


class _Narrowing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if not name.startswith(ROOTS) or _compiler_loaded() and name not in EAGER_PACKAGES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return spec
        lazy = name in EAGER_PACKAGES
        source = None if lazy else spec.loader.get_data(spec.origin).decode("utf-8")
        if lazy or name in (TORCH_UTILS, PEFT_UTILS, IMPORT_UTILS) or _needs_change(source):
            spec.loader = _Narrowed(spec.loader, source if source and _needs_change(source) else None, lazy)
        return spec


def install() -> None:
    """Narrow every later import of diffusers and transformers modules."""
    if not any(isinstance(f, _Narrowing) for f in sys.meta_path):
        sys.meta_path.insert(0, _Narrowing())


def prepare_compile() -> None:
    """Apply every compiler decoration recorded so far (later ones apply at once): called before
    torch.compile."""
    for cell, fn, path, called, args, kwargs in _marks:
        marked = _apply(path, fn, called, args, kwargs)
        if cell is not None:
            cell[0] = marked
    _marks.clear()
