"""libraries.py changes when diffusers' and transformers' modules load, never what they do: each
check runs a fresh interpreter (pytest's own has long imported everything)."""
import subprocess
import sys

import pytest


def run(code: str, tmp_path) -> str:
    env_code = "import os; os.environ['LDM_CACHE_DIR'] = " + repr(str(tmp_path / "cache")) + "\nimport ldm_cli\n"
    done = subprocess.run([sys.executable, "-c", env_code + code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_an_eager_subpackage_imports_one_module_alone_and_its_init_when_asked(tmp_path):
    out = run("""
import sys
import diffusers.models.unets.unet_2d_condition
print('unet_3d' in ' '.join(sys.modules), 'transformer_flux' in ' '.join(sys.modules))
from diffusers.hooks import HookRegistry   # a name only the package's __init__ binds
from diffusers.models.unets import UNetMotionModel
print(HookRegistry.__name__, UNetMotionModel.__module__)
""", tmp_path)
    assert out.split() == ["False", "False", "HookRegistry", "diffusers.models.unets.unet_motion_model"]


def test_an_availability_block_runs_on_first_use_and_names_resolve_to_the_real_objects(tmp_path):
    out = run("""
import sys
import diffusers.loaders.lora_base as lora_base
print('peft' in sys.modules, type(lora_base.__dict__['BaseTunerLayer']).__name__)
import torch
print(isinstance(torch.nn.Linear(1, 1), lora_base.BaseTunerLayer), 'peft' in sys.modules)
from peft.tuners.tuners_utils import BaseTunerLayer
print(lora_base.BaseTunerLayer is BaseTunerLayer)
""", tmp_path)
    assert out.split() == ["False", "Deferred", "False", "True", "True"]


@pytest.mark.parametrize("available", [True, False])
def test_a_deferred_block_keeps_its_check_and_its_else_branch(tmp_path, available):
    import importlib.machinery
    import types

    from ldm_cli import libraries

    path = tmp_path / "fake.py"
    path.write_text(f"""
AVAILABLE = {available}
def is_scipy_available():
    return AVAILABLE
if is_scipy_available():
    from json import JSONDecoder as Decoder
else:
    Decoder = None
""")
    module = types.ModuleType("fake")
    module.__file__, module.__package__ = str(path), ""
    libraries._Narrowed(importlib.machinery.SourceFileLoader("fake", str(path)), path.read_text(), False).exec_module(module)
    if not available:
        assert module.Decoder is None
        return
    assert type(module.__dict__["Decoder"]).__name__ == "Deferred"  # not imported yet
    assert module.Decoder().decode("[1]") == [1]  # first use runs the block
    import json
    assert module.__dict__["Decoder"] is json.JSONDecoder


def test_compiler_marks_wait_for_the_compiler_and_prepare_compile_applies_them(tmp_path):
    out = run("""
import sys
from diffusers.models.attention import BasicTransformerBlock
import diffusers.hooks.group_offloading as g
print('torch._dynamo' in sys.modules)
from ldm_cli import libraries
libraries.prepare_compile()
import torch._dynamo.trace_rules as rules
print(id(BasicTransformerBlock) in rules._allowed_callable_ids)
""", tmp_path)
    assert out.split() == ["False", "True"]


def test_rewritten_modules_and_listings_are_kept_and_reused(tmp_path):
    code = "import transformers.models.clip.modeling_clip, diffusers.loaders.lora_base\nprint('ok')"
    run(code, tmp_path)
    kept = sorted(p.relative_to(tmp_path / "cache") for p in (tmp_path / "cache").rglob("*.bin"))
    assert any(p.parts[2] == "code" for p in kept) and any(p.parts[2] == "listings" for p in kept)
    before = {p: (tmp_path / "cache" / p).stat().st_mtime_ns for p in kept}
    run(code, tmp_path)
    assert {p: (tmp_path / "cache" / p).stat().st_mtime_ns for p in kept} == before  # read, not rewritten


@pytest.mark.parametrize("damage", [b"", b"not marshal data"])
def test_a_damaged_cache_entry_is_compiled_again(tmp_path, damage):
    code = "import diffusers.loaders.lora_base\nprint('ok')"
    run(code, tmp_path)
    for path in (tmp_path / "cache").rglob("*.bin"):
        path.write_bytes(damage)
    assert run(code, tmp_path).strip() == "ok"


def test_a_new_generation_clears_only_the_ones_unused_for_a_week(tmp_path):
    """Another install's kept imports (used yesterday) stay; an upgrade's stale ones go."""
    import os
    import time

    from ldm_cli import libraries

    imports = tmp_path / "cache" / "imports"
    fresh, stale = imports / "another-install", imports / "an-old-ldm"
    for folder, age in ((fresh, 24 * 3600), (stale, libraries.UNUSED_GENERATION_S + 60)):
        (folder / "code").mkdir(parents=True)
        os.utime(folder, (time.time() - age,) * 2)
    run("import diffusers.loaders.lora_base\nprint('ok')", tmp_path)
    assert fresh.exists() and not stale.exists() and len(list(imports.iterdir())) == 2


def test_rewritten_modules_keep_their_annotations_as_written(tmp_path):
    """Not libraries.py's `from __future__ import annotations`: transformers' processors read
    their kwargs' annotations as classes (a Qwen2-VL processor call fails on strings)."""
    out = run("""
from transformers import processing_utils
print(sorted({type(v).__name__ for v in processing_utils.ProcessingKwargs.__annotations__.values()}))
""", tmp_path)
    assert "ForwardRef" not in out and "str" not in out


def test_what_an_offline_run_never_calls_waits_and_resolves_to_the_real_objects_on_use(tmp_path):
    """requests (diffusers' URL fetching) and the Hub's API client (naming its functions imports
    all of it) wait; on first use each name is the library's own object."""
    out = run("""
import sys
import diffusers.utils.loading_utils as loading_utils, diffusers.utils.hub_utils as hub_utils
import transformers.utils.hub as transformers_hub
print('requests' in sys.modules, 'huggingface_hub.hf_api' in sys.modules)
print(type(loading_utils.__dict__['requests']).__name__, type(hub_utils.__dict__['model_info']).__name__)
print(transformers_hub._CACHED_NO_EXIST is __import__('huggingface_hub')._CACHED_NO_EXIST)  # a sentinel stays itself
print(transformers_hub.__annotations__['_hf_api'])  # `HfApi | None` cannot wait as an object: a string
import requests, huggingface_hub
print(loading_utils.requests.get is requests.get, hub_utils.model_info.__name__)
print(isinstance('main', transformers_hub.ResolvedRevision), hub_utils.__dict__['model_info'] is huggingface_hub.model_info)
""", tmp_path)
    assert out.splitlines() == ["False False", "Deferred Deferred", "True", "HfApi | None", "True model_info",
                                "False True"]


def test_the_kept_distribution_map_is_importlibs_and_follows_an_install(tmp_path):
    import importlib.metadata
    import os

    from ldm_cli import libraries

    os.environ["LDM_CACHE_DIR"] = str(tmp_path / "cache")
    libraries._generation.cache_clear()  # its folder under this cache
    site = tmp_path / "site"
    site.mkdir()
    sys.path.insert(0, str(site))
    kept = lambda: sorted((tmp_path / "cache").rglob("*.bin"))  # noqa: E731
    try:
        with libraries._kept_distributions():
            assert importlib.metadata.packages_distributions() == importlib.metadata.packages_distributions.__wrapped__()
            first = kept()
            assert first
            (site / "notes.txt").write_text("a file saved where Python looks (the current directory)")
            importlib.metadata.packages_distributions()
            assert kept() == first  # the same map, read back
            (site / "ldmprobe-1.0.dist-info").mkdir()  # an install
            (site / "ldmprobe-1.0.dist-info" / "METADATA").write_text("Name: ldmprobe\nVersion: 1.0\n")
            (site / "ldmprobe-1.0.dist-info" / "top_level.txt").write_text("ldmprobe\n")
            assert importlib.metadata.packages_distributions()["ldmprobe"] == ["ldmprobe"]
        assert not hasattr(importlib.metadata.packages_distributions, "__wrapped__")  # put back after the import
    finally:
        sys.path.remove(str(site))
        del os.environ["LDM_CACHE_DIR"]
        libraries._generation.cache_clear()
