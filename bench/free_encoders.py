"""What freeing the text encoders gives back: a FLUX run with the real T5-XXL and CLIP-L.

    python bench/free_encoders.py            # T5-XXL v1.1 (4.76B parameters, bf16) and CLIP-L
    python bench/free_encoders.py --tiny     # the tests' toy encoders, a dry run

The text encoders are FLUX.1's, at their real size with random weights (nothing downloaded); the
transformer and VAE are toy ones, so the figures are the encoders' alone. A run as `ldm batch`
makes it (render.render: every prompt encoded first, then the encoders freed, ahead.py) draws
4 images of 4 prompts, T5 reading 64 tokens (512 would take minutes on a CPU and change no
figure here); the process's resident memory (RSS) is read when the model is built, right after
the prompts are encoded and at the end, and the same run with freeing switched off gives the
baseline. Reading the process, not the system, leaves other programs' memory out.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

import tiny_models as tiny  # noqa: E402
from ldm_cli import ahead, families, memory, render  # noqa: E402
from ldm_cli.loading import recipe  # noqa: E402
from ldm_cli.loading.folder import load_tokenizer  # noqa: E402
from ldm_cli.model import Model  # noqa: E402
from ldm_cli.progress import Progress  # noqa: E402
from ldm_cli.settings import Settings  # noqa: E402

PROMPTS = ["a red fox in snow", "a lighthouse at dusk", "a bowl of ramen", "a city street in rain"]


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmRSS in /proc/self/status")


def real_encoders(dtype: torch.dtype) -> list[torch.nn.Module]:
    """CLIP-L and T5-XXL from the shipped FLUX configs: built on the meta device, then filled."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    folder = recipe.SHIPPED / "flux-dev"
    out = []
    for name, cls, config_cls in (("text_encoder", CLIPTextModel, CLIPTextConfig),
                                  ("text_encoder_2", T5EncoderModel, T5Config)):
        config = config_cls.from_dict(recipe.read_json(recipe.config_file(folder, name)))
        with torch.device("meta"):
            module = cls(config)
        module = module.to_empty(device="cpu").to(dtype)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, 0.02)
            for b in module.buffers():  # CLIP's position ids
                b.copy_(torch.arange(b.shape[-1]).expand_as(b))
        out.append(module.eval().requires_grad_(False))
    return out


def model_with(encoders: list[torch.nn.Module]) -> Model:
    from transformers import T5TokenizerFast

    from ldm_cli.families import flux

    transformer = tiny.flux_transformer("dev")
    transformer.context_embedder = torch.nn.Linear(encoders[1].config.d_model, transformer.inner_dim)
    transformer.time_text_embed.text_embedder.linear_1 = torch.nn.Linear(
        encoders[0].config.hidden_size, transformer.time_text_embed.text_embedder.linear_1.out_features)
    transformer.to(encoders[1].dtype)
    tokenizers = [load_tokenizer(recipe.TOKENIZER),
                  T5TokenizerFast.from_pretrained(str(recipe.T5_TOKENIZER), local_files_only=True)]
    return Model(family=families.get("flux"), denoiser=transformer, vae=tiny.flux_vae().to(encoders[1].dtype),
                 text_encoders=encoders, tokenizers=tokenizers, scheduler_config=tiny.FLUX_SCHEDULERS["dev"],
                 name="bench", defaults=flux.defaults("dev", tiny.FLUX_SCHEDULERS["dev"]))


def run(tiny_encoders: bool, free: bool) -> dict[str, float]:
    encoders = [tiny.text_encoder(seed=3, width=tiny.CLIP_L), tiny.t5_encoder()] if tiny_encoders \
        else real_encoders(torch.bfloat16)
    if tiny_encoders:
        encoders = [e.to(torch.bfloat16) for e in encoders]
    model = model_with(encoders)
    del encoders
    readings = {"loaded": rss_gib()}
    real_free = memory.free_text_encoders

    def freeing(m) -> None:
        if free:
            real_free(m)
        readings["encoded"] = rss_gib()
    ahead.memory.free_text_encoders = freeing
    jobs = [Settings(prompt=p, steps=2, seed=i, width=64, height=64, max_sequence_length=64).resolve(
        model.defaults, model.native_size) for i, p in enumerate(PROMPTS)]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out, Progress(1, 1, quiet=True) as progress:
        list(render.render(model, jobs, 1, Path(out), progress))
    readings["seconds"] = time.perf_counter() - start
    readings["end"] = rss_gib()
    ahead.memory.free_text_encoders = real_free
    del model
    gc.collect()
    return readings


def main() -> None:
    from ldm_cli.loading import quiet_libraries

    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tests' toy encoders (a dry run)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    base = rss_gib()
    kept = run(args.tiny, free=False)
    freed = run(args.tiny, free=True)
    encoders = "toy encoders" if args.tiny else "CLIP-L + T5-XXL v1.1 in bf16 (random weights)"
    print(f"FLUX.1-dev text encoders: {encoders}; 4 prompts, 4 images; process RSS in GiB "
          f"(interpreter and libraries before any model: {base:.2f})")
    print("| encoders after the prompts are encoded | loaded | after encoding | end of run | run s |")
    print("|---|---|---|---|---|")
    for name, r in (("kept (before this change)", kept), ("freed (ahead.py)", freed)):
        print(f"| {name} | {r['loaded']:.2f} | {r['encoded']:.2f} | {r['end']:.2f} | {r['seconds']:.1f} |")
    print(f"returned to the system: {kept['end'] - freed['end']:.2f} GiB")


if __name__ == "__main__":
    main()
