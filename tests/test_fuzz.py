"""A bounded fuzz test over every parser that reads input anyone could have made: prompt syntax
(weights, AND, BREAK, editing, alternation, <lora:...> tags), a PNG's chunks (A1111's
`parameters` text and ldm's JSON), prompts-file lines (plain, A1111 `--option` lines, JSONL),
manifest lines, safetensors and GGUF headers, and LoRA files merged into a tiny module.

Each parser gets random input and structured mutations of a valid example (one field, count or
byte changed). The only exception allowed is LdmError (one line, exit status 2 at the CLI).

Bounds, per example: hypothesis's deadline of 5 s (a slow example fails), a SIGALRM after 20 s
(a hang fails instead of stalling the run), and at most 256 MiB more peak memory, both of the
process (ru_maxrss, which sees torch and numpy) and of Python's allocations (tracemalloc).
Whole file: 200 examples per parser, derandomized (the same examples every run, so CI is
reproducible), about 20 s on two shared cores; LDM_FUZZ_EXAMPLES raises the examples per parser
for a longer local hunt. The regression tests at the end are what it found.
"""
from __future__ import annotations

import json
import math
import os
import resource
import signal
import struct
import sys
import tracemalloc
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from ldm_cli import commands, control_units, images, infotext, manifest, prompt_syntax, prompts_file, render
from ldm_cli.errors import LdmError
from ldm_cli.loading import gguf_header, tensors
from ldm_cli.networks import formats, lookup, merge, session, tags
from ldm_cli.networks.lookup import NetworkOptions
from ldm_cli.networks.targets import DENOISER, Target
from ldm_cli.settings import Settings

EXAMPLES = int(os.environ.get("LDM_FUZZ_EXAMPLES", "200"))
DEADLINE = timedelta(seconds=5)
HANG_S = 20
MEMORY_BOUND = 256 * 2**20
FUZZ = settings(max_examples=EXAMPLES, deadline=DEADLINE, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


class Hang(Exception):
    """An example ran past HANG_S."""


def _alarm(signum, frame):
    raise Hang(f"still running after {HANG_S} s")


@contextmanager
def bounded() -> Iterator[None]:
    """Run the block within the time and memory bounds; LdmError is the one failure allowed."""
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_S)
    tracemalloc.start()
    try:
        yield
    except LdmError:
        pass  # the refusal a user sees: one line at the CLI, exit status 2
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        python_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
    assert python_peak < MEMORY_BOUND, f"Python allocations peaked at {python_peak:,} bytes"
    assert grown < MEMORY_BOUND, f"the process's peak memory grew by {grown:,} bytes"


def check(call: Callable[..., Any], *args: Any) -> None:
    with bounded():
        call(*args)


def _refuse() -> None:
    raise LdmError("refused")


def _spin() -> None:
    while True:
        pass


def test_the_bounds_catch_what_they_bound(monkeypatch):
    """The harness itself: LdmError passes; another exception, a hang and memory past the bound fail."""
    check(_refuse)
    with pytest.raises(KeyError):
        check(lambda: {}["x"])
    monkeypatch.setattr(sys.modules[__name__], "HANG_S", 0.2)
    with pytest.raises(Hang):
        check(_spin)
    monkeypatch.setattr(sys.modules[__name__], "MEMORY_BOUND", 8 * 2**20)
    with pytest.raises(AssertionError, match="Python allocations peaked"):
        check(lambda: bytes(16 * 2**20))


# -- strategies -----------------------------------------------------------------------------
WORDS = ["a", "fox", "AND", "BREAK", "(", ")", "[", "]", ":", "|", "\\", "\\(", "0.5", "1.2", "-1", "3", "1e5",
         ".", "::", " ", "\n", "<lora:fox:0.8>", "<lora:", ">", "<lyco:x:te=1:unet=2>", "<lora::>", "=", ",",
         "nan", "inf", "1e999", "é", "\0", "\ud800"]
prompt_text = st.one_of(st.text(max_size=200),
                        st.lists(st.sampled_from(WORDS) | st.text(max_size=4), max_size=60).map("".join))
# names a path could be read as: an unknown user's home, a name too long, a NUL, a device
# (and a lone surrogate, which JSON's "\ud800" escape decodes to)
PATHS = st.sampled_from(["~nosuchuser/x", "~", "x" * 300, "a\0b", "", ".", "..", "/", "/dev/zero", "fox", "\ud800"])
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | PATHS
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
numbers_as_text = st.one_of(st.integers().map(str), st.floats().map(str), st.sampled_from(
    ["", " ", "1e999", "-0", "0x10", "1_000", "nan", "١٢", "9" * 400, "512x512", "x", "1.5.2"]), PATHS)


# -- prompt syntax ----------------------------------------------------------------------------
def read_prompt(text: str, steps: int) -> None:
    """What a run does with a prompt before and after the model loads, short of encoding it."""
    Settings(prompt=text, negative=text, steps=steps).validate()
    positive, _ = prompt_syntax.extra_networks(text)
    tags.lora_tags(text)
    for part, _ in prompt_syntax.and_parts(positive):
        for _, scheduled in prompt_syntax.schedule(part, steps):
            prompt_syntax.emphasis(scheduled)
    session.encoded_texts(text, steps)
    session.encoded_texts(text, steps, negative=True)


@FUZZ
@given(prompt_text, st.integers(1, 1000))
def test_prompt_syntax(text, steps):
    check(read_prompt, text, steps)


# -- a PNG's chunks ----------------------------------------------------------------------------
VALID = Settings(prompt="a (fox:1.2) [in|on] snow <lora:fox:0.8>", negative="blurry", steps=20, cfg=7.5, seed=1,
                 width=512, height=768, scheduler="dpmpp_2m", schedule="karras", strength=0.5, mask_blur=4,
                 model_name="tiny", model_hash="abcdef0123", clip_skip=2, rng="nv")


def write_png(path: Path, chunks: dict[str, str]) -> Path:
    """A PNG with these text chunks (made UTF-8 first: a chunk's bytes hold no lone surrogate)."""
    texts = {k: v.encode("utf-8", "surrogatepass").decode("utf-8", "replace") for k, v in chunks.items()}
    Image.new("RGB", (8, 8)).save(path, pnginfo=images.png_info(texts))
    return path


def read_png(path: Path) -> None:
    """--from-png up to loading the model: the settings read and checked, the recorded model,
    LoRAs and ControlNet files looked for (in an empty models folder)."""
    models = path.parent / "models"
    models.mkdir(exist_ok=True)
    replayed = commands.base_settings(Settings(), path, str(models))
    for unit in control_units.from_text(replayed.controlnet):
        unit.validate()
    lookup.check_loras(replayed, NetworkOptions())
    replayed.to_infotext("fuzz")


def mutated_infotext(draw_value: str, which: int, how: int) -> str:
    prompt, negative, params = infotext.parse_infotext(VALID.to_infotext("1.0"))
    keys = list(params)
    key = keys[which % len(keys)]
    if how == 0:
        params[key] = draw_value
    elif how == 1:
        del params[key]
    else:
        params[draw_value] = params[key]
    return infotext.format_infotext(prompt, negative, params)


infotexts = st.one_of(
    st.text(max_size=300),
    st.builds(mutated_infotext, numbers_as_text | st.text(max_size=30), st.integers(0, 40), st.integers(0, 2)),
)


@FUZZ
@given(infotexts)
def test_png_parameters_text(tmp_path_factory, text):
    path = write_png(tmp_path_factory.mktemp("png") / "p.png", {"parameters": text})
    check(read_png, path)


def mutated_record(key: str, value: Any) -> str:
    record = VALID.to_dict()
    record[key] = value
    return json.dumps(record)


ldm_chunks = st.one_of(
    st.text(max_size=200),
    json_values.map(json.dumps),
    st.builds(mutated_record, st.sampled_from(list(VALID.to_dict()) + ["controlnet", "padding", "x"]), json_values),
    st.builds(lambda c, i: mutated_record("controlnet", json.dumps([{"controlnet": c, "image": i}])), PATHS, PATHS),
)


@FUZZ
@given(ldm_chunks, st.booleans())
def test_png_ldm_chunk(tmp_path_factory, text, with_parameters):
    chunks = {"ldm": text, **({"parameters": VALID.to_infotext("1.0")} if with_parameters else {})}
    path = write_png(tmp_path_factory.mktemp("png") / "p.png", chunks)
    check(read_png, path)


@pytest.fixture(scope="module")
def png_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("png") / "valid.png"
    return write_png(path, render.metadata(VALID)).read_bytes()


def mutated_bytes(data: bytes, at: int, value: bytes, cut: bool) -> bytes:
    at %= len(data) + 1
    return data[:at] + value if cut else data[:at] + value + data[at + len(value):]


@FUZZ
@given(st.integers(0, 2**20), st.binary(min_size=1, max_size=8), st.booleans())
def test_png_bytes(tmp_path_factory, png_bytes, at, value, cut):
    path = tmp_path_factory.mktemp("png") / "m.png"
    path.write_bytes(mutated_bytes(png_bytes, at, value, cut))
    check(read_png, path)


# -- prompts files and manifests ---------------------------------------------------------------
def option_line(pairs: list[tuple[str, str]]) -> str:
    import shlex

    return " ".join(f"--{k} {shlex.quote(v)}" for k, v in pairs)


option_lines = st.lists(st.tuples(st.sampled_from(list(prompts_file.KEYS) + ["subseed", "promp", ""]),
                                  numbers_as_text | st.text(max_size=12)), max_size=5).map(
    lambda pairs: option_line([("prompt", "a fox"), *pairs]))
VALID_LINE = {"prompt": "a fox", "negative_prompt": "blur", "steps": 20, "cfg_scale": 7, "seed": 3, "width": 512,
              "height": 512, "sampler_name": "Euler a", "batch_size": 2, "n_iter": 2, "clip_skip": 2, "rng": "cpu"}
jsonl_lines = st.one_of(
    json_values.map(json.dumps),
    st.builds(lambda k, v: json.dumps({**VALID_LINE, k: v}), st.sampled_from(list(prompts_file.KEYS)), json_values),
)
plain_lines = prompt_text.map(lambda t: t.replace("\n", " "))


def read_prompts(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    for job in prompts_file.read(path, Settings()):
        render.per_image(job.settings, min(job.count, 4))


@FUZZ
@given(st.lists(plain_lines | option_lines, min_size=1, max_size=4))
def test_prompts_file_lines(tmp_path_factory, lines):
    check(read_prompts, tmp_path_factory.mktemp("batch") / "prompts.txt", "\n".join(lines))


@FUZZ
@given(st.lists(jsonl_lines, min_size=1, max_size=4))
def test_prompts_file_jsonl(tmp_path_factory, lines):
    check(read_prompts, tmp_path_factory.mktemp("batch") / "prompts.jsonl", "\n".join(lines))


VALID_RECORD = {"path": "00000-1.png", "line": 1, "index": 0, **VALID.to_dict()}


def read_manifest(folder: Path, data: bytes) -> None:
    (folder / manifest.NAME).write_bytes(data)
    (folder / "00000-1.png").write_bytes(b"")
    records = manifest.Manifest(folder)
    records.find({"line": 1, "index": 0, "seed": 1})
    records.count_new()


manifest_lines = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda k, v: json.dumps({**VALID_RECORD, k: v}).encode(), st.sampled_from(list(VALID_RECORD)),
              json_values),
)


@FUZZ
@given(st.lists(manifest_lines, min_size=1, max_size=4))
def test_manifest_lines(tmp_path_factory, lines):
    check(read_manifest, tmp_path_factory.mktemp("out"), b"\n".join(lines))


# -- safetensors and GGUF headers ---------------------------------------------------------------
def read_checkpoint(path: Path) -> None:
    """What loading and `ldm info` do with a file: its header, then every tensor."""
    checkpoint = tensors.open_checkpoint(path)
    tensors.dtype_name(checkpoint)
    for key in checkpoint.shapes:
        checkpoint.get(key).float().sum()
        checkpoint.release(key)


def safetensors_file(path: Path) -> bytes:
    save_file({"a.weight": torch.ones(4, 8), "b.bias": torch.zeros(3, dtype=torch.float16)}, str(path),
              metadata={"format": "pt"})
    return path.read_bytes()


def forged_safetensors(valid: bytes, key: str, field: str, value: Any) -> bytes:
    n = int.from_bytes(valid[:8], "little")
    header = json.loads(valid[8:8 + n])
    if field == "__entry__":
        header[key] = value
    else:
        header.setdefault(key, {})
        if isinstance(header[key], dict):
            header[key][field] = value
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + valid[8 + n:]


def consistent_entry(valid: bytes, key: str, shape: Any, dtype: str) -> bytes:
    """A header entry whose offsets agree with its (fuzzed) shape and dtype: only the shape can be wrong."""
    try:
        nbytes = math.prod(shape) * tensors.ITEMSIZE.get(dtype, 1)
    except TypeError:
        nbytes = 0
    offsets = [0, nbytes if isinstance(nbytes, int) and 0 <= nbytes < 2**64 else 0]
    return forged_safetensors(valid, key, "__entry__", {"dtype": dtype, "shape": shape, "data_offsets": offsets})


shape_values = st.one_of(json_values, st.lists(st.integers(-2, 2**70) | st.sampled_from([0, 1, 2**31, 2**63]),
                                               max_size=70))


@FUZZ
@given(st.data())
def test_safetensors_headers(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("st")
    valid = safetensors_file(folder / "valid.safetensors")
    forged = data.draw(st.one_of(
        st.builds(forged_safetensors, st.just(valid), st.sampled_from(["a.weight", "b.bias", "__metadata__", "c"]),
                  st.sampled_from(["shape", "dtype", "data_offsets", "__entry__"]),
                  shape_values | st.sampled_from(list(tensors.ITEMSIZE) + ["F4", ""])),
        st.builds(mutated_bytes, st.just(valid), st.integers(0, 400), st.binary(min_size=1, max_size=8),
                  st.booleans()),
        st.binary(max_size=64).map(lambda b: struct.pack("<Q", len(b)) + b),
        st.builds(consistent_entry, st.just(valid), st.sampled_from(["a.weight", "c"]),
                  st.lists(st.sampled_from([0, 1, 2, True, -1, 2**31, 2**63, 2**70]), max_size=70) | json_values,
                  st.sampled_from(sorted(tensors.ITEMSIZE))),
    ))
    path = folder / "m.safetensors"
    path.write_bytes(forged)
    check(read_checkpoint, path)


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    import gguf

    path = tmp_path_factory.mktemp("gguf") / "valid.gguf"
    writer = gguf.GGUFWriter(str(path), "flux")
    writer.add_array("tokenizer.tokens", ["a", "bc"])
    writer.add_string("general.name", "tiny")
    writer.add_tensor("a.weight", np.ones((4, 32), np.float32))
    writer.add_tensor("b.weight", np.ones((2, 64), np.float16))
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file,
                  writer.close):
        write()
    import diffusers.quantizers.gguf.utils  # noqa: F401  imported once here, not inside the first example's deadline

    return path.read_bytes()


def read_gguf(path: Path) -> None:
    gguf_header.check(path)
    read_checkpoint(path)


@FUZZ
@given(st.integers(4, 400), st.one_of(st.binary(min_size=1, max_size=8),
                                      st.sampled_from([2**32 - 1, 2**63, 0, 1, 9, 30]).map(
                                          lambda n: struct.pack("<Q", n))), st.booleans())
def test_gguf_headers(tmp_path_factory, gguf_bytes, at, value, cut):
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    path.write_bytes(mutated_bytes(gguf_bytes, at, value, cut))
    check(read_gguf, path)


# -- LoRA files ----------------------------------------------------------------------------------
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 6)
        self.conv = torch.nn.Conv2d(4, 6, 3)


LAYERS = {"lora_unet_proj": [Target(DENOISER, "proj")], "lora_unet_conv": [Target(DENOISER, "conv")],
          "lora_unet_qkv": [Target(DENOISER, "proj", part=i, split=(2, 2, 2)) for i in range(3)]}
FACTOR_NAMES = sorted(formats.FACTORS) + ["lora_A.weight", "lora_B.weight", "weird"]
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool, "I64": torch.int64, "F8_E4M3": torch.float8_e4m3fn}
lora_entries = st.dictionaries(
    st.tuples(st.sampled_from(["lora_unet_proj", "lora_unet_conv", "lora_unet_qkv", "unet.proj", "lora_te1_x"]),
              st.sampled_from(FACTOR_NAMES)).map(".".join),
    st.tuples(st.lists(st.integers(0, 6), max_size=4), st.sampled_from(sorted(DTYPES))), min_size=1, max_size=6)


def valid_lora() -> dict[str, tuple[list[int], str]]:
    return {"lora_unet_proj.lora_down.weight": ([2, 4], "F32"), "lora_unet_proj.lora_up.weight": ([6, 2], "F32"),
            "lora_unet_proj.alpha": ([], "F32"), "lora_unet_conv.lora_down.weight": ([2, 4, 3, 3], "F16"),
            "lora_unet_conv.lora_up.weight": ([6, 2, 1, 1], "F16")}


def write_lora(path: Path, entries: dict[str, tuple[list[int], str]]) -> Path:
    g = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(shape, generator=g).to(DTYPES[dtype]) for k, (shape, dtype) in entries.items()},
              str(path))
    return path


def apply_lora(path: Path, te: float, unet: float) -> None:
    """`<lora:...>` on a tiny module: the file read, checked against it, merged and restored."""
    formats.peek(path, allow_pickle=False)
    lora = formats.open_lora(path, allow_pickle=False)
    module = Tiny()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    components = {DENOISER: module}
    merger = merge.Merger()
    merger.merge(components, merge.plan(components, LAYERS, [merge.Applied(lora, te, unet)]))
    merger.restore()
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


@FUZZ
@given(st.data())
def test_lora_files(tmp_path_factory, data):
    entries = data.draw(st.one_of(lora_entries, st.builds(
        lambda key, shape: {**valid_lora(), key: shape}, st.sampled_from(list(valid_lora())),
        st.tuples(st.lists(st.integers(0, 6), max_size=4), st.sampled_from(sorted(DTYPES))))))
    path = write_lora(tmp_path_factory.mktemp("lora") / "fox.safetensors", entries)
    check(apply_lora, path, data.draw(st.floats(-10, 10)), data.draw(st.floats(-10, 10)))


# -- what the fuzzer found, each as a plain regression test -------------------------------------
def one_line_error(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ldm: error: "), result.stderr
    assert all(w in lines[0] for w in words), lines[0]


@pytest.mark.parametrize("value", ["~nosuchuser/fox.png", "x" * 300])
def test_a_prompts_file_path_of_an_unknown_user_or_too_long_a_name_is_a_bad_line(tmp_path, value):
    from typer.testing import CliRunner

    from ldm_cli.cli import app

    path = tmp_path / "p.txt"
    path.write_text(f"--prompt a fox --init_image '{value}'\n--prompt a fox --model '{value}'\n")
    result = CliRunner().invoke(app, ["batch", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.stderr.startswith(f"ldm: error: 2 bad lines in {path}; nothing was rendered\n")
    assert result.stderr.count("no such file or folder") == 2, result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("record, words", [
    ({"prompt": "a", "model_name": "x" * 300}, ["was made with the model 'xxx", "which is not in"]),
    ({"prompt": "a", "model_name": "\ud800"}, ["holds '\\ud800', a lone surrogate"]),
    ({"prompt": "a", "controlnet": json.dumps([{"controlnet": "~nosuchuser/cn", "image": "x" * 300}])},
     ["--controlnet '~nosuchuser/cn' does not exist"]),
])
def test_a_png_recording_names_no_file_can_have_is_one_line(tmp_path, record, words):
    from typer.testing import CliRunner

    from ldm_cli.cli import app

    png = write_png(tmp_path / "x.png", {"ldm": json.dumps(record)})
    (tmp_path / "models").mkdir()
    result = CliRunner().invoke(app, ["generate", "--from-png", str(png), "--models-dir", str(tmp_path / "models"),
                                      "--out", str(tmp_path / "o")])
    one_line_error(result, *words)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("shape", [[0, 2**70], [2**63, 0], [0, 2**62, 4], [True, 4], {}])
def test_a_safetensors_shape_torch_cannot_make_is_corrupt(tmp_path, shape):
    from typer.testing import CliRunner

    from ldm_cli.cli import app

    header = json.dumps({"t": {"dtype": "F32", "shape": shape, "data_offsets": [0, 16 if shape == [True, 4] else 0]}})
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(16))
    with pytest.raises(LdmError, match="the header entry for 't' is malformed"):
        tensors.open_checkpoint(path)
    one_line_error(CliRunner().invoke(app, ["info", str(path)]), "t.safetensors is truncated or corrupt")


@pytest.mark.parametrize("change, words", [
    ({"lora_unet_proj.alpha": ([2], "F32")}, r"lora_unet_proj.alpha is \[2\], not one number"),
    ({"lora_unet_proj.lora_up.weight": ([6, 3], "F32")}, "lora_unet_proj.lora_up.weight has rank 3 where"),
    ({"lora_unet_proj.lora_down.weight": ([0, 4], "F32")}, r"lora_unet_proj.lora_down.weight is \[0, 4\]"),
    ({"lora_unet_conv.lora_up.weight": ([], "F16")}, r"lora_unet_conv.lora_up.weight is \[\]"),
])
def test_a_lora_whose_factors_do_not_fit_together_is_refused_before_any_weight_changes(tmp_path, change, words):
    """Refused as the file is opened, from its header: no weight is ever touched."""
    with pytest.raises(LdmError, match="fox.safetensors is not a usable LoRA: " + words):
        formats.open_lora(write_lora(tmp_path / "fox.safetensors", {**valid_lora(), **change}), False)


def test_a_lora_alpha_that_is_not_finite_is_refused(tmp_path):
    path = tmp_path / "fox.safetensors"
    save_file({**{k: torch.ones(shape) for k, (shape, _) in valid_lora().items()},
               "lora_unet_proj.alpha": torch.tensor(float("nan"))}, str(path))
    with pytest.raises(LdmError, match="fox.safetensors is not a usable LoRA: lora_unet_proj.alpha is nan"):
        merge.plan({DENOISER: Tiny()}, LAYERS, [merge.Applied(formats.open_lora(path, False))])
