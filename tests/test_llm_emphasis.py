"""A1111's emphasis on the LLM text encoders (Qwen3 for Z-Image and FLUX.2 klein, Mistral for
FLUX.2 dev), as Forge Neo weighs it: each weighted token's input embedding times its weight, the
prompt's embeddings scaled back to their mean, the template's own tokens at weight 1. Checked on
what the encoder is given, and on the images: plain prompts keep the pipelines' tokens."""
import numpy as np
import pytest
import torch

from ldm_cli import loading, pipeline
from ldm_cli.families import llm_text
from ldm_cli.settings import Settings
from tests.flow_parity import pixels


@pytest.fixture(scope="module")
def zimage(zimage_turbo_folder):
    return loading.load(str(zimage_turbo_folder))


def given_embeddings(model, monkeypatch, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the input embeddings the encoder was given for `text`, the padding mask)."""
    encoder, seen = model.text_encoders[0], {}
    real = encoder.forward

    def spy(*args, inputs_embeds=None, input_ids=None, **kw):
        seen["embeds"] = inputs_embeds if inputs_embeds is not None else encoder.get_input_embeddings()(input_ids)
        return real(*args, inputs_embeds=inputs_embeds, input_ids=input_ids, **kw)

    monkeypatch.setattr(encoder, "forward", spy)
    _, mask = llm_text.hidden_states(model.tokenizers[0], encoder, [text], 40, (-2,), thinking=True)
    monkeypatch.undo()
    return seen["embeds"][0], mask[0]


def test_a_weight_scales_its_tokens_embedding_and_the_prompt_keeps_its_mean(zimage, monkeypatch):
    """The fragments are tokenized one by one (as Forge does: "a red " and "fox" apart); against
    those tokens' own embeddings, every token is scaled by one common factor and the weighted ones
    by 1.5 times it, and the prompt's mean is kept."""
    tokenizer, encoder = zimage.tokenizers[0], zimage.text_encoders[0]
    text = "a red (fox:1.5) in snow"
    given, mask = given_embeddings(zimage, monkeypatch, text)
    template = llm_text.chat(tokenizer, llm_text.MARK, True)
    ids, weights, count = llm_text.weighted_ids(tokenizer, llm_text.fragments(text), template, 40, "Qwen3")
    assert int(mask.sum()) == count and tokenizer.decode(ids[:count]).count("fox") == 1
    with torch.no_grad():
        own = encoder.get_input_embeddings()(torch.tensor(ids))[:count]
    ratio = (given[:count] / own).mean(-1)
    factor = ratio[torch.tensor(weights[:count]) == 1.0]
    assert torch.allclose(factor, factor[0].expand_as(factor), atol=1e-5) and weights[:count].count(1.5) == 1
    assert torch.isclose(ratio[weights.index(1.5)], 1.5 * factor[0], atol=1e-5)
    assert torch.isclose(given[:count].mean(), own.mean(), atol=1e-6)


def test_weights_of_one_and_escapes_keep_the_pipelines_tokens(zimage, monkeypatch):
    escaped, _ = given_embeddings(zimage, monkeypatch, "a red fox \\(in snow\\)")  # A1111's escapes: text
    literal = zimage.text_encoders[0].get_input_embeddings()(zimage.tokenizers[0](
        [llm_text.chat(zimage.tokenizers[0], "a red fox (in snow)", True)], padding="max_length", max_length=40,
        add_special_tokens=False, return_tensors="pt").input_ids)[0]
    assert torch.equal(escaped, literal)  # the pipeline's tokens of the literal text
    unweighted, _ = given_embeddings(zimage, monkeypatch, "a red fox (in snow:1.0)")
    reference, _ = given_embeddings(zimage, monkeypatch, "a red fox in snow")
    assert torch.equal(unweighted, reference)


def settings(model, **kw) -> Settings:
    base = dict(prompt="a red fox in snow", steps=2, seed=5, width=64, height=64, scheduler="euler")
    return Settings(**{**base, **kw}).resolve(model.defaults, model.native_size)


def test_emphasis_changes_the_image_and_a_batch_mixes_weighted_and_plain_prompts(zimage):
    plain = settings(zimage)
    weighted = settings(zimage, prompt="a red (fox:1.6) in snow")
    alone = [pixels(pipeline.text_to_image(zimage, [s])[0]) for s in (plain, weighted)]
    assert np.abs(alone[0] - alone[1]).max() > 2
    together = pipeline.text_to_image(zimage, [plain, weighted.merged(seed=plain.seed)])
    assert np.abs(pixels(together[0]) - alone[0]).max() <= 2
    assert np.abs(pixels(together[1]) - alone[1]).max() <= 2


def test_flux2_dev_weighs_mistral_after_its_system_turn(flux2_dev_folder):
    model = loading.load(str(flux2_dev_folder))
    tokenizer = model.tokenizers[0]
    template = llm_text.chat(tokenizer, llm_text.MARK, False, "SYS")
    ids, weights, count = llm_text.weighted_ids(tokenizer, llm_text.fragments("a (fox:1.3)"), template, 24, "Mistral")
    assert tokenizer.decode(ids[:count]) == "<s>[SYSTEM_PROMPT]SYS[/SYSTEM_PROMPT][INST]a fox[/INST]"
    assert [w for w in weights[:count] if w != 1.0] == [1.3] and ids[count:] == [11] * (24 - count)
    s = settings(model, max_sequence_length=64)
    images = [pixels(pipeline.text_to_image(model, [s.merged(prompt=p)])[0]) for p in ("a fox", "a (fox:1.3)")]
    assert np.abs(images[0] - images[1]).max() > 2


def test_qwen_image_weighs_qwen25vl_after_its_template_head(qwen_image_folder):
    """The template's 34 head tokens (dropped from the conditioning) stay at weight 1, the prompt's
    weighted fragments follow them, and the weights change the conditioning."""
    from ldm_cli.families import qwen_image

    model = loading.load(str(qwen_image_folder))
    tokenizer = model.tokenizers[0]
    template = qwen_image.TEMPLATE.format(llm_text.MARK)
    ids, weights, count = llm_text.weighted_ids(tokenizer, llm_text.fragments("a (fox:1.3)"), template, 64,
                                                "Qwen2.5-VL", dropped=qwen_image.DROP)
    assert weights[:qwen_image.DROP] == [1.0] * qwen_image.DROP and weights[:count].count(1.3) == 1
    assert tokenizer.decode(ids[qwen_image.DROP:count]).startswith("a fox")
    s = settings(model, cfg=1.0, max_sequence_length=64)
    plain, weighted = (qwen_image.encode(model, [p], s, False) for p in ("a fox", "a (fox:1.3)"))
    assert plain["encoder_hidden_states"].shape == weighted["encoder_hidden_states"].shape == (1, 64, 32)
    assert int(weighted["mask"].sum()) == count - qwen_image.DROP  # the head dropped, the rest kept
    used = weighted["mask"][0]
    assert (weighted["encoder_hidden_states"][0, ~used] == 0).all()  # padding zeros, as the pipeline's
    assert not torch.allclose(plain["encoder_hidden_states"], weighted["encoder_hidden_states"], atol=1e-3)
