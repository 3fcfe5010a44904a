"""LoRA files merged into tiny models: equal to diffusers' load_lora_weights + fuse_lora where
diffusers reads the format, equal to the formulas (LoCon, Tucker, LoHa, LoKr, fused q/k/v) where
it does not, restored exactly, and refused when made for another model."""
import re

import pytest
import torch

from ldm_cli import loading
from ldm_cli.errors import LdmError
from ldm_cli.loading import keymap
from ldm_cli.networks import formats, merge, targets
from tests import lora_files

ATTENTION = ("attn1.to_q", "attn1.to_out.0", "attn2.to_k", "attn2.to_v", "proj_in")
CONVS = ("resnets.0.conv1", "conv_shortcut", "downsamplers.0.conv")
TEXT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1")


def load(folder, dtype="fp32"):
    return loading.load(str(folder), loading.LoadOptions(device="cpu", dtype=dtype))


def merged(model, path, te=1.0, unet=1.0) -> merge.Merger:
    lora = formats.open_lora(path, False)
    components = targets.components(model)
    merger = merge.Merger()
    merger.merge(components, merge.plan(components, targets.table(model), [merge.Applied(lora, te, unet)]))
    return merger


def reference(pipeline_class, folder, path, scale):
    pipe = pipeline_class.from_pretrained(str(folder))
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the adapters
    return pipe


def assert_same(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def changed_weights(model, before: dict) -> int:
    after = {k: v for c in targets.components(model).values() for k, v in c.state_dict().items()}
    return sum(not torch.equal(before[k], after[k]) for k in before)


def snapshot(model) -> dict:
    return {k: v.clone() for c in targets.components(model).values() for k, v in c.state_dict().items()}


def test_kohya_sd1_equals_diffusers(sd1_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    model = load(sd1_folder)
    unet = lora_files.kohya(lora_files.layers(model.denoiser, ATTENTION + CONVS), "lora_unet_", alpha=2)
    text = lora_files.kohya(lora_files.layers(model.text_encoders[0], TEXT), "lora_te_", alpha=8,
                            spelled=lambda n: "text_model." + n)  # transformers 5's CLIPTextModel has no text_model
    path = lora_files.write(tmp_path / "fox.safetensors", {**unet, **text})
    before = snapshot(model)
    merged(model, path, 0.7, 0.7)
    pipe = reference(StableDiffusionPipeline, sd1_folder, path, 0.7)
    assert changed_weights(model, before) == (len(unet) + len(text)) // 3
    assert_same(model.denoiser, pipe.unet)
    assert_same(model.text_encoders[0], pipe.text_encoder)


def test_peft_sd1_equals_diffusers(sd1_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    model = load(sd1_folder)
    unet = lora_files.peft(lora_files.layers(model.denoiser, ATTENTION), "unet")
    text = lora_files.peft(lora_files.layers(model.text_encoders[0], TEXT), "text_encoder",
                           spelled=lambda n: "text_model." + n)
    path = lora_files.write(tmp_path / "peft.safetensors", {**unet, **text})
    merged(model, path, 0.5, 0.5)
    pipe = reference(StableDiffusionPipeline, sd1_folder, path, 0.5)
    assert_same(model.denoiser, pipe.unet)
    assert_same(model.text_encoders[0], pipe.text_encoder)


def test_kohya_sdxl_with_original_block_names_equals_diffusers(sdxl_folder, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    model = load(sdxl_folder)
    names = keymap.UNetNames(dict(model.denoiser.config))
    original = lambda n: names.origin(n + ".weight").key.removesuffix(".weight")  # input_blocks_4_1_...
    unet = lora_files.kohya(lora_files.layers(model.denoiser, ATTENTION + CONVS), "lora_unet_", alpha=1,
                            spelled=original)
    assert any("input_blocks" in k for k in unet) and not any("down_blocks" in k for k in unet)
    te1 = lora_files.kohya(lora_files.layers(model.text_encoders[0], TEXT), "lora_te1_", alpha=2,
                           spelled=lambda n: "text_model." + n, seed=1)
    te2 = lora_files.kohya(lora_files.layers(model.text_encoders[1], TEXT), "lora_te2_", alpha=2, seed=2)
    path = lora_files.write(tmp_path / "xl.safetensors", {**unet, **te1, **te2})
    merged(model, path, 0.8, 0.8)
    pipe = reference(StableDiffusionXLPipeline, sdxl_folder, path, 0.8)
    assert_same(model.denoiser, pipe.unet)
    assert_same(model.text_encoders[0], pipe.text_encoder)
    assert_same(model.text_encoders[1], pipe.text_encoder_2)


def test_text_encoder_qkv_merge_without_out_proj(sd1_folder, tmp_path):
    """diffusers drops a text encoder's q/k/v when the file has no out_proj; ldm applies them."""
    model = load(sd1_folder)
    chosen = lora_files.layers(model.text_encoders[0], ("self_attn.q_proj",))
    path = lora_files.write(tmp_path / "q.safetensors",
                            lora_files.kohya(chosen, "lora_te_", alpha=4, spelled=lambda n: "text_model." + n))
    weight = model.text_encoders[0].get_submodule(chosen[0][0]).weight
    before = weight.clone()
    merged(model, path, te=0.5, unet=2.0)
    tensors = formats.open_lora(path, False)
    key = "lora_te_text_model_" + chosen[0][0].replace(".", "_")
    expected = before + 0.5 * (4 / 4) * tensors.read(key + ".lora_up.weight") @ tensors.read(key + ".lora_down.weight")
    assert torch.allclose(weight, expected, atol=1e-6)


def conv_layer(model):
    return next((n, m) for n, m in model.denoiser.named_modules() if n.endswith("resnets.0.conv1"))


def test_locon_tucker_mid_acts_as_down_mid_up_convolutions(sd1_folder, tmp_path):
    model = load(sd1_folder)
    name, conv = conv_layer(model)
    g = torch.Generator().manual_seed(3)
    down = 0.1 * torch.randn(4, conv.in_channels, 1, 1, generator=g)
    mid = 0.1 * torch.randn(4, 4, 3, 3, generator=g)
    up = 0.1 * torch.randn(conv.out_channels, 4, 1, 1, generator=g)
    key = "lora_unet_" + name.replace(".", "_")
    path = lora_files.write(tmp_path / "cp.safetensors", {f"{key}.lora_down.weight": down, f"{key}.lora_mid.weight": mid,
                                                          f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)})
    x = torch.randn(1, conv.in_channels, 6, 6, generator=g)
    with torch.no_grad():
        plain = conv(x)
        merged(model, path, unet=0.6)
        lora = torch.nn.functional.conv2d(torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down), mid, padding=1), up)
        assert torch.allclose(conv(x), plain + 0.6 * 2 / 4 * lora, atol=1e-5)


def test_loha_and_lokr_follow_their_formulas(sd1_folder, tmp_path):
    model = load(sd1_folder)
    (lname, linear), (cname, conv) = lora_files.layers(model.denoiser, ("attn1.to_q",))[0], conv_layer(model)
    g = torch.Generator().manual_seed(4)
    r = lambda *s: 0.1 * torch.randn(*s, generator=g)
    lk, ck = "lora_unet_" + lname.replace(".", "_"), "lora_unet_" + cname.replace(".", "_")
    out, inp = linear.weight.shape
    loha = {f"{lk}.hada_w1_a": r(out, 2), f"{lk}.hada_w1_b": r(2, inp), f"{lk}.hada_w2_a": r(out, 2),
            f"{lk}.hada_w2_b": r(2, inp), f"{lk}.alpha": torch.tensor(1.0)}
    co, ci = conv.out_channels, conv.in_channels
    lokr = {f"{ck}.lokr_w1": r(2, 2), f"{ck}.lokr_w2_a": r(co // 2, 3), f"{ck}.lokr_w2_b": r(3, ci // 2 * 9),
            f"{ck}.alpha": torch.tensor(6.0)}
    path = lora_files.write(tmp_path / "lyco.safetensors", {**loha, **lokr})
    w_lin, w_conv = linear.weight.clone(), conv.weight.clone()
    merged(model, path, unet=0.5)
    hada = (loha[f"{lk}.hada_w1_a"] @ loha[f"{lk}.hada_w1_b"]) * (loha[f"{lk}.hada_w2_a"] @ loha[f"{lk}.hada_w2_b"])
    assert torch.allclose(linear.weight, w_lin + 0.5 * (1 / 2) * hada, atol=1e-6)
    w2 = (lokr[f"{ck}.lokr_w2_a"] @ lokr[f"{ck}.lokr_w2_b"]).reshape(co // 2, ci // 2, 3, 3)
    delta = conv.weight - w_conv  # block (i, j) of a Kronecker product is w1[i, j] * w2
    for i in range(2):
        for j in range(2):
            block = delta[i * co // 2:(i + 1) * co // 2, j * ci // 2:(j + 1) * ci // 2]
            assert torch.allclose(block, 0.5 * (6 / 3) * lokr[f"{ck}.lokr_w1"][i, j] * w2, atol=1e-6)


def test_restore_is_exact_in_fp16_and_sets_sum(sd1_folder, tmp_path):
    model = load(sd1_folder, "fp16")
    chosen = lora_files.layers(model.denoiser, ATTENTION + CONVS)
    chosen.sort(key=lambda item: not isinstance(item[1], torch.nn.Linear))  # a linear layer first
    a = lora_files.write(tmp_path / "a.safetensors", lora_files.kohya(chosen, "lora_unet_", seed=1))
    b = lora_files.write(tmp_path / "b.safetensors", lora_files.kohya(chosen[:3], "lora_unet_", seed=2))
    before = snapshot(model)
    components, table = targets.components(model), targets.table(model)
    applied = [merge.Applied(formats.open_lora(p, False), 1.0, w) for p, w in ((a, 0.8), (b, -1.5))]
    merger = merge.Merger()
    merger.merge(components, merge.plan(components, table, applied))
    weight = model.denoiser.get_submodule(chosen[0][0]).weight
    lora_a, lora_b = (x.lora for x in applied)
    key = "lora_unet_" + chosen[0][0].replace(".", "_")
    delta = lambda f: f.read(key + ".lora_up.weight").float() @ f.read(key + ".lora_down.weight").float()
    summed = before[f"{chosen[0][0]}.weight"].float() + 0.8 * delta(lora_a) - 1.5 * delta(lora_b)
    assert torch.equal(weight, summed.half())  # summed in fp32, cast once
    merger.restore()
    assert all(torch.equal(v, snapshot(model)[k]) for k, v in before.items())


def test_sd3_peft_and_fused_qkv_names(tmp_path):
    from ldm_cli import families
    from ldm_cli.model import Model
    from tests import tiny_models

    transformer, reference = tiny_models.sd3_transformer(), tiny_models.sd3_transformer()
    model = Model(families.get("sd3"), transformer, None, [], [], {}, "tiny-sd3")
    chosen = lora_files.layers(transformer, ("attn.to_q", "attn.to_k", "attn.add_v_proj", "ff.net.2"))
    state = lora_files.peft(chosen, "transformer")
    before = snapshot(model)
    merger = merged(model, lora_files.write(tmp_path / "sd3.safetensors", state), unet=0.9)
    reference.load_lora_adapter(dict(state), prefix="transformer")
    reference.fuse_lora(lora_scale=0.9)
    reference.unload_lora()
    assert_same(transformer, reference)
    merger.restore()
    # kohya's SD3 names: the original layout's fused q/k/v, one delta split in three
    q = transformer.transformer_blocks[0].attn.to_q
    key = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    fused = {f"{key}.lora_down.weight": torch.randn(4, q.in_features),
             f"{key}.lora_up.weight": torch.randn(3 * q.out_features, 4)}
    merged(model, lora_files.write(tmp_path / "qkv.safetensors", fused))
    delta = fused[f"{key}.lora_up.weight"] @ fused[f"{key}.lora_down.weight"]
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        weight = f"transformer_blocks.0.attn.{name}.weight"
        rows = delta[i * q.out_features:(i + 1) * q.out_features]
        assert torch.allclose(transformer.state_dict()[weight], before[weight] + rows, atol=1e-5)
    fused[f"{key}.lora_up.weight"] = torch.randn(3 * q.out_features + 1, 4)  # one row more than q, k and v have
    with pytest.raises(LdmError, match=f"its layer {key} changes a \\[{3 * q.out_features + 1}, {q.in_features}\\] weight"):
        merged(model, lora_files.write(tmp_path / "crafted.safetensors", fused))


def test_flux_kohya_fused_linear1_split_in_unequal_parts(tmp_path):
    from ldm_cli import families
    from ldm_cli.model import Model
    from tests import tiny_models

    transformer = tiny_models.flux_transformer()
    model = Model(families.get("flux"), transformer, None, [], [], {}, "tiny-flux")
    block = transformer.single_transformer_blocks[0]
    parts = [block.attn.to_q, block.attn.to_k, block.attn.to_v, block.proj_mlp]  # q, k, v, then the MLP's input
    key = "lora_unet_single_blocks_0_linear1"
    fused = {f"{key}.lora_down.weight": torch.randn(4, block.attn.to_q.in_features),
             f"{key}.lora_up.weight": torch.randn(sum(p.out_features for p in parts), 4)}
    before = [p.weight.clone() for p in parts]
    merged(model, lora_files.write(tmp_path / "flux.safetensors", fused), unet=0.5)
    rows = (0.5 * fused[f"{key}.lora_up.weight"] @ fused[f"{key}.lora_down.weight"]).split([p.out_features for p in parts])
    for part, old, delta in zip(parts, before, rows):
        assert torch.allclose(part.weight, old + delta, atol=1e-5)


def test_a_lora_for_another_family_is_refused_before_any_change(sd1_folder, tmp_path):
    from tests import tiny_models

    xl_unet, xl_te2 = tiny_models.unet(64, sdxl=True), tiny_models.text_encoder("gelu", True, seed=4, width=48)
    names = keymap.UNetNames(dict(xl_unet.config))
    unet = lora_files.kohya(lora_files.layers(xl_unet, ("attn2.to_k",)), "lora_unet_",
                            spelled=lambda n: names.origin(n + ".weight").key.removesuffix(".weight"))
    path = lora_files.write(tmp_path / "xl.safetensors", unet)
    model = load(sd1_folder)
    before = snapshot(model)
    with pytest.raises(LdmError, match="made for another model family"):
        merged(model, path)
    only_te2 = lora_files.write(tmp_path / "te2.safetensors", lora_files.kohya(
        lora_files.layers(xl_te2, ("q_proj",)), "lora_te2_"))
    with pytest.raises(LdmError, match="none of its 2 layers"):
        merged(model, only_te2)
    assert changed_weights(model, before) == 0


def test_what_is_not_a_lora(tmp_path):
    path = lora_files.write(tmp_path / "emb.safetensors", {"emb_params": torch.zeros(2, 8)})
    with pytest.raises(LdmError, match="is not a LoRA"):
        formats.peek(path, False)
    dora = {"lora_unet_x.lora_down.weight": torch.zeros(1, 2), "lora_unet_x.lora_up.weight": torch.zeros(2, 1),
            "lora_unet_x.dora_scale": torch.zeros(2, 1)}
    with pytest.raises(LdmError, match="DoRA"):
        formats.peek(lora_files.write(tmp_path / "dora.safetensors", dora), False)
    (tmp_path / "notes.txt").write_text("hello there, not a tensor file")
    with pytest.raises(LdmError, match="not a LoRA"):
        formats.peek(tmp_path / "notes.txt", False)
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, tmp_path / "old.pt")
    with pytest.raises(LdmError, match="--allow-pickle"):
        formats.peek(tmp_path / "old.pt", False)


def test_key_spellings_read_as_kohya_names():
    split = formats.split_key
    assert split("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight") == \
        ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_down.weight")
    assert split("unet.down_blocks.0.attentions.0.proj_in.lora.up.weight") == \
        ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_up.weight")
    assert split("text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight") == \
        ("lora_te2_text_model_encoder_layers_0_mlp_fc1", "lora_down.weight")
    assert split("unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight") == \
        ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0", "lora_up.weight")
    assert split("lora_transformer_single_transformer_blocks_0_attn_to_q.lora_A.weight") == \
        ("lora_unet_single_transformer_blocks_0_attn_to_q", "lora_down.weight")
    assert split("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight") == \
        ("lora_unet_single_transformer_blocks_0_attn_to_q", "lora_down.weight")
    assert split("emb_params") is None


K = "lora_unet_x"


def _f(*shape, dtype=torch.float32):
    return torch.ones(shape, dtype=dtype)


@pytest.mark.parametrize("tensors, words", [
    ({f"{K}.lora_down.weight": _f(4, 8), f"{K}.lora_up.weight": _f(8, 3)}, "lora_up.weight has rank 3 where lora_down.weight has 4"),
    ({f"{K}.lora_down.weight": _f(0, 8), f"{K}.lora_up.weight": _f(8, 0)}, "lora_down.weight is [0, 8]"),
    ({f"{K}.lora_down.weight": _f(32), f"{K}.lora_up.weight": _f(8, 4)}, "lora_down.weight is [32]: a factor is a matrix"),
    ({f"{K}.lora_down.weight": _f(4, 8), f"{K}.lora_up.weight": torch.tensor(1.0)}, "lora_up.weight is []"),
    ({f"{K}.lora_down.weight": _f(4, 8), f"{K}.lora_up.weight": _f(8, 4, 3, 3)},
     "lora_up.weight is [8, 4, 3, 3]: up is a matrix or a 1x1 kernel"),
    ({f"{K}.lora_down.weight": _f(4, 8), f"{K}.lora_up.weight": _f(8, 4), f"{K}.lora_mid.weight": _f(4, 2, 3, 3)},
     "lora_down.weight has rank 4 where lora_mid.weight has 2"),
    ({f"{K}.lora_down.weight": _f(4, 8), f"{K}.lora_up.weight": _f(8, 4), f"{K}.alpha": _f(3)}, "alpha is [3], not one number"),
    ({f"{K}.lora_down.weight": _f(4, 8, dtype=torch.int32), f"{K}.lora_up.weight": _f(8, 4)},
     "lora_down.weight holds I32 values, not floating-point numbers"),
    ({f"{K}.lora_down.weight": _f(4, 8), f"{K}.lora_up.weight": _f(8, 4, dtype=torch.bool)}, "lora_up.weight holds BOOL"),
    ({f"{K}.hada_w1_a": _f(8, 4), f"{K}.hada_w1_b": _f(4, 8), f"{K}.hada_w2_a": _f(8, 2), f"{K}.hada_w2_b": _f(4, 8)},
     "hada_w2_a has rank 2 where hada_w2_b has 4"),
    ({f"{K}.hada_w1_a": _f(8, 4), f"{K}.hada_w1_b": _f(4, 8), f"{K}.hada_w2_a": _f(6, 4), f"{K}.hada_w2_b": _f(4, 8)},
     "hada_w2_a makes a [6, 8] product where the first pair makes [8, 8]"),
    ({f"{K}.lokr_w1": _f(2, 2), f"{K}.lokr_w2_a": _f(4, 3), f"{K}.lokr_w2_b": _f(2, 4)}, "lokr_w2_a has rank 3 where lokr_w2_b has 2"),
    ({f"{K}.lokr_w1": _f(2, 2, 1, 1), f"{K}.lokr_w2": _f(4, 4)}, "lokr_w1 makes [2, 2, 1, 1]: w1 is a matrix"),
])
def test_crafted_factors_are_one_error_naming_the_file_and_key(tmp_path, tensors, words):
    """From the header alone, before any model loads; a pickle's the same once read."""
    path = lora_files.write(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(LdmError, match=r"^bad.safetensors is not a usable LoRA: lora_unet_x\." + re.escape(words)):
        formats.peek(path, False)
    torch.save(tensors, tmp_path / "bad.pt")
    with pytest.raises(LdmError, match=re.escape(words)):
        formats.open_lora(tmp_path / "bad.pt", True)


def test_empty_and_foreign_files_are_not_loras(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "text.safetensors").write_bytes(b"hello world, not tensors at all")
    for name in ("empty", "text"):
        with pytest.raises(LdmError, match=f"^{name}.safetensors is neither a safetensors file nor a PyTorch file"):
            formats.peek(tmp_path / f"{name}.safetensors", False)


def test_chroma_peft_names_equal_diffusers_and_kohya_names_reach_fused_layers(tmp_path):
    """Chroma takes FLUX's LoRA names: diffusers' (fused into the same weights as diffusers'
    own loader fuses them) and kohya's original-layout ones, the approximator's included."""
    from ldm_cli import families
    from ldm_cli.model import Model
    from tests import tiny_models

    transformer, reference = tiny_models.chroma_transformer(), tiny_models.chroma_transformer()
    model = Model(families.get("chroma"), transformer, None, [], [], {}, "tiny-chroma")
    chosen = lora_files.layers(transformer, ("attn.to_q", "attn.add_v_proj", "proj_mlp", "linear_1"))
    state = lora_files.peft(chosen, "transformer")
    before = snapshot(model)
    merger = merged(model, lora_files.write(tmp_path / "chroma.safetensors", state), unet=0.7)
    reference.load_lora_adapter(dict(state), prefix="transformer")
    reference.fuse_lora(lora_scale=0.7)
    reference.unload_lora()
    assert_same(transformer, reference)
    merger.restore()
    layer = transformer.distilled_guidance_layer.layers[1].linear_2
    names = ("lora_unet_double_blocks_0_txt_attn_qkv", "lora_unet_distilled_guidance_layer_layers_1_out_layer")
    kohya = {f"{names[0]}.lora_down.weight": torch.randn(4, 32), f"{names[0]}.lora_up.weight": torch.randn(96, 4),
             f"{names[1]}.lora_down.weight": torch.randn(4, 32), f"{names[1]}.lora_up.weight": torch.randn(32, 4)}
    merged(model, lora_files.write(tmp_path / "kohya.safetensors", kohya))
    delta = [kohya[f"{n}.lora_up.weight"] @ kohya[f"{n}.lora_down.weight"] for n in names]
    for i, name in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
        weight = f"transformer_blocks.0.attn.{name}.weight"
        assert torch.allclose(transformer.state_dict()[weight], before[weight] + delta[0][32 * i:32 * (i + 1)], atol=1e-5)
    assert torch.allclose(layer.weight, before["distilled_guidance_layer.layers.1.linear_2.weight"] + delta[1], atol=1e-5)
