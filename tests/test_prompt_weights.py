"""A1111's CLIP reading of prompts (families/clip_text.py) against a reference written here from
A1111's description: 75-token chunks with comma backtracking and BREAK, each chunk framed and
encoded alone, each token's state times its weight, the batch's mean restored."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ldm_cli.families import clip_text, sd, sdxl, t5
from ldm_cli.prompt_syntax import emphasis
from ldm_cli.settings import Settings
from tests import tiny_models

LONG = ", ".join(f"a red fox number {i} in deep snow" for i in range(12))  # ~100 tokens, commas throughout


def trained_looking(encoder):
    """A random encoder's final layer norm has no bias, so its states average to about zero and
    A1111's mean restoration divides by noise; a trained one's do not."""
    norm = getattr(encoder, "text_model", encoder).final_layer_norm
    with torch.no_grad():
        norm.bias.add_(torch.linspace(-0.2, 0.6, norm.bias.numel()))
    return encoder


@pytest.fixture(scope="module")
def clip():
    return trained_looking(tiny_models.text_encoder()), tiny_models.tokenizer()


@pytest.fixture(scope="module")
def openclip():
    return trained_looking(tiny_models.text_encoder("gelu", projection=True, seed=4)), tiny_models.tokenizer(openclip=True)


# -- the reference ----------------------------------------------------------------------------
def reference_chunks(tokenizer, text):
    """[(75 prompt tokens at most, their weights)]: a chunk that would take a 76th token (other than
    a comma) ends after its last comma when that comma is among its last 20 tokens."""
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunks, tokens, weights = [], [], []
    for text_part, weight in emphasis(text):
        if weight == -1 and text_part == "BREAK":
            chunks.append((tokens, weights))
            tokens, weights = [], []
            continue
        for token in tokenizer(text_part, add_special_tokens=False).input_ids:
            if len(tokens) == 75:
                commas = [i for i, t in enumerate(tokens) if t == comma]
                if token != comma and commas and 75 - commas[-1] <= 20:
                    cut = commas[-1] + 1
                    chunks.append((tokens[:cut], weights[:cut]))
                    tokens, weights = tokens[cut:], weights[cut:]
                else:
                    chunks.append((tokens, weights))
                    tokens, weights = [], []
            tokens, weights = tokens + [token], weights + [weight]
    if tokens or not chunks:
        chunks.append((tokens, weights))
    return chunks


def framed(tokenizer, tokens):
    """start, the tokens, end tokens to 77; OpenCLIP writes its pad token after the first end."""
    ids = [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (75 - len(tokens))
    return ids


def reference_encode(encoder, tokenizer, texts):
    per_text = [reference_chunks(tokenizer, t) for t in texts]
    pieces = []
    for c in range(max(len(p) for p in per_text)):
        chunk = [p[c] if c < len(p) else ([], []) for p in per_text]
        ids = torch.tensor([framed(tokenizer, tokens) for tokens, _ in chunk])
        weights = np.array([[1.0, *w, *[1.0] * (76 - len(w))] for _, w in chunk])
        with torch.no_grad():
            z = encoder(ids).last_hidden_state.double().numpy()
        weighted = z * weights[..., None]
        pieces.append(weighted * (z.mean() / weighted.mean()))
    return np.concatenate(pieces, axis=1)


def ours(encoder, tokenizer, texts, layer=clip_text.Layer()):
    return clip_text.encode(encoder, tokenizer, texts, layer)[0]


# -- tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["clip", "openclip"])
def test_a_plain_prompt_is_the_tokenizers_padded_encoding(which, request):
    encoder, tokenizer = request.getfixturevalue(which)
    ids = tokenizer(["a red fox in snow", ""], padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        expected = encoder(ids).last_hidden_state
    for i, text in enumerate(["a red fox in snow", ""]):
        assert torch.equal(ours(encoder, tokenizer, [text]), expected[i:i + 1])


@pytest.mark.parametrize("which", ["clip", "openclip"])
@pytest.mark.parametrize("texts", [
    ["a (red:1.5) fox, [snow], ((sky))"],
    [LONG],
    ["(" + LONG + ":0.8), blue sky BREAK (green grass:1.3)"],
    ["a [fox] in snow", "(a fox in snow:1.4), " + LONG],  # one batch: empty chunks pad, one mean per chunk
])
def test_weights_chunks_and_means_match_the_reference(which, texts, request):
    encoder, tokenizer = request.getfixturevalue(which)
    got = ours(encoder, tokenizer, texts).double().numpy()
    expected = reference_encode(encoder, tokenizer, texts)
    assert got.shape == expected.shape
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_comma_backtracking_moves_the_last_words(clip):
    _, tokenizer = clip
    chunks = clip_text.chunks(tokenizer, LONG)
    assert [c.tokens for c in chunks] == [framed(tokenizer, t) for t, _ in reference_chunks(tokenizer, LONG)]
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    first = chunks[0].tokens
    last_word = max(i for i, t in enumerate(first) if t not in (tokenizer.eos_token_id,))
    assert first[last_word] == comma and last_word < 75  # it ended at a comma, padded after it
    assert len(chunks) == 2 and ours(*clip, [LONG]).shape[1] == 154


def test_break_starts_a_chunk(clip):
    _, tokenizer = clip
    first, second = clip_text.chunks(tokenizer, "a red fox BREAK snow")
    fox = tokenizer("a red fox", add_special_tokens=False).input_ids
    assert first.tokens[:len(fox) + 2] == [tokenizer.bos_token_id, *fox, tokenizer.eos_token_id]
    assert second.tokens[1] == tokenizer("snow", add_special_tokens=False).input_ids[0]


def test_weights_of_one_leave_the_encoding_alone(clip):
    assert torch.equal(ours(*clip, ["a (fox:1) in snow"]), ours(*clip, ["a fox in snow"]))
    assert not torch.allclose(ours(*clip, ["a (fox:1.3) in snow"]), ours(*clip, ["a fox in snow"]))


def model_of(encoders, tokenizers, embeddings=None):
    return SimpleNamespace(text_encoders=encoders, tokenizers=tokenizers, dtype=torch.float32,
                           embeddings=embeddings, options={})


@pytest.mark.parametrize("clip_skip", [2, 3])
def test_clip_skip_is_diffusers_clip_skip_plus_one(clip_skip):
    pipe = tiny_models.sd_pipeline("sd1")
    encoder = pipe.text_encoder
    # diffusers reaches the final layer norm through .text_model, a level transformers 5 removed
    object.__setattr__(encoder, "text_model", SimpleNamespace(final_layer_norm=encoder.final_layer_norm))
    model = model_of([encoder], [pipe.tokenizer])
    s = Settings(clip_skip=clip_skip)
    if clip_skip > 2:
        with pytest.raises(Exception, match="more than this text encoder's 2 layers"):
            sd.SD1.encode(model, ["a red fox"], s, False)
        return
    with torch.no_grad():
        expected, _ = pipe.encode_prompt("a red fox", "cpu", 1, False, clip_skip=clip_skip - 1)
    got = sd.SD1.encode(model, ["a red fox"], s, False)["encoder_hidden_states"]
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, sd.SD1.encode(model, ["a red fox"], Settings(), False)["encoder_hidden_states"])


def test_sd2_ignores_clip_skip(openclip):
    model = model_of([openclip[0]], [openclip[1]])
    plain = sd.SD2.encode(model, ["a fox"], Settings(), False)["encoder_hidden_states"]
    assert torch.equal(sd.SD2.encode(model, ["a fox"], Settings(clip_skip=2), False)["encoder_hidden_states"], plain)


def test_sdxl_pools_the_first_chunk(clip, openclip):
    model = model_of([clip[0], openclip[0]], [clip[1], openclip[1]])
    s = Settings(width=64, height=64)
    long = sdxl.SDXL.encode(model, [LONG + " BREAK more words"], s, False)
    first = clip_text.chunks(openclip[1], LONG)[0]
    with torch.no_grad():
        pooled = openclip[0](clip_text._ids([first], openclip[1], torch.device("cpu"))).text_embeds
    assert long["encoder_hidden_states"].shape == (1, 231, 64)
    assert torch.allclose(long["text_embeds"], pooled, atol=1e-6)
    zeros = sdxl.SDXL.encode(model, [""], s, True)
    assert not zeros["encoder_hidden_states"].any() and not zeros["text_embeds"].any()
    assert sdxl.SDXL.encode(model, ["x"], s, True)["encoder_hidden_states"].any()


class OneWord:
    """A textual inversion: the word `name` stands for `vectors`."""

    def __init__(self, tokenizer, name, vectors):
        self.ids, self.vectors, self.seen = tokenizer(name, add_special_tokens=False).input_ids, vectors, []

    def find(self, tokens, position, encoder):
        self.seen.append(encoder)
        if list(tokens[position:position + len(self.ids)]) == self.ids:
            return self.vectors, len(self.ids)
        return None


def test_an_embedding_takes_the_place_of_its_name(clip):
    encoder, tokenizer = clip
    red_fox = tokenizer("red fox", add_special_tokens=False).input_ids
    vectors = encoder.get_input_embeddings().weight[red_fox].detach()
    lookup = OneWord(tokenizer, "zzyzx", vectors)
    spliced = clip_text.encode(encoder, tokenizer, ["a (zzyzx:1.2) in snow"], clip_text.Layer(), lookup)[0]
    written = ours(encoder, tokenizer, ["a (red fox:1.2) in snow"])
    assert torch.allclose(spliced, written, atol=1e-6)
    assert lookup.seen and set(lookup.seen) == {0}
    chunk = clip_text.chunks(tokenizer, "a zzyzx", lookup)[0]
    assert chunk.tokens[2:4] == [clip_text.PLACEHOLDER] * 2 and chunk.fixes[0][0] == 1


# -- T5, and the DiT families (SD3, FLUX) as Forge reads their prompts -----------------------------
@pytest.fixture(scope="module")
def t5_parts():
    return tiny_models.t5_encoder(), tiny_models.t5_tokenizer()


def t5_reference(encoder, tokenizer, text: str, length: int) -> torch.Tensor:
    """Forge's T5 reading on diffusers' tokens: each weighted fragment tokenized alone, the end
    token, pads to `length`; each state times its token's weight, the mean restored."""
    tokens, weights = [], []
    for fragment, weight in emphasis(text):
        piece = tokenizer(fragment, add_special_tokens=False).input_ids
        tokens, weights = tokens + piece, weights + [weight] * len(piece)
    tokens, weights = tokens[:length - 1] + [1], weights[:length - 1] + [1.0]  # 1: T5's end token
    tokens, weights = tokens + [0] * (length - len(tokens)), weights + [1.0] * (length - len(weights))
    with torch.no_grad():
        z = encoder(torch.tensor([tokens]))[0].double()
    emphasized = z * torch.tensor(weights, dtype=torch.float64)[None, :, None]
    return emphasized * (z.mean() / emphasized.mean())


@pytest.mark.parametrize("text, length", [("a (red:1.5) fox, [snow], ((sky))", 32),
                                          ("(a fox:0.7) " + LONG, 24)])  # cut: weights cut with their tokens
def test_t5_weights_match_forges_reading(t5_parts, text, length):
    encoder, tokenizer = t5_parts
    got = t5.encode(tokenizer, encoder, [text], length, tiny_models.T5_WIDTH, torch.float32, torch.device("cpu"))
    expected = t5_reference(encoder, tokenizer, text, length)
    assert got.shape == expected.shape
    assert np.allclose(got.double().numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    plain = t5.encode(tokenizer, encoder, [emphasis_free(text)], length, tiny_models.T5_WIDTH, torch.float32, "cpu")
    assert not torch.allclose(got, plain, atol=1e-3)  # the weights did something


def emphasis_free(text: str) -> str:
    return "".join(fragment for fragment, _ in emphasis(text))


@pytest.mark.parametrize("text", ["a red fox in snow", "", LONG])
def test_t5_reads_a_plain_prompt_as_diffusers_tokenizes_it(t5_parts, text):
    _, tokenizer = t5_parts
    ids, weights = t5.tokenize(tokenizer, [text], 64)
    expected = tokenizer([text], padding="max_length", max_length=64, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, expected) and bool((weights == 1).all())


@pytest.fixture(scope="module")
def dit_models(sd3_folder, flux_dev_folder):
    from ldm_cli import loading
    from ldm_cli.loading import LoadOptions

    return {name: loading.load(str(folder), LoadOptions(device="cpu"))
            for name, folder in (("sd3", sd3_folder), ("flux", flux_dev_folder))}


def dit_encode(model, text: str, **kw):
    s = Settings(prompt=text, steps=2, width=64, height=64, **kw).resolve(model.defaults, model.native_size)
    return model.family.encode(model, [text], s, False)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_emphasis_marks_never_reach_the_dit_encoders(dit_models, name):
    """A weight of 1 leaves only the words (as Forge gives them to the encoders); escaped brackets are words."""
    model = dit_models[name]
    marked, plain = dit_encode(model, r"a (red:1.0) fox \(x\)"), dit_encode(model, r"a red fox \(x\)")
    assert not torch.equal(plain["encoder_hidden_states"], dit_encode(model, "a red fox x")["encoder_hidden_states"])
    assert all(torch.equal(marked[k], plain[k]) for k in plain)
    weighted_cond = dit_encode(model, r"a (red:1.6) fox \(x\)")
    assert not torch.equal(weighted_cond["encoder_hidden_states"], plain["encoder_hidden_states"])
    if name == "flux":  # the pooled embedding is CLIP's, from the words: weights leave it alone
        assert torch.equal(weighted_cond["pooled_projections"], plain["pooled_projections"])


def test_sd3_reads_long_prompts_and_break_in_chunks(dit_models):
    model = dit_models["sd3"]
    t5_tokens = model.defaults["max_sequence_length"]
    for text in (LONG, "a red fox BREAK in snow"):
        assert dit_encode(model, text)["encoder_hidden_states"].shape[1] == 154 + t5_tokens
    assert dit_encode(model, "a red fox")["encoder_hidden_states"].shape[1] == 77 + t5_tokens
