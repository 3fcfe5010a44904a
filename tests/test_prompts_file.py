"""Prompts files: A1111 option lines, plain lines and JSONL become jobs; every bad line is an
error with its number, and a broken line is never taken as a prompt."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from ldm_cli import prompts_file
from ldm_cli.errors import LdmError
from ldm_cli.limits import MAX_IMAGES
from ldm_cli.settings import MAX_SEED, Settings

PROMPTS = Path(__file__).resolve().parent.parent / "prompts"


def read(tmp_path, text, name="p.txt", defaults=None, count=1):
    path = tmp_path / name
    path.write_text(text)
    return prompts_file.read(path, defaults or Settings(), count)


def one(tmp_path, line, **kw):
    [job] = read(tmp_path, line + "\n", **kw)
    return job


def test_a1111_line_sets_every_key(tmp_path):
    job = one(tmp_path, '--prompt "a fox" --negative_prompt "blurry" --steps 30 --cfg_scale 7 --seed 5 '
                        '--width 512 --height 768 --sampler_name "DPM++ 2M Karras" --batch_size 2 --n_iter 3')
    s = job.settings
    assert (s.prompt, s.negative, s.steps, s.cfg, s.seed, s.width, s.height) == ("a fox", "blurry", 30, 7.0, 5, 512, 768)
    assert (s.scheduler, s.schedule) == ("dpmpp_2m", "karras")
    assert (job.count, job.mode, job.line) == (6, "txt2img", 1)


def test_unquoted_words_join_the_prompt_as_in_a1111(tmp_path):
    s = one(tmp_path, "--prompt a red fox --negative_prompt dark, blurry --steps 4").settings
    assert (s.prompt, s.negative, s.steps) == ("a red fox", "dark, blurry", 4)


def test_plain_lines_comments_and_line_numbers(tmp_path):
    jobs = read(tmp_path, "# a comment\n\na red fox\n   \n  a blue bird, 'quoted' -- dashes  \n")
    assert [(j.line, j.settings.prompt) for j in jobs] == [(3, "a red fox"), (5, "a blue bird, 'quoted' -- dashes")]


def test_command_flags_are_defaults_under_each_line(tmp_path):
    defaults = Settings(negative="ugly", steps=9, cfg=4.0, width=64)
    plain, own, counted = read(tmp_path, "a fox\n--prompt cat --steps 3 --width 128\n--prompt x --n_iter 3\n",
                               defaults=defaults, count=2)
    assert (plain.settings.negative, plain.settings.steps, plain.settings.width, plain.count) == ("ugly", 9, 64, 2)
    assert (own.settings.steps, own.settings.width, own.settings.cfg, own.count) == (3, 128, 4.0, 2)
    assert counted.count == 3  # a line's own batch_size x n_iter wins over --num-images


def test_a_seedless_line_gets_a_fixed_seed_of_its_own(tmp_path):
    text = "a fox\na fox\n--prompt a fox --seed -1\n"
    first, second = read(tmp_path, text), read(tmp_path, text)
    seeds = [j.settings.seed for j in first]
    assert seeds == [j.settings.seed for j in second]  # a rerun makes the same images
    assert len(set(seeds)) == 3  # a repeated line still gets new pictures
    assert all(0 <= s <= MAX_SEED for s in seeds)
    assert one(tmp_path, "a fox", defaults=Settings(seed=42)).settings.seed == 42


def test_derived_seeds_leave_room_for_every_image(monkeypatch):
    assert all(prompts_file.derived_seed(n, "x") + MAX_IMAGES - 1 <= MAX_SEED for n in range(200))

    class Largest:  # the largest hash there is
        def __init__(self, data):
            pass

        def digest(self):
            return b"\xff" * 32
    monkeypatch.setattr(prompts_file, "hashlib", SimpleNamespace(sha256=Largest))
    assert prompts_file.derived_seed(1, "x") + MAX_IMAGES - 1 <= MAX_SEED


def test_a_lines_seed_is_the_same_for_any_number_of_images(tmp_path):
    text = "a fox\n--prompt a bird --n_iter 2\n"
    few, many = read(tmp_path, text, count=1), read(tmp_path, text, count=5)
    assert [j.settings.seed for j in few] == [j.settings.seed for j in many]  # -n adds images, keeps the first
    assert [j.count for j in many] == [5, 2]


def test_every_bad_line_is_reported_and_nothing_is_returned(tmp_path):
    lines = [
        "a good prompt",                                 # 1
        "--prompt a --steps seven",                      # 2
        "a fox --steps 20",                              # 3
        '--prompt "unclosed',                            # 4
        "--prompt x --cfg 7",                            # 5
        "--prompt x --tiling true",                      # 6
        "--prompt x --steps",                            # 7
        "--prompt x --width 100",                        # 8
        "--steps 4",                                     # 9
        "--prompt x --strength 0.5",                     # 10
        "--prompt x --steps 3 oops",                     # 11
        "--prompt x --cfg_scale 7,5",                    # 12
        "--prompt x --seed 4294967295 --n_iter 2",       # 13
        "--prompt x --sampler_name nope",                # 14
        "--prompt x --steps 2 --steps 3",                # 15
        "--prompt x --batch_size 0",                     # 16
        "--prompt x --sampler_name Euler --scheduler ddim",  # 17
        "--prompt x --mask m.png",                       # 18
    ]
    with pytest.raises(LdmError) as e:
        read(tmp_path, "\n".join(lines))
    message = str(e.value)
    expected = {2: "whole number", 3: "options must start the line", 4: "quotes", 5: "did you mean --cfg_scale",
                6: "A1111 option ldm does not support", 7: "needs a value", 8: "multiple of 8",
                9: "no --prompt", 10: "add --init_image", 11: "unexpected 'oops'", 12: "takes a number",
                13: "no room for 2 images", 14: "unknown scheduler", 15: "given twice", 16: "at least 1",
                17: "not both", 18: "add --init_image"}
    assert message.startswith(f"{len(expected)} bad lines in ")
    for number, words in expected.items():
        assert f"p.txt:{number}: " in message and words in message.split(f"p.txt:{number}: ")[1].split("\n")[0]
    assert "p.txt:1:" not in message


def test_jsonl_takes_the_same_keys_with_json_types(tmp_path):
    rows = [{"prompt": "a fox", "negative_prompt": "dark", "steps": 4, "cfg_scale": 6, "seed": 3,
             "sampler_name": "Euler a", "batch_size": 2, "only_masked": None}, {"prompt": "cat", "seed": None}]
    jobs = read(tmp_path, "# comment\n" + "\n".join(json.dumps(r) for r in rows), name="p.jsonl")
    s = jobs[0].settings
    assert (s.prompt, s.negative, s.steps, s.cfg, s.seed, s.scheduler, jobs[0].count) == ("a fox", "dark", 4, 6.0, 3, "euler_a", 2)
    assert isinstance(s.cfg, float) and jobs[1].line == 3 and jobs[1].settings.seed is not None


@pytest.mark.parametrize("row, words", [
    ('{"prompt": "x", "steps": "20"}', '"steps" takes a whole number'),
    ('{"prompt": "x", "steps": 2.5}', '"steps" takes a whole number'),
    ('{"prompt": "x", "seed": true}', '"seed" takes a whole number'),
    ('{"prompt": "x", "cfg_scale": "7"}', '"cfg_scale" takes a number'),
    ('{"prompt": 5}', '"prompt" takes text'),
    ('{"prompt": "x", "negative": "y"}', "did you mean negative_prompt"),
    ('["x"]', "one JSON object"),
    ('{"prompt": "x",}', "not valid JSON"),
    ('a fox', "not valid JSON"),
    ('{"prompt": "x", "cfg_scale": 1' + "0" * 400 + "}", "the line holds a number of more than 308 digits"),
    ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", "the line nests deeper than 20 levels"),
    ('{"prompt": "' + "x" * 2**20 + '"}', "characters long; at most 1,048,576 are read"),
])
def test_bad_jsonl_lines(tmp_path, row, words):
    with pytest.raises(LdmError, match="p.jsonl:1: ") as e:
        read(tmp_path, row, name="p.jsonl")
    assert words in str(e.value)


def test_image_paths_start_at_the_files_folder(tmp_path):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (72, 40), "red").save(tmp_path / "in" / "init.png")
    mask = Image.new("L", (72, 40), 0)
    mask.paste(255, (0, 0, 20, 20))
    mask.save(tmp_path / "in" / "mask.png")
    img2img, inpaint = read(tmp_path, "--prompt x --init_image in/init.png --strength 0.5\n"
                                      "--prompt y --init_image in/init.png --mask in/mask.png --mask_blur 2 --only_masked true\n")
    assert img2img.init_image == tmp_path / "in" / "init.png" and img2img.mode == "img2img"
    assert img2img.settings.strength == 0.5
    assert (inpaint.mode, inpaint.mask, inpaint.settings.mask_blur, inpaint.settings.only_masked) == (
        "inpaint", tmp_path / "in" / "mask.png", 2, True)


def test_bad_images_are_caught_before_anything_runs(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
    Image.new("L", (64, 64), 0).save(tmp_path / "black.png")
    Image.new("L", (64, 32), 255).save(tmp_path / "wide.png")
    (tmp_path / "text.png").write_text("not an image")
    lines = ["--prompt x --init_image missing.png", "--prompt x --init_image text.png",
             "--prompt x --init_image init.png --mask black.png", "--prompt x --init_image init.png --mask wide.png",
             "--prompt x --init_image init.png --mask_blur 3", "--prompt x --model nowhere.safetensors"]
    with pytest.raises(LdmError) as e:
        read(tmp_path, "\n".join(lines))
    message = str(e.value)
    for number, words in enumerate(["no such file", "not a readable image", "is empty", "aspect ratio",
                                    "add --mask", "no such file"], start=1):
        assert words in message.split(f"p.txt:{number}: ")[1].split("\n")[0]


def test_model_paths_are_absolute(tmp_path):
    (tmp_path / "models" / "m").mkdir(parents=True)
    assert one(tmp_path, "--prompt x --model models/m").settings.model == str(tmp_path / "models" / "m")


def test_unreadable_or_empty_files(tmp_path):
    with pytest.raises(LdmError, match="no such prompts file"):
        prompts_file.read(tmp_path / "none.txt", Settings())
    with pytest.raises(LdmError, match="holds no prompts"):
        read(tmp_path, "# only a comment\n\n")
    (tmp_path / "latin.txt").write_bytes("a fox\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(LdmError, match="latin.txt:2: not UTF-8"):
        prompts_file.read(tmp_path / "latin.txt", Settings())


@pytest.mark.parametrize("name", ["plain.txt", "a1111.txt", "jobs.jsonl", "img2img.txt"])
def test_the_example_files_are_valid(name):
    jobs = prompts_file.read(PROMPTS / name, Settings())
    assert jobs and all(j.settings.prompt for j in jobs)


def test_numbers_are_checked_as_flags_are_and_named_as_the_line_names_them(tmp_path):
    lines = ["--prompt x --cfg_scale nan", "--prompt x --cfg_scale 1e30", "--prompt x --steps 100000000",
             "--prompt x --width 8192 --height 8192", "--prompt x --n_iter 100 --batch_size 1000", "a plain prompt"]
    with pytest.raises(LdmError) as e:
        read(tmp_path, "\n".join(lines), defaults=Settings(width=99_999))
    got = {int(line.split(":")[1]): line.split(": ", 1)[1] for line in str(e.value).splitlines()[1:]}
    assert got == {1: "--cfg_scale must be between 0 and 100 (got nan)",
                   2: "--cfg_scale must be between 0 and 100 (got 1e+30)",
                   3: "--steps must be between 1 and 1000 (got 100000000)",
                   4: "the image size must be at most 16,777,216 pixels (got 8192x8192); set LDM_MAX_PIXELS to allow more",
                   5: "--batch_size x --n_iter must be at most 10000 images (got 100000)",
                   6: "--width must be at most 16384 (got 99999)"}  # the command's own -W, named as its flag


def test_jsonl_numbers_are_named_as_json_keys(tmp_path):
    with pytest.raises(LdmError) as e:
        read(tmp_path, '{"prompt": "x", "cfg_scale": NaN}\n{"prompt": "x", "steps": 5000}\n', name="p.jsonl")
    assert 'p.jsonl:1: "cfg_scale" must be between 0 and 100 (got nan)' in str(e.value)
    assert 'p.jsonl:2: "steps" must be between 1 and 1000 (got 5000)' in str(e.value)


def test_prompt_weights_are_checked_as_flags_are(tmp_path):
    huge = "9" * 400
    lines = [f'--prompt "(red circle:{huge})"', f'--prompt x --negative_prompt "a AND (b:{huge})"',
             "(" * 101 + "fox", '{"prompt": "a AND b:' + huge + '"}']
    with pytest.raises(LdmError) as e:
        read(tmp_path, "\n".join(lines[:3]))
    got = {int(line.split(":")[1]): line.split(": ", 1)[1] for line in str(e.value).splitlines()[1:]}
    assert got == {1: "--prompt may weight words by -100 to 100 (nested brackets multiply) (got inf on 'red circle')",
                   2: "--negative_prompt may weight words by -100 to 100 (nested brackets multiply) (got inf on 'b')",
                   3: "--prompt may nest brackets at most 100 deep (got 101)"}
    with pytest.raises(LdmError, match=r"p.jsonl:1: \"prompt\" may weight an AND part by -100 to 100 \(got inf on 'b'\)"):
        read(tmp_path, lines[3] + "\n", name="p.jsonl")
