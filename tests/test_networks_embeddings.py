"""Textual inversion: the embedding files A1111 reads, names found in a prompt's tokens as A1111
finds them (longest first, not added to the vocabulary), vectors spliced where the name was."""
import pytest
import torch
from safetensors.torch import save_file

from ldm_cli import loading
from ldm_cli.errors import LdmError
from ldm_cli.networks import embeddings, session
from ldm_cli.networks.lookup import NetworkOptions
from ldm_cli.settings import Settings


def test_the_file_formats_a1111_reads(tmp_path):
    v = torch.randn(2, 8)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "x", "step": 10},
               tmp_path / "a1111.pt")
    save_file({"emb_params": v}, str(tmp_path / "kohya.safetensors"))
    torch.save({"<cat-toy>": v[0]}, tmp_path / "concept.bin")
    save_file({"clip_l": torch.randn(3, 8), "clip_g": torch.randn(3, 12)}, str(tmp_path / "xl.safetensors"))
    assert torch.equal(embeddings.read(tmp_path / "a1111.pt", True).vectors[""], v)
    assert torch.equal(embeddings.read(tmp_path / "kohya.safetensors", False).vectors[""], v)
    assert embeddings.read(tmp_path / "concept.bin", True).vectors[""].shape == (1, 8)
    xl = embeddings.read(tmp_path / "xl.safetensors", False)
    assert (xl.name, xl.count, xl.vectors["clip_g"].shape) == ("xl", 3, (3, 12))
    with pytest.raises(LdmError, match="--allow-pickle"):
        embeddings.read(tmp_path / "a1111.pt", False)
    save_file({"a": v, "b": v.clone()}, str(tmp_path / "two.safetensors"))
    with pytest.raises(LdmError, match="not a textual-inversion embedding"):
        embeddings.read(tmp_path / "two.safetensors", False)


@pytest.fixture
def sd1(sd1_folder, tmp_path):
    model = loading.load(str(sd1_folder), loading.LoadOptions(device="cpu"))
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    table = model.text_encoders[0].get_input_embeddings().weight.detach()
    ids = model.tokenizers[0]("red fox", add_special_tokens=False).input_ids
    save_file({"emb_params": table[ids].clone()}, str(folder / "sub" / "myfox.safetensors"))  # "red fox" as vectors
    save_file({"emb_params": torch.randn(1, 32)}, str(folder / "my.safetensors"))
    save_file({"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 48)}, str(folder / "xlonly.safetensors"))
    session.attach(model, NetworkOptions(embeddings_dirs=[str(folder)]), str(sd1_folder))
    return model


def encoded(model, text: str) -> torch.Tensor:
    return model.family.encode(model, [text], Settings(steps=1, width=64, height=64), False)["encoder_hidden_states"]


def test_an_embedding_stands_for_its_vectors_where_its_name_is(sd1):
    assert torch.allclose(encoded(sd1, "a myfox in snow"), encoded(sd1, "a red fox in snow"), atol=1e-6)
    assert torch.allclose(encoded(sd1, "a (myfox:1.2) in snow"), encoded(sd1, "a (red fox:1.2) in snow"), atol=1e-6)
    assert not torch.allclose(encoded(sd1, "a my in snow"), encoded(sd1, "a red fox in snow"), atol=1e-3)


def test_names_match_whole_tokens_longest_first(sd1):
    library = sd1.networks.embeddings
    tokenize = lambda text: sd1.tokenizers[0](text, add_special_tokens=False).input_ids
    tokens = tokenize("a myfox, my fox")
    first = library.match(tokens, 1)
    assert first[0].name == "myfox" and first[1] == len(tokenize("myfox"))
    assert library.match(tokens, len(tokenize("a myfox,"))) [0].name == "my"
    assert [e.name for e in library.used(["my dog", "a myfox", "more my"])] == ["my", "myfox"]


def test_the_run_records_ti_hashes_and_refuses_another_familys_embedding(sd1):
    s = Settings(prompt="a myfox", negative="my", steps=2, width=64, height=64)
    out = sd1.networks.resolve(s)
    names = [item.split(":")[0] for item in out.ti_hashes.split(", ")]
    assert names == ["myfox", "my"] and all(len(item.split(": ")[1]) == 12 for item in out.ti_hashes.split(", "))
    with pytest.raises(LdmError, match="'xlonly'.*another model family"):
        sd1.networks.resolve(Settings(prompt="an xlonly cat", steps=2, width=64, height=64))


@pytest.mark.parametrize("tensor, words", [
    (torch.randn(200, 32), "holds 200 vectors; an embedding fills 1 to 75 token positions"),  # more than a chunk
    (torch.randn(0, 32), "holds 0 vectors"),
    (torch.full((2, 32), float("nan")), "holds NaN or inf values"),
    (torch.tensor([[1.0] * 32, [float("inf")] * 32]), "holds NaN or inf values"),
    (torch.randn(2, 31), "holds vectors 31 wide; this model takes vectors 32 wide"),
])
def test_embeddings_that_cannot_be_spliced_are_one_error(sd1, tmp_path, tensor, words):
    save_file({"emb_params": tensor}, str(tmp_path / "odd.safetensors"))
    library = embeddings.Library({"odd": tmp_path / "odd.safetensors"}, sd1.tokenizers[0], [32])
    with pytest.raises(LdmError, match=f"^the embedding 'odd' .*odd.safetensors\\) {words}"):
        library.used(["an odd fox"])


@pytest.mark.parametrize("tensor, words", [
    (torch.tensor(1.0), "a single number"), (torch.ones(2, 8, dtype=torch.int32), "int32 values"),
    (torch.zeros(0), "vectors 0 wide"),
])
def test_files_that_hold_no_vectors(tmp_path, tensor, words):
    save_file({"emb_params": tensor}, str(tmp_path / "e.safetensors"))
    with pytest.raises(LdmError, match=f"e.safetensors is not a textual-inversion embedding: it holds {words}, not vectors"):
        embeddings.read(tmp_path / "e.safetensors", False)


def test_an_embedding_longer_than_a_chunk_is_one_line_not_a_traceback(sd1_folder, tmp_path):
    from typer.testing import CliRunner

    from ldm_cli.cli import app

    (tmp_path / "emb").mkdir()
    save_file({"emb_params": torch.randn(200, 32)}, str(tmp_path / "emb" / "long.safetensors"))
    result = CliRunner().invoke(app, ["generate", "a long fox", "--model", str(sd1_folder), "--steps", "1",
                                      "--embeddings-dir", str(tmp_path / "emb"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "ldm: error: the embedding 'long'" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
