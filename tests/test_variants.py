"""--variant (loading/variants.py): a family's release named where its tensors cannot tell it."""
import pytest

from ldm_cli.errors import LdmError
from ldm_cli.loading import variants
from ldm_cli.settings import Settings


@pytest.mark.parametrize("family, found, given, told", [
    ("flux2", "distilled", None, "distilled"), ("flux2", "distilled", "base", "base"),
    ("zimage", "turbo", "base", "base"), ("zimage", "base", "turbo", "turbo"),
    ("qwen-image", None, "edit-plus", "edit-plus"), ("qwen-image", "edit", "plain", None),
    ("sd3", "sd35-large", None, "sd35-large"),
])
def test_the_flag_outranks_what_detection_read(family, found, given, told):
    assert variants.told(family, found, given) == told


@pytest.mark.parametrize("family, found, given, message", [
    ("zimage", "turbo", "edit", "--variant edit: zimage has turbo, base"),
    ("qwen-image", None, "2509", "--variant 2509: qwen-image has plain, edit, edit-plus"),
    ("flux2", "dev", "base", "--variant base: this is FLUX.2 dev, by its guidance embedding; "
                             "--variant names FLUX.2 klein's releases (distilled, base)"),
    ("sdxl", None, "turbo", "--variant turbo: this sdxl model's tensors say what it is; --variant is for "
                            "flux2 (distilled, base); zimage (turbo, base); qwen-image (plain, edit, edit-plus)"),
])
def test_a_name_the_family_lacks_is_one_line(family, found, given, message):
    with pytest.raises(LdmError) as e:
        variants.told(family, found, given)
    assert str(e.value) == message


def test_the_variant_round_trips_through_the_infotext():
    s = Settings(prompt="a fox", steps=4, cfg=1.0, seed=1, width=64, height=64, variant="edit-plus")
    text = s.to_infotext("test")
    assert "Model variant: edit-plus" in text
    assert Settings.from_infotext(text).variant == "edit-plus"
    assert Settings.from_infotext(Settings(prompt="a fox", steps=4).to_infotext("test")).variant is None


def test_a_prompts_file_line_names_its_variant_and_lines_load_by_model_and_variant(tmp_path):
    from ldm_cli import batch, prompts_file

    (tmp_path / "m.safetensors").write_bytes(b"")  # a path the lines name; never read here
    (tmp_path / "p.txt").write_text('--prompt "a fox" --model m.safetensors --variant base\n'
                                    '--prompt "a cat" --model m.safetensors\n'
                                    '--prompt "a dog" --model m.safetensors --variant base\n')
    jobs = prompts_file.read(tmp_path / "p.txt", Settings())
    assert [j.settings.variant for j in jobs] == ["base", None, "base"]
    assert [t.settings.prompt for t in batch.tasks(jobs)] == ["a fox", "a dog", "a cat"]  # one load per variant
