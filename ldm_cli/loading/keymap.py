"""Where each diffusers weight lives in the original single-file layout (CompVis / Stability,
as A1111 and ComfyUI read it).

One function per component kind maps a diffusers state-dict key to its `Origin`: the original
key, plus how the stored tensor differs (a third of OpenCLIP's fused q/k/v projection, a
transposed text projection, a 1x1 convolution standing for a linear layer). Loading walks a
freshly built module's keys and fetches each origin; exporting walks the same keys and writes
each origin. The one mapping serves both directions, so they cannot drift apart.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, NamedTuple

from ldm_cli.errors import LdmError


class Origin(NamedTuple):
    key: str  # without the component prefix
    part: int | None = None  # which third of a fused q/k/v tensor (rows)
    transpose: bool = False  # stored as x @ W rather than a Linear's W
    conv: bool = False  # stored as a 1x1 convolution kernel


@dataclass(frozen=True)
class Slot:
    name: str  # diffusers component name: unet, vae, text_encoder, text_encoder_2
    prefix: str  # where the component's keys start in the single file
    kind: str  # unet, vae, clip (Hugging Face CLIP names), openclip (open_clip names), diffusers (as is)


UNET = Slot("unet", "model.diffusion_model.", "unet")
VAE = Slot("vae", "first_stage_model.", "vae")
LAYOUTS: dict[str, tuple[Slot, ...]] = {
    "sd1": (UNET, VAE, Slot("text_encoder", "cond_stage_model.transformer.", "clip")),
    "sd2": (UNET, VAE, Slot("text_encoder", "cond_stage_model.model.", "openclip")),
    "sdxl": (UNET, VAE, Slot("text_encoder", "conditioner.embedders.0.transformer.", "clip"),
             Slot("text_encoder_2", "conditioner.embedders.1.model.", "openclip")),
}


def mapper(kind: str, config: dict) -> Callable[[str], Origin]:
    """diffusers key -> Origin for one component built from `config`."""
    if kind == "unet":
        return UNetNames(config).origin
    if kind == "vae":
        return VaeNames(config).origin
    return {"clip": clip_origin, "openclip": openclip_origin, "diffusers": Origin}[kind]


def unsupported(what: str, key: str) -> LdmError:
    return LdmError(f"ldm cannot place the {what} weight {key!r} in the original layout; this architecture is not supported")


UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


class UNetNames:
    """The original UNet numbers its blocks flat: input_blocks.N holds a resnet (.0) and maybe a
    transformer (.1); a downsampler takes an input block of its own. Each output level holds one
    resnet more and carries its upsampler in its last block, after the transformer if any."""

    def __init__(self, config: dict):
        n = len(config["block_out_channels"])
        layers = config["layers_per_block"]
        self.layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * n
        self.up_has_attention = ["CrossAttn" in t for t in config["up_block_types"]]

    def down(self, block: int, j: int) -> int:
        return 1 + sum(n + 1 for n in self.layers[:block]) + j

    def up(self, block: int, j: int) -> int:
        return sum(n + 1 for n in self.layers[::-1][:block]) + j

    def origin(self, key: str) -> Origin:
        try:
            return Origin(self._name(key))
        except KeyError:
            raise unsupported("UNet", key) from None

    def _name(self, key: str) -> str:
        if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key):
            return self._level(m[1], int(m[2]), m[3], int(m[4]), m[5])
        if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
            at = 2 * int(m[2]) if m[1] == "resnets" else 1
            return f"middle_block.{at}.{self._inner(m[1], m[3])}"
        module, _, leaf = key.rpartition(".")
        return f"{UNET_TOP[module]}.{leaf}"

    def _level(self, side: str, block: int, kind: str, j: int, rest: str) -> str:
        if kind == "downsamplers":
            return f"input_blocks.{self.down(block, self.layers[block])}.0.op.{rest.removeprefix('conv.')}"
        if kind == "upsamplers":
            at = self.up(block, self.layers[::-1][block])
            return f"output_blocks.{at}.{2 if self.up_has_attention[block] else 1}.{rest}"
        at = self.down(block, j) if side == "down" else self.up(block, j)
        return f"{'input' if side == 'down' else 'output'}_blocks.{at}.{int(kind == 'attentions')}.{self._inner(kind, rest)}"

    @staticmethod
    def _inner(kind: str, rest: str) -> str:
        """Transformer internals keep their names; resnet layers are renamed."""
        if kind == "attentions":
            return rest
        name, _, leaf = rest.partition(".")
        return f"{UNET_RESNET[name]}.{leaf}"


VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class VaeNames:
    """The original VAE numbers decoder levels from the bottom (up.0 runs last), names its two
    mid resnets block_1 and block_2, and stores its attention projections as 1x1 convolutions."""

    def __init__(self, config: dict):
        self.levels = len(config["block_out_channels"])

    def origin(self, key: str) -> Origin:
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+(?:\.0)?)\.(weight|bias)", key):
            if m[2] not in VAE_ATTENTION:
                raise unsupported("VAE", key)
            name = VAE_ATTENTION[m[2]]
            return Origin(f"{m[1]}.mid.attn_1.{name}.{m[3]}", conv=m[3] == "weight" and name != "norm")
        return Origin(self._name(key).replace("conv_shortcut", "nin_shortcut"))

    def _name(self, key: str) -> str:
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(.+)", key):
            return f"encoder.down.{m[1]}.block.{m[2]}"
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
            return f"encoder.down.{m[1]}.downsample.{m[2]}"
        if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(.+)", key):
            return f"decoder.up.{self.levels - 1 - int(m[1])}.block.{m[2]}"
        if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
            return f"decoder.up.{self.levels - 1 - int(m[1])}.upsample.{m[2]}"
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(\w+)", key):
            return f"{m[1]}.norm_out.{m[2]}"
        if re.fullmatch(r"((encoder|decoder)\.)?(conv_in|conv_out|quant_conv|post_quant_conv)\.(weight|bias)", key):
            return key
        raise unsupported("VAE", key)


def clip_origin(key: str) -> Origin:
    """Hugging Face CLIP, saved by an older transformers whose CLIPTextModel nested `text_model`."""
    return Origin("text_model." + key.removeprefix("text_model."))


OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                "embeddings.position_embedding.weight": "positional_embedding",
                "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                  "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def openclip_origin(key: str) -> Origin:
    """open_clip's text tower: one fused in_proj for q, k and v; the projection applied as x @ P."""
    key = key.removeprefix("text_model.")
    if key == "text_projection.weight":
        return Origin("text_projection", transpose=True)
    if key in OPENCLIP_TOP:
        return Origin(OPENCLIP_TOP[key])
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if m is None:
        raise unsupported("text encoder", key)
    block, module, leaf = f"transformer.resblocks.{m[1]}", m[2], m[3]
    if qkv := re.fullmatch(r"self_attn\.([qkv])_proj", module):
        return Origin(f"{block}.attn.in_proj_{leaf}", part="qkv".index(qkv[1]))
    if module not in OPENCLIP_LAYER:
        raise unsupported("text encoder", key)
    return Origin(f"{block}.{OPENCLIP_LAYER[module]}.{leaf}")
