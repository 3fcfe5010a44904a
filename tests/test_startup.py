"""Start-up is a feature: a run imports what it uses (libraries.py, README "Start-up").

Each check runs a fresh interpreter, since pytest's own process has long imported everything."""
import json
import subprocess
import sys

import pytest

RUN = """
import json, sys
from ldm_cli import cli
sys.argv = ["ldm", *sys.argv[1:]]
try:
    cli.app()
except SystemExit as e:
    assert e.code == 0, e.code
print(json.dumps(sorted(sys.modules)))
"""

# What a plain run of the built-in model never needs: LoRA training code, torch's compiler (and
# the sympy it brings), OpenCV (canny), the ControlNet loaders, scipy (Beta schedules, losses).
NEVER = ("peft", "torch._dynamo", "sympy", "cv2", "scipy", "torch.distributed.tensor",
         "ldm_cli.loading.controlnet", "ldm_cli.loading.flux_controlnet", "ldm_cli.loading.sd3_controlnet",
         "ldm_cli.server", "fastapi", "starlette", "uvicorn",  # the server's stack: `ldm serve`'s alone
         "requests", "huggingface_hub.hf_api",  # URL fetching and the Hub's API client: ldm is offline
         "gguf", "diffusers.quantizers.auto",  # quantizers, for quantized files only
         "pydantic")  # typer's coercion of flag values (flag_values.py)


def modules_after(*args: str, cwd) -> set[str]:
    done = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return set(json.loads(done.stdout.splitlines()[-1]))


def loaded(modules: set[str], names) -> list[str]:
    return sorted(n for n in names if n in modules or any(m.startswith(n + ".") for m in modules))


@pytest.mark.slow
def test_plain_builtin_generate_imports_only_what_it_uses(tmp_path):
    modules = modules_after("generate", "a red circle", "--seed", "1", "--quiet", "--out", str(tmp_path / "o"),
                            cwd=tmp_path)
    assert list((tmp_path / "o").glob("*.png"))
    assert loaded(modules, NEVER) == []
    # the one model family it uses, not the package's every one
    assert "diffusers.models.unets.unet_2d_condition" in modules
    others = [f"diffusers.models.transformers.{m}" for m in ("transformer_sd3", "transformer_flux",
                                                              "transformer_chroma", "auraflow_transformer_2d")]
    assert loaded(modules, others) == []
    assert "diffusers.models.autoencoders.autoencoder_kl" in modules
    assert "diffusers.models.autoencoders.autoencoder_rae" not in modules
