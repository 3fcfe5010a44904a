"""Checkpoint headers that lie (GGUF, safetensors): every count and length is checked against the
file's size before anything is allocated, so a tiny forged file is one line, at once."""
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from ldm_cli.cli import app
from ldm_cli.errors import LdmError
from ldm_cli.loading import gguf_header, quantized


def one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ldm: error: "), result.stderr
    assert all(w in lines[0] for w in words), lines[0]


def string(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def test_the_51_byte_gguf_claiming_2_to_the_40_elements_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + string(b"xyz") + struct.pack("<IIQ", 9, 0, 2**40))
    assert path.stat().st_size == 51
    code = f"import sys; from ldm_cli import cli; sys.argv = ['ldm', 'info', {str(path)!r}]; cli.main()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "bomb.gguf is truncated or corrupt (its GGUF header is malformed: it claims 1,099,511,627,776 array " \
           "elements after offset 51; the file has 51 bytes)" in done.stderr


@pytest.fixture
def good(tmp_path):
    """A small GGUF file as the gguf package writes one: metadata with a string array, two tensors."""
    import gguf

    path = tmp_path / "good.gguf"
    writer = gguf.GGUFWriter(str(path), "flux")
    writer.add_array("tokenizer.tokens", ["a", "bc", "def"])
    writer.add_string("general.name", "tiny")
    writer.add_tensor("a.weight", np.ones((4, 32), np.float32))
    writer.add_tensor("b.weight", np.ones((2, 64), np.float32))
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        write()
    return path


def forged(path, tmp_path, find: bytes, skip: int, value: bytes):
    """A copy of `path` with `value` written `skip` bytes after `find`."""
    data = bytearray(path.read_bytes())
    at = data.index(find) + len(find) + skip
    data[at:at + len(value)] = value
    out = tmp_path / "forged.gguf"
    out.write_bytes(bytes(data))
    return out


def test_a_sound_gguf_passes(good):
    gguf_header.check(good)
    shapes, dtypes, _, _ = quantized.read_gguf(good)
    assert shapes == {"a.weight": (4, 32), "b.weight": (2, 64)} and dtypes["a.weight"] == "F32"


@pytest.mark.parametrize("find, skip, value, words", [
    (b"GGUF", 4, struct.pack("<Q", 2**62), "2**62 tensors"),  # tensor count
    (b"GGUF", 12, struct.pack("<Q", 2**50), "key-value pairs"),
    (b"tokenizer.tokens", 8, struct.pack("<Q", 2**40), "array elements"),  # after its type and item type
    (b"tokenizer.tokens", 16, struct.pack("<Q", 2**40), "bytes of a string"),  # the first token's length
    (b"tokenizer.tokens", 0, struct.pack("<I", 77), "value type 77"),
    (b"a.weight", 0, struct.pack("<I", 10**6), "claims 1,000,000 dimensions"),
    (b"a.weight", 4, struct.pack("<Q", 2**40), "tensor 'a.weight' claims"),  # a dimension
    (b"b.weight", 4 + 16 + 4, struct.pack("<Q", 2**40), "tensor 'b.weight' claims 512 bytes at"),  # its offset
])
def test_every_count_in_a_gguf_header_is_checked(good, tmp_path, find, skip, value, words):
    path = forged(good, tmp_path, find, skip, value)
    words = words.replace("2**62", f"{2**62:,}")
    with pytest.raises(LdmError, match="truncated or corrupt") as e:
        gguf_header.check(path)
    assert words in str(e.value)
    one_line_error(CliRunner().invoke(app, ["info", str(path)]), "forged.gguf is truncated or corrupt")


def safetensors(path, header: dict | str, data: bytes = b"") -> str:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return str(path)


@pytest.mark.parametrize("header, data, words", [
    ('{"a": ' + "[" * 50_000 + "]" * 50_000 + "}", b"", "its header nests deeper than 20 levels"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"x": [1]}}, bytes(8),
     "its __metadata__ is not a table of texts"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(8), "expects 16 bytes of tensor data; only 8"),
    ({"a": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 8]}}, bytes(8), "is [1099511627776] F32 but gives it 8"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 1e400]}}, bytes(8), "entry for 'a' is malformed"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, int("9" * 400)]}}, bytes(8), "more than 308 digits"),
])
def test_a_lying_safetensors_header_is_one_line(tmp_path, header, data, words):
    path = safetensors(tmp_path / "x.safetensors", header, data)
    one_line_error(CliRunner().invoke(app, ["info", path]), "x.safetensors is truncated or corrupt", words)


def test_a_header_longer_than_the_file_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    one_line_error(CliRunner().invoke(app, ["info", str(path)]), "its header claims 1099511627776 bytes; the file has 10")


def broken_folder(source, tmp_path, part: str, damage) -> str:
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    damage(folder / part)
    return str(folder)


def truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def sharded(path):
    """The weights as the first of two shards, the second missing."""
    path.rename(path.with_name("diffusion_pytorch_model-00001-of-00002.safetensors"))
    shards = {"a": "diffusion_pytorch_model-00001-of-00002.safetensors", "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}
    path.with_name(path.name + ".index.json").write_text(json.dumps({"weight_map": shards}))


def replace_by_folder(path):
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize("part, damage, words", [
    ("unet/diffusion_pytorch_model.safetensors", lambda p: p.unlink(), "unet' has no weights (diffusion_pytorch_model"),
    ("vae/diffusion_pytorch_model.safetensors", truncate, "diffusion_pytorch_model.safetensors is truncated or corrupt"),
    ("text_encoder/model.safetensors", replace_by_folder, "model.safetensors' is a folder, not a file"),
    ("vae/config.json", lambda p: p.write_text("{not json"), "config.json' is not valid JSON"),
    ("unet/config.json", lambda p: p.write_text("[1, 2]"), "config.json' is not a JSON object"),
    ("text_encoder/config.json", lambda p: p.unlink(), "has no config.json"),
    ("model_index.json", lambda p: p.write_text("[" * 10_000), "model_index.json' nests deeper than 20 levels"),
    ("unet/diffusion_pytorch_model.safetensors", sharded, "diffusion_pytorch_model-00002-of-00002.safetensors' is missing"),
])
def test_a_damaged_model_folder_is_one_line_before_loading(sd1_folder, tmp_path, part, damage, words):
    folder = broken_folder(sd1_folder, tmp_path, part, damage)
    result = CliRunner().invoke(app, ["generate", "a fox", "--model", folder, "--steps", "1", "--out", str(tmp_path / "o")])
    one_line_error(result, words)
    assert not (tmp_path / "o").exists()
