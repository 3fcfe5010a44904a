"""The flow transformers' weights in their makers' single-file layouts (Stability's MMDiT, Black
Forest Labs' FLUX.1 and FLUX.2, lodestones' Chroma, Tongyi's Z-Image): diffusers key -> Origin,
one mapping for loading and exporting alike (keymap.py dispatches to them)."""
from __future__ import annotations

import re

from ldm_cli.loading.origin import Origin, unsupported


MMDIT_TOP = {"pos_embed.proj": "x_embedder.proj", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
             "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
             "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
             "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "context_embedder": "context_embedder",
             "norm_out.linear": "final_layer.adaLN_modulation.1", "proj_out": "final_layer.linear"}
# diffusers module in a joint block -> (stream, original module, which third of a fused q/k/v)
MMDIT_BLOCK = {"attn.to_q": ("x", "attn.qkv", 0), "attn.to_k": ("x", "attn.qkv", 1), "attn.to_v": ("x", "attn.qkv", 2),
               "attn.add_q_proj": ("context", "attn.qkv", 0), "attn.add_k_proj": ("context", "attn.qkv", 1),
               "attn.add_v_proj": ("context", "attn.qkv", 2), "attn.norm_q": ("x", "attn.ln_q", None),
               "attn.norm_k": ("x", "attn.ln_k", None), "attn.norm_added_q": ("context", "attn.ln_q", None),
               "attn.norm_added_k": ("context", "attn.ln_k", None), "attn.to_out.0": ("x", "attn.proj", None),
               "attn.to_add_out": ("context", "attn.proj", None), "attn2.to_q": ("x", "attn2.qkv", 0),
               "attn2.to_k": ("x", "attn2.qkv", 1), "attn2.to_v": ("x", "attn2.qkv", 2),
               "attn2.norm_q": ("x", "attn2.ln_q", None), "attn2.norm_k": ("x", "attn2.ln_k", None),
               "attn2.to_out.0": ("x", "attn2.proj", None), "norm1.linear": ("x", "adaLN_modulation.1", None),
               "norm1_context.linear": ("context", "adaLN_modulation.1", None), "ff.net.0.proj": ("x", "mlp.fc1", None),
               "ff.net.2": ("x", "mlp.fc2", None), "ff_context.net.0.proj": ("context", "mlp.fc1", None),
               "ff_context.net.2": ("context", "mlp.fc2", None)}


class MMDiTNames:
    """SD3's MMDiT: each joint block holds an image stream (x_block) and a text stream
    (context_block), each with one fused q/k/v projection. The last block's text stream and the
    final layer modulate with an adaptive norm whose halves the original stores (shift, scale)."""

    def __init__(self, config: dict):
        self.last = config["num_layers"] - 1

    def origin(self, key: str) -> Origin:
        if key == "pos_embed.pos_embed":
            return Origin("pos_embed")
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)", key)
        module, leaf = (m[2], m[3]) if m else key.rpartition(".")[::2]
        if m is None and module in MMDIT_TOP:
            return Origin(f"{MMDIT_TOP[module]}.{leaf}", swap=module == "norm_out.linear")
        if m is None or module not in MMDIT_BLOCK:
            raise unsupported("SD3 transformer", key)
        stream, name, part = MMDIT_BLOCK[module]
        swap = module == "norm1_context.linear" and int(m[1]) == self.last
        return Origin(f"joint_blocks.{m[1]}.{stream}_block.{name}.{leaf}", part=part, swap=swap)


FLUX_TOP = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
            "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
            "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
            "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
            "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
            "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
            "context_embedder": "txt_in", "x_embedder": "img_in", "norm_out.linear": "final_layer.adaLN_modulation.1",
            "proj_out": "final_layer.linear"}
# diffusers module in a double block -> (original module, which third of its fused q/k/v)
FLUX_DOUBLE = {"norm1.linear": ("img_mod.lin", None), "norm1_context.linear": ("txt_mod.lin", None),
               "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
               "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
               "attn.add_v_proj": ("txt_attn.qkv", 2), "attn.norm_q": ("img_attn.norm.query_norm", None),
               "attn.norm_k": ("img_attn.norm.key_norm", None), "attn.norm_added_q": ("txt_attn.norm.query_norm", None),
               "attn.norm_added_k": ("txt_attn.norm.key_norm", None), "attn.to_out.0": ("img_attn.proj", None),
               "attn.to_add_out": ("txt_attn.proj", None), "ff.net.0.proj": ("img_mlp.0", None),
               "ff.net.2": ("img_mlp.2", None), "ff_context.net.0.proj": ("txt_mlp.0", None),
               "ff_context.net.2": ("txt_mlp.2", None)}
# in a single block, linear1 holds q, k, v and the MLP's input projection, one after the other
FLUX_SINGLE = {"norm.linear": ("modulation.lin", None), "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1),
               "attn.to_v": ("linear1", 2), "proj_mlp": ("linear1", 3), "attn.norm_q": ("norm.query_norm", None),
               "attn.norm_k": ("norm.key_norm", None), "proj_out": ("linear2", None)}
FLUX_MLP_RATIO = 4  # FluxSingleTransformerBlock's, fixed in diffusers as in Black Forest Labs' code


class FluxNames:
    """FLUX's transformer as Black Forest Labs ship it: double blocks (an image and a text stream,
    each with one fused q/k/v), single blocks whose linear1 fuses q, k, v and the MLP input (rows
    of the model's own width, read from its config, not assumed), RMS norms stored as `scale`, and
    the final adaptive norm stored (shift, scale)."""

    def __init__(self, config: dict):
        width = config["num_attention_heads"] * config["attention_head_dim"]
        self.single_split = (width, width, width, FLUX_MLP_RATIO * width)

    def origin(self, key: str) -> Origin:
        if m := re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)\.(weight|bias)", key):
            return self._block(m[1] == "single_transformer_blocks", m[2], m[3], m[4], key)
        module, _, leaf = key.rpartition(".")
        if module not in FLUX_TOP:
            raise unsupported("FLUX transformer", key)
        return Origin(f"{FLUX_TOP[module]}.{leaf}", swap=module == "norm_out.linear")

    def _block(self, single: bool, index: str, module: str, leaf: str, key: str) -> Origin:
        table = FLUX_SINGLE if single else FLUX_DOUBLE
        if module not in table:
            raise unsupported("FLUX transformer", key)
        name, part = table[module]
        leaf = "scale" if name.endswith("_norm") else leaf
        split = self.single_split if single and part is not None else None
        return Origin(f"{'single' if single else 'double'}_blocks.{index}.{name}.{leaf}", part=part, split=split)


# the approximator's diffusers modules -> lodestones' (diffusers' convert_chroma_transformer_checkpoint_to_diffusers)
CHROMA_TOP = {"distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
              "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj",
              "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"}
CHROMA_APPROXIMATOR = {"linear_1": "in_layer", "linear_2": "out_layer"}


class ChromaNames(FluxNames):
    """Chroma's transformer as lodestones ship it: FLUX's blocks less their modulation layers
    (never asked for: diffusers' Chroma blocks have none), and the approximator, whose RMS norms
    are stored as `scale`."""

    def origin(self, key: str) -> Origin:
        if m := re.fullmatch(r"distilled_guidance_layer\.(layers|norms)\.(\d+)\.(?:(linear_[12])\.)?(weight|bias)", key):
            if m[1] == "norms":
                return Origin(f"distilled_guidance_layer.norms.{m[2]}.scale")
            if m[3]:
                return Origin(f"distilled_guidance_layer.layers.{m[2]}.{CHROMA_APPROXIMATOR[m[3]]}.{m[4]}")
        if key.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            return super().origin(key)
        module, _, leaf = key.rpartition(".")
        if module not in CHROMA_TOP:
            raise unsupported("Chroma transformer", key)
        return Origin(f"{CHROMA_TOP[module]}.{leaf}")


# FLUX.2's diffusers modules -> Black Forest Labs' (diffusers' convert_flux2_transformer_checkpoint_to_diffusers)
FLUX2_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in",
             "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",  # dev's
             "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
             "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
             "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
             "single_stream_modulation.linear": "single_stream_modulation.lin",
             "norm_out.linear": "final_layer.adaLN_modulation.1", "proj_out": "final_layer.linear"}
FLUX2_DOUBLE = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
                "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
                "attn.add_v_proj": ("txt_attn.qkv", 2), "attn.norm_q": ("img_attn.norm.query_norm", None),
                "attn.norm_k": ("img_attn.norm.key_norm", None),
                "attn.norm_added_q": ("txt_attn.norm.query_norm", None),
                "attn.norm_added_k": ("txt_attn.norm.key_norm", None), "attn.to_out.0": ("img_attn.proj", None),
                "attn.to_add_out": ("txt_attn.proj", None), "ff.linear_in": ("img_mlp.0", None),
                "ff.linear_out": ("img_mlp.2", None), "ff_context.linear_in": ("txt_mlp.0", None),
                "ff_context.linear_out": ("txt_mlp.2", None)}
FLUX2_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2", "attn.norm_q": "norm.query_norm",
                "attn.norm_k": "norm.key_norm"}


def flux2_origin(key: str) -> Origin:
    """FLUX.2's transformer as Black Forest Labs ship it: FLUX.1's double blocks less their own
    modulations (three shared ones instead), single blocks whose linear1 is diffusers' fused
    q/k/v/MLP projection as it is, RMS norms stored as `scale`, the final adaptive norm stored
    (shift, scale); no biases."""
    module, _, leaf = key.rpartition(".")
    if m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module):
        if m[2] not in FLUX2_DOUBLE:
            raise unsupported("FLUX.2 transformer", key)
        name, part = FLUX2_DOUBLE[m[2]]
        return Origin(f"double_blocks.{m[1]}.{name}.{'scale' if name.endswith('_norm') else leaf}", part=part)
    if m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", module):
        if m[2] not in FLUX2_SINGLE:
            raise unsupported("FLUX.2 transformer", key)
        name = FLUX2_SINGLE[m[2]]
        return Origin(f"single_blocks.{m[1]}.{name}.{'scale' if name.endswith('_norm') else leaf}")
    if module not in FLUX2_TOP:
        raise unsupported("FLUX.2 transformer", key)
    return Origin(f"{FLUX2_TOP[module]}.{leaf}", swap=module == "norm_out.linear")


ZIMAGE_TOP = {"all_x_embedder.2-1.": "x_embedder.", "all_final_layer.2-1.": "final_layer."}
ZIMAGE_ATTENTION = {"to_q.weight": ("qkv.weight", 0), "to_k.weight": ("qkv.weight", 1),
                    "to_v.weight": ("qkv.weight", 2), "to_out.0.weight": ("out.weight", None),
                    "norm_q.weight": ("q_norm.weight", None), "norm_k.weight": ("k_norm.weight", None)}


def zimage_origin(key: str) -> Origin:
    """Z-Image's transformer as Tongyi ship it (diffusers' convert_z_image_transformer_checkpoint_to_diffusers
    the other way): one fused q/k/v of three equal parts, `out` and `q_norm`/`k_norm` for diffusers'
    `to_out.0` and `norm_q`/`norm_k`, the 2x2 patch's embedder and final layer without their
    patch-size key; every other name as diffusers has it."""
    for new, old in ZIMAGE_TOP.items():
        if key.startswith(new):
            return Origin(old + key[len(new):])
    block, found, leaf = key.partition(".attention.")
    if found and leaf in ZIMAGE_ATTENTION:
        name, part = ZIMAGE_ATTENTION[leaf]
        return Origin(f"{block}.attention.{name}", part=part)
    return Origin(key)
