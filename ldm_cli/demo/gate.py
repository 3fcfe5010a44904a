"""The built-in model's release gate: render a fixed prompt set through ldm's own pipeline and
score each image with the evaluator, per attribute, apart for seen and held-out prompts."""
from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from ldm_cli.demo import evaluate, scenes
from ldm_cli.settings import Settings

GROUPS = ("seen", "held-out pair", "held-out wording")


@dataclass(frozen=True)
class Case:
    group: str
    prompt: str
    seed: int


def prompt_set(per_group: int, seed: int = 1234) -> list[Case]:
    """Full captions (every attribute named): seen pairs in seen wordings, held-out pairs in seen
    wordings, seen pairs in held-out wordings."""
    rng, cases = random.Random(seed), []
    for group in GROUPS:
        for _ in range(per_group):
            scene = scenes.random_scene(rng, held_out=group == "held-out pair")
            wordings = scenes.HELD_OUT_WORDINGS if group == "held-out wording" else scenes.SEEN_WORDINGS
            text = scenes.caption(scene, rng.choice(wordings), set(scenes.ATTRIBUTES))
            cases.append(Case(group, text, rng.randrange(2**31)))
    return cases


def render(model, prompts: list[str], seeds: list[int], batch: int = 16, **settings) -> list[Image.Image]:
    """Images for prompts at the model's defaults (overridden by `settings`: cfg, steps, negative)."""
    from ldm_cli import pipeline

    jobs = [Settings(prompt=p, seed=s, **settings).resolve(model.defaults, model.native_size)
            for p, s in zip(prompts, seeds)]
    return [im for i in range(0, len(jobs), batch) for im in pipeline.text_to_image(model, jobs[i:i + batch])]


def score(cases: list[Case], images: list[Image.Image]) -> list[dict[str, bool]]:
    """Per case, {attribute: right} for each attribute its prompt names."""
    return [evaluate.score(image, case.prompt) for case, image in zip(cases, images)]


def accuracy(cases: list[Case], scores: list[dict[str, bool]]) -> dict[str, dict[str, float]]:
    """{group: {attribute: share right}} over the prompts naming that attribute."""
    right = {g: {a: [] for a in scenes.ATTRIBUTES} for g in GROUPS}
    for case, scored in zip(cases, scores):
        for attribute, ok in scored.items():
            right[case.group][attribute].append(ok)
    return {g: {a: sum(v) / len(v) for a, v in table.items() if v} for g, table in right.items()}


def table(scores: dict[str, dict[str, float]], counts: dict[str, int]) -> str:
    """A markdown table: one row per group, one column per attribute."""
    head = "| prompts | n | " + " | ".join(scenes.ATTRIBUTES) + " |"
    rows = [head, "|" + "---|" * (len(scenes.ATTRIBUTES) + 2)]
    for group, by_attribute in scores.items():
        cells = " | ".join(f"{by_attribute.get(a, float('nan')):.1%}" for a in scenes.ATTRIBUTES)
        rows.append(f"| {group} | {counts[group]} | {cells} |")
    return "\n".join(rows)


def captioned_grid(images: list[Image.Image], prompts: list[str], columns: int = 4, scale: int = 2) -> Image.Image:
    """Samples at `scale`x with their prompt written under each, wrapped to the cell's width."""
    side, text_h = images[0].width * scale, 60
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * side, rows * (side + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        x, y = (i % columns) * side, (i // columns) * (side + text_h)
        sheet.paste(image.resize((side, side), Image.Resampling.NEAREST), (x, y))
        draw.multiline_text((x + 2, y + side + 1), wrap(prompt, side // 6), fill="black", spacing=0)
    return sheet


def wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])
