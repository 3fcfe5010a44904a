"""ldm's stand-ins for what spandrel imports from torchvision, against torchvision's documented
behaviour (torchvision itself does not load here), and the import that registers them only
while spandrel imports."""
import subprocess
import sys

import pytest
import torch

from ldm_cli import libraries
from ldm_cli.torchvision_standin import InterpolationMode, normalize, rotate

BILINEAR, NEAREST = InterpolationMode.BILINEAR, InterpolationMode.NEAREST


def picture(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_interpolation_modes_carry_torchvisions_names():
    assert {m.name: m.value for m in InterpolationMode} == {
        "NEAREST": "nearest", "NEAREST_EXACT": "nearest-exact", "BILINEAR": "bilinear", "BICUBIC": "bicubic",
        "BOX": "box", "HAMMING": "hamming", "LANCZOS": "lanczos"}


def test_normalize_is_mean_and_std_per_channel_and_leaves_its_input():
    x = picture(2, 3, 4, 5)
    before = x.clone()
    mean, std = [0.5, 0.2, 0.1], [0.5, 2.0, 0.25]
    out = normalize(x, mean, std)
    for c in range(3):
        torch.testing.assert_close(out[:, c], (before[:, c] - mean[c]) / std[c])
    assert torch.equal(x, before)
    assert normalize(x, mean, std, inplace=True) is x and torch.equal(x, out)


@pytest.mark.parametrize("bad, error", [
    (torch.ones(3, 4, 4, dtype=torch.uint8), TypeError), (torch.ones(4, 4), ValueError)])
def test_normalize_refuses_what_torchvision_refuses(bad, error):
    with pytest.raises(error):
        normalize(bad, [0.5], [0.5])
    with pytest.raises(ValueError, match="std evaluated to zero"):
        normalize(torch.ones(1, 2, 2), [0.0], [0.0])


@pytest.mark.parametrize("mode", [BILINEAR, NEAREST])
def test_rotate_turns_counter_clockwise_about_the_centre(mode):
    x = picture(2, 3, 6, 6)
    assert torch.allclose(rotate(x, 0, mode), x, atol=1e-6)
    # a quarter turn counter-clockwise: the right column becomes the top row
    assert torch.allclose(rotate(x, 90, mode), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5)
    assert torch.allclose(rotate(x, -90.0, mode), torch.rot90(x, -1, dims=(-2, -1)), atol=1e-5)
    assert torch.allclose(rotate(x, 180, mode), x.flip(-1, -2), atol=1e-5)


def test_rotate_fills_what_comes_from_outside():
    x = picture(1, 3, 9, 9) + 1  # no pixel is 0
    turned = rotate(x, 45, BILINEAR, fill=0)
    assert torch.all(turned[..., 0, 0] == 0) and torch.all(turned[..., -1, -1] == 0)  # corners: outside
    assert torch.allclose(turned[..., 4, 4], x[..., 4, 4])  # the centre stays
    coloured = rotate(x, 45, NEAREST, fill=[7.0, 8.0, 9.0])
    assert coloured[0, :, 0, 0].tolist() == [7.0, 8.0, 9.0]


def test_rotate_keeps_leading_axes_and_refuses_what_torchvision_does():
    x = picture(2, 2, 3, 5, 7)
    assert rotate(x, 30, BILINEAR).shape == x.shape
    with pytest.raises(TypeError, match="angle should be int or float"):
        rotate(x, torch.tensor(30.0), BILINEAR)  # torchvision's rotate takes a number
    with pytest.raises(ValueError):
        rotate(x, 30, InterpolationMode.BICUBIC)


def test_spandrel_imports_with_the_stand_ins_and_leaves_no_torchvision_behind():
    spandrel = libraries.import_spandrel()
    assert spandrel.MAIN_REGISTRY.get("ESRGAN") is not None
    assert not [m for m in sys.modules if m.split(".")[0] == "torchvision"]
    lama = sys.modules["spandrel.architectures.LaMa.__arch.LaMa"]
    assert lama.rotate is rotate and lama.InterpolationMode is InterpolationMode
    assert sys.modules["spandrel.architectures.RestoreFormer"].tv_normalize is normalize


def test_without_the_stand_ins_spandrel_needs_a_torchvision():
    """What the stand-ins are for: a plain `import spandrel` here fails on torchvision."""
    done = subprocess.run([sys.executable, "-c", "import spandrel"], capture_output=True, text=True)
    if done.returncode == 0:
        pytest.skip("a working torchvision is installed here")
    assert "torchvision" in done.stderr
