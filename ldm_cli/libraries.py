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

`import_spandrel()` imports spandrel (the upscalers' architectures) with torchvision_standin's
modules served in torchvision's place while it imports: spandrel names three things from
torchvision at module level, for architectures ldm never runs, and torchvision's wheel is often
missing or built for another torch.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import os
import shutil
import sys
import time
import types
from typing import Iterator

from ldm_cli import cache, deferral

ROOTS = ("diffusers.", "transformers.", "kernels.")  # kernels: transformers' activations import it
# Subpackages whose __init__ imports every sibling, or scans for them.
EAGER_PACKAGES = frozenset(f"diffusers.{p}" for p in (
    "models.autoencoders", "models.controlnets", "models.transformers", "models.unets", "hooks",
    "quantizers",  # every quantizer's module (GGUF's imports gguf), for a model loaded quantized
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
# `import requests` waits (diffusers fetches images and files from URLs with it; ~0.2 s to import),
# and so do the Hub's names diffusers imports (naming them imports the Hub's whole API client,
# ~0.2 s), each used only by calling it or asking it for an attribute: ldm is offline.
DEFERRED_MODULES = ("requests",)
HUB_NAMES = {
    "huggingface_hub": frozenset((
        "CommitOperationAdd", "HfApi", "ModelCard", "ModelCardData", "ResolvedRevision", "create_repo", "delete_repo", "get_organization_overview", "get_repo_discussions",
        "get_token", "hf_hub_download", "hf_hub_url", "model_info", "resolve_revision", "scan_cache_dir",
        "snapshot_download", "split_torch_state_dict_into_shards", "try_to_load_from_cache", "upload_file",
        "upload_folder")),
    "huggingface_hub.file_download": frozenset(("REGEX_COMMIT_HASH",)),  # a pattern, asked to .match
    "huggingface_hub.hf_api": frozenset(("GitRefInfo", "HfApi", "RepoFolder")),  # RepoFolder: isinstance
    # the quantizers' package names, which its __init__ binds by importing every quantizer
    "diffusers.quantizers": frozenset(("DiffusersAutoQuantizer", "DiffusersQuantizer")),
}
RULES = deferral.Rules(DEFERRED_CHECKS, DEFERRED_IMPORTS, DEFERRED_CALLS, COMPILER_MARKS, DEFERRED_MODULES, HUB_NAMES)
IMPORT_MARKERS = ("torch._dynamo", "torch.distributed.tensor", "expert_parallel import", "tensor_parallel import",
                  "models.auto", "\nimport requests", "\nfrom huggingface_hub", "quantizers import Diffusers")
DIFFUSERS_IMPORT_UTILS = "diffusers.utils.import_utils"
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
        elif module.__name__ == DIFFUSERS_IMPORT_UTILS:
            with _kept_distributions():
                self._run(module)
        else:
            self._run(module)
        if module.__name__ == PEFT_UTILS:
            _skip_unit_lora_scale(module)
        if module.__name__ == IMPORT_UTILS:
            _kept_listings(module)

    def _run(self, module) -> None:
        if self.source is None:
            self.real.exec_module(module)
        else:
            code, blocks = _transformed(module.__file__, module.__package__ or "", self.source)
            namespace = module.__dict__

            def defer(index: int) -> None:
                block = deferral.Block(blocks[index][0], namespace)
                for name in blocks[index][1]:
                    namespace[name] = deferral.Deferred(block, name)

            namespace["__ldm_compiler_mark__"], namespace["__ldm_defer__"] = compiler_mark, defer
            exec(code, namespace)

    def _torch_utils(self, module) -> None:
        """diffusers' utilities try `from torch._dynamo import allow_in_graph`: held off, they fall
        back to a no-op decorator, which every model module then gets as ldm's recorder."""
        sys.meta_path.insert(0, _HOLD_OFF_COMPILER)
        try:
            self.real.exec_module(module)
        finally:
            sys.meta_path.remove(_HOLD_OFF_COMPILER)
        module.maybe_allow_in_graph = _record_allow_in_graph


UNUSED_GENERATION_S = 7 * 24 * 3600


@functools.lru_cache(maxsize=1)
def _generation():
    """This Python's and this ldm's folder of kept imports, marked used. A new one clears those no
    run has used for a week: an upgrade's old ones go, while two installs sharing the cache
    (two virtual environments, a checkout beside a release) keep theirs."""
    folder = cache.root() / "imports" / hashlib.sha256(repr(cache.stamp(__file__, deferral.__file__)).encode()).hexdigest()[:16]
    try:
        os.utime(folder)
    except FileNotFoundError:
        for old in folder.parent.glob("*"):
            if time.time() - old.stat().st_mtime > UNUSED_GENERATION_S:
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    except OSError:  # a cache folder ldm cannot write: nothing kept
        pass
    return folder


def _kept(kind: str, stamp: list, compute):
    return cache.kept(_generation() / kind, stamp, compute)


def _transformed(filename: str, package: str, source: str) -> tuple[types.CodeType, list]:
    """The module's rewritten code and its deferred blocks (rewriting and compiling them each run
    took ~0.8 s); a changed module, or a changed rewrite, is compiled anew."""
    def compute():
        transform = deferral.Transform(filename, package, RULES)
        # dont_inherit: not this module's `from __future__ import annotations` (it would turn the
        # library's annotations into strings: transformers' processors read theirs as classes)
        code = compile(transform.module(ast.parse(source)), filename, "exec", dont_inherit=True)
        return code, transform.blocks
    return _kept("code", cache.stamp(filename), compute)


def _kept_listings(import_utils: types.ModuleType) -> None:
    """transformers lists what each model folder exports by reading every file in it, at each
    start (~0.5 s for the models folder and the Auto classes' folder); the listing depends on
    nothing but those files, so it is kept, stamped with each file's time and size."""
    original = getattr(import_utils, "define_import_structure", None)
    if original is None:  # a transformers older than its folder listings: nothing to keep
        return

    @functools.lru_cache
    def define_import_structure(module_path, prefix=None):
        folder = module_path if os.path.isdir(module_path) else os.path.dirname(module_path)
        stamp = [str(module_path), prefix]
        for parent, folders, names in os.walk(folder):
            folders.sort()
            stamp += [(parent, n, *cache.stamp(os.path.join(parent, n))[-2:]) for n in sorted(names) if n.endswith(".py")]
        return _kept("listings", stamp, lambda: original(module_path, prefix))

    import_utils.define_import_structure = define_import_structure


@contextlib.contextmanager
def _kept_distributions() -> Iterator[None]:
    """diffusers maps import names to distributions at import with importlib.metadata, which reads
    the file list of every installed distribution (~0.2 s). The map changes only when one is
    installed or removed, which adds, removes or remakes its metadata folder on sys.path: it is
    kept, stamped with those folders' names and times, for the length of that import."""
    original = importlib.metadata.packages_distributions

    def packages_distributions() -> dict[str, list[str]]:
        return _kept("distributions", _distributions_stamp(), original)

    packages_distributions.__wrapped__ = original
    importlib.metadata.packages_distributions = packages_distributions
    try:
        yield
    finally:
        importlib.metadata.packages_distributions = original


def _distributions_stamp() -> list:
    """Every distribution's metadata folder on sys.path with its time (not the folders' own
    times: the current directory is on sys.path, and it changes whenever a file is saved there)."""
    stamp: list = [sys.version]
    for folder in sys.path:
        try:
            entries = os.scandir(folder or ".")
        except OSError:  # not a folder (a zip, a path hook's name) or gone
            continue
        with entries:
            stamp += sorted((folder, e.name, e.stat().st_mtime_ns) for e in entries
                            if e.name.endswith((".dist-info", ".egg-info")))
    return stamp


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
        if lazy or name in (TORCH_UTILS, PEFT_UTILS, IMPORT_UTILS, DIFFUSERS_IMPORT_UTILS) or _needs_change(source):
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


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the torchvision_standin modules under torchvision's names (ahead of any installed
    torchvision, so an upscale never depends on whether one loads)."""

    def __init__(self):
        from ldm_cli import torchvision_standin

        self.made = torchvision_standin.modules()

    def find_spec(self, name, path=None, target=None):
        if name not in self.made:
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=hasattr(self.made[name], "__path__"))

    def create_module(self, spec):
        return self.made[spec.name]

    def exec_module(self, module) -> None:
        pass


def import_spandrel() -> types.ModuleType:
    """spandrel, imported with the torchvision stand-ins registered only while it imports (a
    torchvision already imported is left as it is and used)."""
    if "spandrel" in sys.modules or "torchvision" in sys.modules:
        import spandrel

        return spandrel
    finder = _StandIns()
    sys.meta_path.insert(0, finder)
    try:
        import spandrel
    finally:
        sys.meta_path.remove(finder)
        for name, module in finder.made.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
    return spandrel
