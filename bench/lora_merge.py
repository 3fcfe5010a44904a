"""Merging LoRAs into a full-size SDXL-architecture U-Net on the CPU, as `ldm` does for a run,
and restoring it for the next set of a batch.

The U-Net is built from the shipped SDXL config with random fp16 weights (5.1 GB). Two LoRA
files in kohya's SDXL layout (original `input_blocks` names, fp16, alpha 16) change every
Linear and Conv2d of its attention blocks and resnets (q, k, v, out, proj_in/out, feed-forward,
3x3 and 1x1 convolutions, down/upsamplers) at rank 32. Timed: reading and planning the first
set, merging it, switching to the second (restore + merge), restoring; each merged weight is
checked against W + scale * up @ down once, and the restore against the original bit for bit.

    python bench/lora_merge.py            # prints a table; about 3 minutes and 12 GB here
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "ldm_cli" / "loading" / "configs" / "sdxl" / "unet" / "config.json"
RANK, ALPHA = 32, 16.0
SKIP = ("time_embedding", "add_embedding", "conv_in", "conv_out")  # LoRA trainers leave these alone


def random_unet():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads(CONFIG.read_text())).to(torch.float16)
    unet = unet.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02, generator=g)
    return unet.eval()


def write_lora(unet, path: Path, seed: int) -> int:
    """A rank-32 kohya-layout LoRA on every attention and convolution layer; returns its layer count."""
    from safetensors.torch import save_file

    from ldm_cli.loading import keymap

    names, g, out = keymap.UNetNames(dict(unet.config)), torch.Generator().manual_seed(seed), {}
    for name, m in unet.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or name.startswith(SKIP):
            continue
        key = "lora_unet_" + names.origin(name + ".weight").key.removesuffix(".weight").replace(".", "_")
        conv = isinstance(m, torch.nn.Conv2d)
        down = (RANK, m.in_channels, *m.kernel_size) if conv else (RANK, m.in_features)
        up = (m.out_channels, RANK, 1, 1) if conv else (m.out_features, RANK)
        out[f"{key}.lora_down.weight"] = (0.01 * torch.randn(down, generator=g)).half()
        out[f"{key}.lora_up.weight"] = (0.01 * torch.randn(up, generator=g)).half()
        out[f"{key}.alpha"] = torch.tensor(ALPHA)
    save_file(out, str(path))
    return len(out) // 3


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    from ldm_cli import families
    from ldm_cli.model import Model

    unet = random_unet()
    model = Model(families.get("sdxl"), unet, None, [], [], {}, "sdxl-random")
    with tempfile.TemporaryDirectory() as folder:
        paths = [Path(folder) / f"{name}.safetensors" for name in "ab"]
        layers = [write_lora(unet, p, seed) for seed, p in enumerate(paths)][0]
        size_mb = paths[0].stat().st_size / 2**20
        times, backup_gb, changed = measure(model, paths)
    params = sum(p.numel() for p in unet.parameters())
    print(f"SDXL U-Net, random fp16: {params / 1e9:.2f} B parameters; LoRA rank {RANK} on {layers} layers "
          f"({changed / params:.1%} of the weights), {size_mb:.0f} MB fp16; {torch.get_num_threads()} threads")
    print("| step | seconds |\n|---|---|")
    for label, seconds in times.items():
        print(f"| {label} | {seconds:.1f} |")
    print(f"originals kept on the CPU: {backup_gb:.2f} GB; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GB")


def measure(model, paths: list[Path]) -> tuple[dict[str, float], float, int]:
    """(seconds per step, GB of originals kept, weights changed), checking the merge and restore."""
    from ldm_cli.networks import formats, merge, targets

    unet, components, merger = model.denoiser, targets.components(model), merge.Merger()
    probe = next(n for n, m in unet.named_modules() if n.endswith("attn2.to_k"))
    original = unet.get_submodule(probe).weight.clone()

    def planned(path):
        lora = formats.open_lora(path, False)
        return lora, merge.plan(components, targets.table(model), [merge.Applied(lora, 1.0, 0.8)])

    t_plan, (lora_a, plan_a) = timed(lambda: planned(paths[0]))
    t_merge, _ = timed(lambda: merger.merge(components, plan_a))
    check(unet, probe, original, lora_a)
    backup_gb = sum(o.numel() * o.element_size() for _, o in merger.originals.values()) / 2**30
    _, (_, plan_b) = timed(lambda: planned(paths[1]))
    t_switch, _ = timed(lambda: (merger.restore(), merger.merge(components, plan_b)))
    t_restore, _ = timed(merger.restore)
    assert torch.equal(unet.get_submodule(probe).weight, original), "restore is not exact"
    times = {"read + plan (header, shapes checked)": t_plan, "merge (fp32 sums, cast to fp16)": t_merge,
             "switch to another LoRA (restore + merge)": t_switch, "restore (exact)": t_restore}
    return times, backup_gb, sum(unet.get_submodule(m).weight.numel() for _, m in plan_a)


def check(unet, probe: str, original: torch.Tensor, lora) -> None:
    """The probed weight is W + 0.8 * alpha / rank * up @ down, summed in fp32, cast once (to
    within one fp16 rounding: the merge's fused multiply-add may round the fp32 sum otherwise)."""
    from ldm_cli.loading import keymap

    names = keymap.UNetNames(dict(unet.config))
    key = "lora_unet_" + names.origin(probe + ".weight").key.removesuffix(".weight").replace(".", "_")
    delta = lora.read(key + ".lora_up.weight").float() @ lora.read(key + ".lora_down.weight").float()
    expected = (original.float() + 0.8 * ALPHA / RANK * delta).half()
    merged = unet.get_submodule(probe).weight.float()
    assert torch.allclose(merged, expected.float(), rtol=2 ** -10, atol=2 ** -24), "merge differs from the formula"


if __name__ == "__main__":
    main()
