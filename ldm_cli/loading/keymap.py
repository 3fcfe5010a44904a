"""Where each diffusers weight lives in the original single-file layout (CompVis / Stability,
as A1111 and ComfyUI read it).

One function per component kind maps a diffusers state-dict key to its `Origin`: the original
key, plus how the stored tensor differs (a third of OpenCLIP's fused q/k/v projection, a
transposed text projection, a 1x1 convolution standing for a linear layer, an MMDiT modulation
stored (shift, scale) where diffusers reads (scale, shift)). Loading walks a
freshly built module's keys and fetches each origin; exporting walks the same keys and writes
each origin. The one mapping serves both directions, so they cannot drift apart. The flow
transformers' own layouts (MMDiT, FLUX.1/.2, Chroma, Z-Image) are mapped in dit_keymap.py.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable

from ldm_cli.loading.dit_keymap import ChromaNames, FluxNames, MMDiTNames, flux2_origin, zimage_origin
from ldm_cli.loading.origin import Origin, unsupported


@dataclass(frozen=True)
class Slot:
    name: str  # diffusers component name: unet, vae, text_encoder, text_encoder_2
    prefix: str  # where the component's keys start in the single file
    # unet, mmdit (SD3's), vae, clip (Hugging Face CLIP names), clip_unprojected (SD3's CLIP-L),
    # openclip (open_clip names), t5 (Hugging Face T5 encoder), zimage (Tongyi's Z-Image), flux2 (BFL's FLUX.2),
    # qwen3 (Hugging Face's Qwen3, as is), qwen25vl (Hugging Face's Qwen2.5-VL text model, as is),
    # (Mistral's names are the same), llm_unnormed (those, cut short without the final norm),
    # qwen_vae (Qwen-Image's VAE in Wan's original names), diffusers (as is)
    kind: str


UNET = Slot("unet", "model.diffusion_model.", "unet")
MMDIT = Slot("transformer", "model.diffusion_model.", "mmdit")
FLUX = Slot("transformer", "model.diffusion_model.", "flux")
CHROMA = Slot("transformer", "model.diffusion_model.", "chroma")
ZIMAGE = Slot("transformer", "model.diffusion_model.", "zimage")
FLUX2 = Slot("transformer", "model.diffusion_model.", "flux2")
QWEN_IMAGE = Slot("transformer", "model.diffusion_model.", "diffusers")  # Qwen's names are diffusers'
VAE = Slot("vae", "first_stage_model.", "vae")
LAYOUTS: dict[str, tuple[Slot, ...]] = {
    "sd1": (UNET, VAE, Slot("text_encoder", "cond_stage_model.transformer.", "clip")),
    "sd2": (UNET, VAE, Slot("text_encoder", "cond_stage_model.model.", "openclip")),
    "sdxl": (UNET, VAE, Slot("text_encoder", "conditioner.embedders.0.transformer.", "clip"),
             Slot("text_encoder_2", "conditioner.embedders.1.model.", "openclip")),
    "sd3": (MMDIT, VAE, Slot("text_encoder", "text_encoders.clip_l.transformer.", "clip_unprojected"),
            Slot("text_encoder_2", "text_encoders.clip_g.transformer.", "clip"),
            Slot("text_encoder_3", "text_encoders.t5xxl.transformer.", "t5")),
    # ComfyUI's all-in-one FLUX files; Black Forest Labs ship the transformer's keys alone
    "flux": (FLUX, Slot("vae", "vae.", "vae"), Slot("text_encoder", "text_encoders.clip_l.transformer.", "clip"),
             Slot("text_encoder_2", "text_encoders.t5xxl.transformer.", "t5")),
    # ComfyUI's all-in-one layout, as FLUX's; lodestones ship the transformer's keys alone
    "chroma": (CHROMA, Slot("vae", "vae.", "vae"), Slot("text_encoder", "text_encoders.t5xxl.transformer.", "t5")),
    # ComfyUI's all-in-one Z-Image files; Tongyi's and ComfyUI's split files hold the transformer
    # alone, with Qwen3 (as Hugging Face names it, under `model.`) and FLUX's VAE beside it
    "zimage": (ZIMAGE, Slot("vae", "vae.", "vae"), Slot("text_encoder", "text_encoders.qwen3_4b.transformer.model.", "qwen3")),
    # FLUX.2 (klein, dev): BFL's and ComfyUI's files hold the transformer alone (bare, or under
    # `model.diffusion_model.`), with Qwen3 and FLUX.2's VAE in files of their own
    "flux2": (FLUX2, Slot("vae", "vae.", "vae"), Slot("text_encoder", "text_encoders.qwen3_4b.transformer.model.", "qwen3")),
    # Qwen's and ComfyUI's files hold the transformer alone, with Qwen2.5-VL (Hugging Face's
    # names under `model.`, its vision tower beside) and the VAE (Wan's names) in files of their own
    "qwen-image": (QWEN_IMAGE, Slot("vae", "vae.", "qwen_vae"),
                   Slot("text_encoder", "text_encoders.qwen25_7b.transformer.model.", "qwen25vl")),
}
TEXT_KINDS = ("clip", "clip_unprojected", "openclip", "t5", "t5_gguf", "qwen3", "qwen3_gguf", "qwen25vl", "qwen25vl_gguf")
# a key every text encoder of the layout has (its width is the last dimension)
TEXT_SIGNATURES = {"clip": "text_model.encoder.layers.0.self_attn.q_proj.weight",
                   "openclip": "transformer.resblocks.0.attn.in_proj_weight",
                   "t5": "encoder.block.0.layer.0.SelfAttention.q.weight",
                   "t5_gguf": "enc.blk.0.attn_q.weight",  # llama.cpp's names (city96's T5 .gguf files)
                   "qwen3": "layers.0.mlp.gate_proj.weight",  # Hugging Face's Qwen3 (Llama-like names)
                   "qwen3_gguf": "blk.0.attn_q_norm.weight",  # llama.cpp's (T5 has no q/k norms)
                   "qwen25vl": "layers.0.self_attn.q_proj.bias",  # Qwen2.5's q/k/v have biases, Qwen3's none
                   "qwen25vl_gguf": "blk.0.attn_q.bias"}  # llama.cpp's (qwen2vl; neither T5 nor Qwen3 has it)


def mapper(kind: str, config: dict) -> Callable[[str], Origin]:
    """diffusers key -> Origin for one component built from `config`."""
    if kind == "unet":
        return UNetNames(config).origin
    if kind == "vae":
        return VaeNames(config).origin
    if kind == "mmdit":
        return MMDiTNames(config).origin
    if kind == "flux":
        return FluxNames(config).origin
    if kind == "chroma":
        return ChromaNames(config).origin
    if kind == "flux2":
        return flux2_origin
    if kind == "qwen_vae":
        return QwenVaeNames(config).origin
    return {"clip": clip_origin, "clip_unprojected": unprojected_clip_origin, "openclip": openclip_origin,
            "t5": t5_origin, "t5_gguf": t5_gguf_origin, "zimage": zimage_origin, "qwen3": Origin,
            "llm_unnormed": unnormed_origin,
            "qwen3_gguf": qwen3_gguf_origin, "qwen25vl": Origin, "qwen25vl_gguf": qwen3_gguf_origin,
            "diffusers": Origin}[kind]


def unnormed_origin(key: str) -> Origin:
    """A language model's names as they are, but for the final norm a cut-short file does not keep."""
    return Origin(key, eye=key == "norm.weight")


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
        if re.fullmatch(r"bn\.(running_mean|running_var|num_batches_tracked)", key):  # FLUX.2's latent statistics
            return key
        raise unsupported("VAE", key)


def clip_origin(key: str) -> Origin:
    """Hugging Face CLIP, saved by an older transformers whose CLIPTextModel nested `text_model`."""
    if key == "text_projection.weight":  # CLIPTextModelWithProjection's, beside text_model
        return Origin(key)
    return Origin("text_model." + key.removeprefix("text_model."))


def unprojected_clip_origin(key: str) -> Origin:
    """SD3's CLIP-L: its pooled output goes in unprojected, whatever projection a file carries."""
    return Origin(key, eye=True) if key == "text_projection.weight" else clip_origin(key)


def t5_origin(key: str) -> Origin:
    """Hugging Face's T5 encoder; its input embedding is `shared` (files often hold only that)."""
    return Origin("shared.weight" if key == "encoder.embed_tokens.weight" else key)


def t5_gguf_origin(key: str) -> Origin:
    """Hugging Face's T5 encoder under llama.cpp's tensor names, as the gguf package maps them
    (its map asked for block 0 and renumbered: one map serves every depth)."""
    module, _, leaf = t5_origin(key).key.rpartition(".")
    block = re.match(r"encoder\.block\.(\d+)\.", module)
    name = _gguf_t5_names().get_name(module.replace(block[0], "encoder.block.0.", 1) if block else module)
    if name is None:
        raise unsupported("T5", key)
    if block:
        name = name.replace("enc.blk.0.", f"enc.blk.{block[1]}.", 1)
    return Origin(f"{name}.{leaf}")


@functools.lru_cache(maxsize=1)
def _gguf_t5_names():
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, 1)


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


QWEN3_GGUF_TOP = {"embed_tokens": "token_embd", "norm": "output_norm"}
QWEN3_GGUF_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                    "self_attn.k_norm": "attn_k_norm", "input_layernorm": "attn_norm",
                    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down"}


def qwen3_gguf_origin(key: str) -> Origin:
    """Hugging Face's Qwen3 (or Qwen2.5-VL's text model: the same names less the q/k norms) under
    llama.cpp's tensor names (its converter keeps Qwen's q/k rows as they are: Qwen's rotary
    embedding is the one llama.cpp calls NEOX)."""
    module, _, leaf = key.rpartition(".")
    if m := re.fullmatch(r"layers\.(\d+)\.(.+)", module):
        if m[2] in QWEN3_GGUF_LAYER:
            return Origin(f"blk.{m[1]}.{QWEN3_GGUF_LAYER[m[2]]}.{leaf}")
    elif module in QWEN3_GGUF_TOP:
        return Origin(f"{QWEN3_GGUF_TOP[module]}.{leaf}")
    raise unsupported("Qwen", key)


# Qwen-Image's VAE as ComfyUI ships it (vae/qwen_image_vae.safetensors): Wan 2.1's original names,
# as diffusers' convert_wan_vae_to_diffusers reads them
QWEN_VAE_TOP = {"encoder.conv_in": "encoder.conv1", "decoder.conv_in": "decoder.conv1",
                "encoder.norm_out": "encoder.head.0", "encoder.conv_out": "encoder.head.2",
                "decoder.norm_out": "decoder.head.0", "decoder.conv_out": "decoder.head.2",
                "quant_conv": "conv1", "post_quant_conv": "conv2"}
QWEN_VAE_RESNET = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
                   "conv_shortcut": "shortcut"}


class QwenVaeNames:
    """Wan's VAE lists each side's blocks flat: the encoder's resnets and downsamplers in one list
    (diffusers keeps it so), the decoder's as num_res_blocks + 1 resnets then an upsampler per level
    (diffusers groups them by level); the mid block is resnet, attention, resnet."""

    def __init__(self, config: dict):
        self.per_level = config["num_res_blocks"] + 2  # the resnets and the upsampler

    def origin(self, key: str) -> Origin:
        module, _, leaf = key.rpartition(".")
        if module in QWEN_VAE_TOP:
            return Origin(f"{QWEN_VAE_TOP[module]}.{leaf}")
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", module):
            at = 2 * int(m[3]) if m[2] == "resnets" else 1
            return Origin(f"{m[1]}.middle.{at}.{self._layer(m[4])}.{leaf}")
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", module):
            return Origin(f"encoder.downsamples.{m[1]}.{self._layer(m[2])}.{leaf}")
        if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", module):
            return Origin(f"decoder.upsamples.{int(m[1]) * self.per_level + int(m[2])}.{self._layer(m[3])}.{leaf}")
        if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", module):
            return Origin(f"decoder.upsamples.{(int(m[1]) + 1) * self.per_level - 1}.{m[2]}.{leaf}")
        raise unsupported("VAE", key)

    @staticmethod
    def _layer(name: str) -> str:
        """A resnet's layers by their place in Wan's Sequential; others (attention, resample) as named."""
        return QWEN_VAE_RESNET.get(name, name)
