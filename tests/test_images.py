import os

import pytest
from PIL import Image

from ldm_cli import images
from ldm_cli.errors import LdmError


def picture():
    return Image.new("RGB", (8, 8), (200, 10, 10))


def test_names_are_numbered_and_never_overwrite(tmp_path):
    (tmp_path / "00007-1.png").write_bytes(b"someone else's")
    first = images.save_png(picture(), tmp_path, "42", {"parameters": "x"})
    second = images.save_png(picture(), tmp_path, "42", {"parameters": "y"})
    assert (first.name, second.name) == ("00008-42.png", "00009-42.png")
    assert (tmp_path / "00007-1.png").read_bytes() == b"someone else's"
    assert images.read_text_chunks(second) == {"parameters": "y"}


def test_a_taken_name_moves_on_instead_of_overwriting(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "_next_number", lambda folder: 3)
    (tmp_path / "00003-5.png").write_bytes(b"keep me")
    saved = images.save_png(picture(), tmp_path, "5", {})
    assert saved.name == "00004-5.png"
    assert (tmp_path / "00003-5.png").read_bytes() == b"keep me"


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(self, fp, format=None, **kw):
        fp.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(KeyboardInterrupt):
        images.save_png(picture(), tmp_path, "1", {})
    assert os.listdir(tmp_path) == []


def test_unwritable_folder_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LdmError, match="cannot write to output folder"):
        images.check_writable(blocker / "sub")


@pytest.mark.parametrize("content", [b"", b"not a png at all", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_unreadable_images_are_user_errors(tmp_path, content):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    with pytest.raises(LdmError, match="not a readable image"):
        images.read_text_chunks(bad)
