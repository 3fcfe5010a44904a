"""Models of random weights in the real architectures, for the benchmarks: the configs ldm ships
(ldm_cli/loading/configs), or the same layouts at toy width for a dry run on the CPU. Nothing
is downloaded. SD1/SDXL (bench/gpu_speed.py) and FLUX.1 dev (bench/flux_memory.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ldm_cli import families  # noqa: E402
from ldm_cli.loading import folder as folders  # noqa: E402
from ldm_cli.loading import recipe  # noqa: E402
from ldm_cli.model import Model  # noqa: E402


def tiny_configs(family: str) -> dict[str, dict]:
    """The real architectures at toy width: 64x64 images, 8x8x4 latents, 32-wide CLIP encoders.
    SD1's U-Net is tests/tiny_models.py's, so the tests' compile cache holds its compiled code."""
    xl = family == "sdxl"
    unet = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                norm_num_groups=8, cross_attention_dim=64 if xl else 32, attention_head_dim=(2, 4) if xl else 4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    if xl:
        unet.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=6 * 8 + 32, use_linear_projection=True)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=64, block_out_channels=(8, 16, 16, 16),
               layers_per_block=1, norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025 if xl else 0.18215)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, projection_dim=32, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    configs = {"unet": unet, "vae": vae, "text_encoder": {**text, "hidden_act": "quick_gelu"}}
    if xl:
        configs["text_encoder_2"] = {**text, "hidden_act": "gelu"}
    return configs


def shipped_configs(family: str) -> dict[str, dict]:
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    return {n: recipe.read_json(recipe.config_file(recipe.SHIPPED / family, n)) for n in names}


def build_modules(configs: dict[str, dict], device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """Every component with random weights, initialised on `device` (an SDXL U-Net in seconds on a GPU)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    with torch.device(device):
        modules = {"unet": UNet2DConditionModel.from_config(configs["unet"]),
                   "vae": AutoencoderKL.from_config(configs["vae"])}
        for name in ("text_encoder", "text_encoder_2"):
            if name in configs:
                cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
                modules[name] = cls(CLIPTextConfig.from_dict(configs[name]))
    return {n: m.to(dtype).eval().requires_grad_(False) for n, m in modules.items()}  # as ldm's loader leaves them


def build_model(family: str, tiny: bool, device: torch.device, dtype: torch.dtype) -> Model:
    """An SD1 or SDXL model of random weights: the shipped configs, or tiny_configs."""
    configs = tiny_configs(family) if tiny else shipped_configs(family)
    modules = build_modules(configs, device, dtype)
    encoders = [modules[n] for n in ("text_encoder", "text_encoder_2") if n in modules]
    tokenizers = [folders.load_tokenizer(recipe.TOKENIZER, **(recipe.OPENCLIP_TOKENS if e.config.hidden_act == "gelu" else {}))
                  for e in encoders]
    scheduler = recipe.read_json(recipe.config_file(recipe.SHIPPED / family, "scheduler"))
    return Model(family=families.get(family), denoiser=modules["unet"], vae=modules["vae"],
                 text_encoders=encoders, tokenizers=tokenizers, scheduler_config=scheduler, name=f"random-{family}")


# -- FLUX.1 dev --------------------------------------------------------------------------------
FLUX_PARTS = ("transformer", "text_encoder_2", "text_encoder", "vae")


def flux_modules(tiny: bool, device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """FLUX.1 dev's four components with random weights, built on `device` and then kept on the
    CPU: each benchmark configuration gets its own modules over these weights (flux_model)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        import tiny_models

        return {"transformer": tiny_models.flux_transformer("dev"), "text_encoder_2": tiny_models.t5_encoder(),
                "text_encoder": tiny_models.text_encoder(seed=3, width=tiny_models.CLIP_L),
                "vae": tiny_models.flux_vae()}
    folder = recipe.SHIPPED / "flux-dev"
    config = {n: recipe.read_json(recipe.config_file(folder, n)) for n in FLUX_PARTS}
    torch.manual_seed(0)
    out = {}
    with torch.device(device):  # default init on a GPU: seconds for 17B parameters; one part at a time
        for name, make in (("transformer", lambda c: FluxTransformer2DModel.from_config(c)),
                           ("text_encoder_2", lambda c: T5EncoderModel(T5Config.from_dict(c))),
                           ("text_encoder", lambda c: CLIPTextModel(CLIPTextConfig.from_dict(c))),
                           ("vae", lambda c: AutoencoderKL.from_config(c))):
            out[name] = make(config[name]).to(dtype).to("cpu").eval().requires_grad_(False)
    return out


def flux_model(weights: dict[str, torch.nn.Module]) -> Model:
    """An ldm Model over fresh copies of `weights`' modules sharing their tensors (placing,
    offloading or casting the copy leaves `weights` as they are)."""
    from ldm_cli.families import flux

    parts = {name: _sharing(module) for name, module in weights.items()}
    scheduler = recipe.read_json(recipe.config_file(recipe.SHIPPED / "flux-dev", "scheduler"))
    tokenizers = [folders.load_tokenizer(recipe.TOKENIZER), _t5_tokenizer()]
    return Model(family=families.get("flux"), denoiser=parts["transformer"], vae=parts["vae"],
                 text_encoders=[parts["text_encoder"], parts["text_encoder_2"]], tokenizers=tokenizers,
                 scheduler_config=scheduler, name="random-flux-dev", defaults=flux.defaults("dev", scheduler))


def _sharing(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` whose parameters are new Parameter objects over the same tensors: moving
    or casting the copy rebinds its own parameters, never the original's."""
    import copy

    memo = {id(p): torch.nn.Parameter(p.data, requires_grad=False) for p in module.parameters()}
    memo.update({id(b): b for b in module.buffers()})
    return copy.deepcopy(module, memo)


def _t5_tokenizer():
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(str(recipe.T5_TOKENIZER), local_files_only=True)
