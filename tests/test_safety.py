"""Files that must not hurt: pickles (refused; with --allow-pickle, tensors only), a pickle
wearing a .safetensors name, truncated and corrupt files, headers that lie; and a whole load
and generate run with the network cut off."""
import json
import pickle
import socket

import pytest
import torch
from typer.testing import CliRunner

from ldm_cli import loading
from ldm_cli.cli import app
from ldm_cli.errors import LdmError
from ldm_cli.loading import LoadOptions
from tests import original_layout


class RunsCode:
    """Unpickling this calls exec(): what a hostile .ckpt does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def cli(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def assert_one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ldm: error: "), result.stderr
    for word in words:
        assert word in lines[0]


@pytest.fixture
def hostile(tmp_path):
    """(marker that appears if code ran, [hostile files: torch zip archive, raw pickle, renamed])."""
    marker = tmp_path / "ran.txt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": RunsCode(marker)}, tmp_path / "evil.ckpt")
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"w": RunsCode(marker)}, protocol=4))
    (tmp_path / "evil.safetensors").write_bytes((tmp_path / "evil.ckpt").read_bytes())
    return marker, [tmp_path / "evil.ckpt", tmp_path / "evil.pt", tmp_path / "evil.safetensors"]


def test_pickles_are_refused_and_never_run(hostile, tmp_path):
    marker, files = hostile
    for path in files:
        assert_one_line_error(cli("generate", "x", "--model", path, "--out", tmp_path / "out"),
                              "pickle", "--allow-pickle")
        assert_one_line_error(cli("info", path), "pickle")
        assert_one_line_error(cli("generate", "x", "--model", path, "--allow-pickle", "--out", tmp_path / "out"),
                              "more than tensors")
    assert not marker.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_allow_pickle_loads_a_tensors_only_checkpoint(sd1_folder, tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": original_layout.original_state(sd1_folder, "sd1"), "global_step": 470000}, path)
    with pytest.raises(LdmError, match="--allow-pickle"):
        loading.load(str(path), LoadOptions(config=str(sd1_folder)))
    result = cli("info", path, "--config", sd1_folder, "--allow-pickle", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["family"] == "sd1"
    model = loading.load(str(path), LoadOptions(config=str(sd1_folder), allow_pickle=True))
    ref = loading.load(str(sd1_folder))
    for a, b in zip([model.denoiser, model.vae, *model.text_encoders], [ref.denoiser, ref.vae, *ref.text_encoders]):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sb)


@pytest.fixture(scope="module")
def good_file(sd1_folder, tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    return original_layout.write(sd1_folder, path, "sd1", metadata=original_layout.ldm_metadata(sd1_folder, "sd1"))


def header_of(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def with_header(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def damaged(good_file, tmp_path):
    raw = good_file.read_bytes()
    header, data = header_of(good_file)
    key = next(k for k in header if k != "__metadata__")
    lying = {**header, key: {**header[key], "shape": [7, 7, 7]}}
    begin, end = header[key]["data_offsets"]
    beyond = {**header, key: {**header[key], "data_offsets": [len(data), len(data) + end - begin]}}
    return {
        "truncated": raw[: len(raw) // 2],
        "empty": b"",
        "garbage header": raw[:8] + b"\xff" * (len(raw) - 8),
        "huge header length": (2**40).to_bytes(8, "little") + raw[8:],
        "shape that lies": with_header(lying, data),
        "offsets beyond the data": with_header(beyond, data),
        "not a checkpoint": b"hello, this is text and not a model at all",
    }


def test_damaged_files_are_one_clear_error(good_file, tmp_path):
    for name, content in damaged(good_file, tmp_path).items():
        path = tmp_path / f"{name.replace(' ', '-')}.safetensors"
        path.write_bytes(content)
        with pytest.raises(LdmError):
            loading.load(str(path))
        result = cli("generate", "x", "--model", path, "--out", tmp_path / "out")
        assert_one_line_error(result)
        assert "Traceback" not in result.output, name
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_truncated_file_says_so(good_file, tmp_path):
    path = tmp_path / "half.safetensors"
    path.write_bytes(good_file.read_bytes()[:-1000])
    assert_one_line_error(cli("info", path), "truncated")


def test_whole_load_and_generate_path_with_the_network_cut_off(good_file, tmp_path, monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in an offline test")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    result = cli("generate", "a red fox", "--model", good_file, "--steps", 2, "-W", 64, "-H", 64, "--seed", 1,
                 "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    [row] = [json.loads(line) for line in result.stdout.splitlines()]
    assert row["model_name"] == "good" and len(row["model_hash"]) == 10
    assert cli("info", good_file).exit_code == 0
    assert attempts == []
