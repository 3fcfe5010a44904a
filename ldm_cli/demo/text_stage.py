"""The text encoder stage. Stable Diffusion's text encoder comes pretrained; ours is pretrained
here, to read a caption's attributes back from its summary tokens (a linear head per attribute).
Trained only jointly with the denoiser, it kept colour and shape but let the position words
collapse into one another (the U-Net, not yet using them, sent them no distinguishing gradient),
and position stayed at chance."""
from __future__ import annotations

import functools
import random
import re
from pathlib import Path

import torch

from ldm_cli.demo import architecture, scenes
from ldm_cli.demo.resumable import Checkpoint, log, run_steps

CFG_DROP = 0.1  # share of captions replaced by "" so the model learns the unconditional case
ATTRIBUTE_DROP = 0.15  # chance that a caption leaves out each attribute but the shape
# Every training caption holding both "blue" and "cross" names a blue background (the blue cross
# is held out), and an encoder trained on those alone learnt the confound: it read "a blue cross"
# as a white one. With the shape word often swapped for another word of the vocabulary, the colour
# has to be read from word order, whatever object it goes with.
OBJECT_SWAP = 0.3  # share of captions whose shape word is swapped
WORD_LOSS = 0.3  # weight of the read-outs at single words (colour at the object, background at "background")
# The U-Net reads a caption mostly from the states after its end-of-text token: given those of
# a seen wording in place of a held-out wording's own, the previous model drew 35 of 36 colours
# right instead of 22. So this stage pulls those states of two wordings of a caption together,
# and a new order of the same words lands near states the U-Net was trained on.
WORDING_LOSS = 1.0  # weight of wording_distance between two seen wordings of each caption
SHAPE_WORD = re.compile(r"\b(" + "|".join(scenes.SHAPES) + r")\b")

VALUES = {"shape": scenes.SHAPES, "color": tuple(scenes.COLORS), "position": tuple(scenes.POSITIONS),
          "size": tuple(scenes.SIZES), "background": tuple(scenes.BACKGROUNDS)}


def training_captions(scene: scenes.Scene, rng: random.Random, wordings: int = 1) -> tuple[list[str], dict[str, int]]:
    """One caption in `wordings` different seen wordings (CFG_DROP of them empty) and, per
    attribute, the index of the value it names, len(values) when it names none."""
    if rng.random() < CFG_DROP:
        return [""] * wordings, {a: len(v) for a, v in VALUES.items()}
    keep = {"shape"} | {a for a in scenes.ATTRIBUTES[1:] if rng.random() >= ATTRIBUTE_DROP}
    texts = [scenes.caption(scene, w, keep) for w in rng.sample(scenes.SEEN_WORDINGS, wordings)]
    return texts, {a: v.index(getattr(scene, a)) if a in keep else len(v) for a, v in VALUES.items()}


@functools.cache
def stand_in_words() -> tuple[str, ...]:
    """Whole words of the CLIP vocabulary (3+ letters) that are not words of this world."""
    world = {w for text in (*VALUES["shape"], *VALUES["color"], *VALUES["position"], *VALUES["size"],
                            *VALUES["background"], *scenes.PHRASES.values(), "background") for w in text.split()}
    vocabulary = architecture.tokenizer().get_vocab()
    return tuple(sorted(w[:-4] for w in vocabulary if w.endswith("</w>") and len(w) >= 7
                        and w[:-4].isascii() and w[:-4].isalpha() and w[:-4] not in world))


def swap_object(texts: list[str], labels: dict[str, int], rng: random.Random
                ) -> tuple[list[str], dict[str, int], str | None]:
    """With chance OBJECT_SWAP, the wordings of a caption with their shape word replaced by one
    stand-in word (the shape then counts as not named); and the object word (None if empty)."""
    if not texts[0]:
        return texts, labels, None
    if rng.random() >= OBJECT_SWAP:
        return texts, labels, SHAPE_WORD.search(texts[0]).group(0)
    word = rng.choice(stand_in_words())
    return [SHAPE_WORD.sub(word, t) for t in texts], {**labels, "shape": len(VALUES["shape"])}, word


class Probe(torch.nn.Module):
    """A linear read-out per attribute (its values, plus "not named") from the summary tokens, and
    two at single words: the colour at the object word, the background at the word "background"."""

    def __init__(self, width: int):
        super().__init__()
        self.heads = torch.nn.ModuleDict({a: torch.nn.Linear(width, len(v) + 1) for a, v in VALUES.items()})
        self.word_heads = torch.nn.ModuleDict({a: torch.nn.Linear(width, len(VALUES[a]) + 1)
                                               for a in ("color", "background")})

    def forward(self, hidden: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {a: head(summary(hidden, ids)) for a, head in self.heads.items()}

    def word_loss(self, hidden: torch.Tensor, ids: torch.Tensor, labels: list[dict[str, int]],
                  word_ids: list[dict[str, int]]) -> torch.Tensor:
        """Cross-entropy of the word read-outs; word_ids[i] maps an attribute to the token whose
        state it is read at in caption i."""
        losses = []
        for attribute, head in self.word_heads.items():
            rows = [i for i, words in enumerate(word_ids) if attribute in words]
            if rows:
                columns = [ids[i].tolist().index(word_ids[i][attribute]) for i in rows]
                want = torch.tensor([labels[i][attribute] for i in rows], device=hidden.device)
                losses.append(torch.nn.functional.cross_entropy(head(hidden[rows, columns]), want))
        return sum(losses) / max(len(losses), 1)


def after_end(ids: torch.Tensor) -> torch.Tensor:
    """True at the end-of-text token and the padding after it."""
    return (ids == architecture.text_config()["eos_token_id"]).long().cumsum(dim=1) > 0


def summary(hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The mean of the states from the end-of-text token on: each has seen the whole caption,
    and they are most of what the U-Net's cross-attention sees."""
    weights = after_end(ids).to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1)


def wording_distance(hidden_a: torch.Tensor, ids_a: torch.Tensor, hidden_b: torch.Tensor,
                     ids_b: torch.Tensor) -> torch.Tensor:
    """How far apart two wordings of the same captions (row by row) put the states after the end
    of the text, position by position where both have ended, over how far apart those of two
    different captions lie (each row and the one before it in wording a). The denominator keeps
    its gradient: with it held fixed, a small encoder met the loss by making every caption alike."""
    both = (after_end(ids_a) & after_end(ids_b)).unsqueeze(-1).to(hidden_a.dtype)
    gap = ((hidden_a - hidden_b).pow(2) * both).sum() / both.sum()
    other = both * after_end(ids_a.roll(1, dims=0)).unsqueeze(-1).to(hidden_a.dtype)
    spread = ((hidden_a - hidden_a.roll(1, dims=0)).pow(2) * other).sum() / other.sum()
    return gap / spread.clamp_min(1e-12)  # 0, not NaN, when every caption is empty


def train_text(args) -> None:
    torch.manual_seed(args.seed)
    encoder = architecture.text_encoder().to(args.device)
    probe = Probe(encoder.config.hidden_size).to(args.device)
    optimizer = torch.optim.AdamW(list(encoder.parameters()) + list(probe.parameters()), lr=args.lr, weight_decay=0.0)
    checkpoint = Checkpoint(args.out / "text_stage", {"text_encoder": encoder}, optimizer, {"probe": probe})
    captions = Captions()

    def step_fn(step: int):
        rng = random.Random(args.seed * 1_000_003 + step)
        pairs = [swap_object(*training_captions(scenes.random_scene(rng), rng, wordings=2), rng)
                 for _ in range(args.batch // 2)]
        half = len(pairs)  # row i and row half + i are two wordings of one caption
        texts = [p[0][0] for p in pairs] + [p[0][1] for p in pairs]
        labels, objects = [p[1] for p in pairs] * 2, [p[2] for p in pairs] * 2
        ids = captions.ids(texts).to(args.device)
        hidden = encoder(ids)[0]
        logits = probe(hidden, ids)
        losses = [torch.nn.functional.cross_entropy(logits[a], torch.tensor([l[a] for l in labels], device=args.device))
                  for a in VALUES]
        summary_loss = sum(losses) / len(losses)
        words = [read_at(captions, o, l) for o, l in zip(objects, labels)]
        wording = wording_distance(hidden[:half], ids[:half], hidden[half:], ids[half:])
        return (summary_loss + WORD_LOSS * probe.word_loss(hidden, ids, labels, words) + WORDING_LOSS * wording,
                summary_loss.item())

    def after_step(step: int) -> None:
        if (step + 1) % args.report == 0 or step + 1 == args.steps:
            log(args.out, f"text step {step + 1}: {probe_report(encoder, probe, captions)}")

    run_steps(args, checkpoint, step_fn, "text", after_step)


def read_at(captions: Captions, object_word: str | None, labels: dict[str, int]) -> dict[str, int]:
    """The tokens a caption's word read-outs are taken at: the object word's for its colour, and
    "background" for the background, where the caption names one."""
    if object_word is None:
        return {}
    words = {"color": captions.word_id(object_word)}
    if labels["background"] < len(VALUES["background"]):
        words["background"] = captions.word_id("background")
    return words


def probe_report(encoder, probe: Probe, captions: Captions) -> str:
    accuracy = probe_accuracy(encoder, probe, captions)
    gaps = wording_gaps(encoder, captions)
    return ("probe reads back " + ", ".join(f"{group} {share:.1%}" for group, share in accuracy.items())
            + "; wording distance " + ", ".join(f"{group} {gap:.3f}" for group, gap in gaps.items()))


@torch.inference_mode()
def probe_accuracy(encoder, probe: Probe, captions: Captions) -> dict[str, float]:
    """How many of the attributes of the gate's captions the probe reads back, per group: what
    the encoder makes of held-out wordings and colour-shape pairs."""
    from ldm_cli.demo import evaluate, gate

    cases = gate.prompt_set(64)
    ids = captions.ids([c.prompt for c in cases]).to(encoder.device)
    logits = probe(encoder(ids)[0], ids)
    accuracy = {}
    for group in gate.GROUPS:
        rows = [i for i, c in enumerate(cases) if c.group == group]
        truth = [evaluate.parse(cases[i].prompt) for i in rows]
        right = sum(logits[a][i].argmax().item() == VALUES[a].index(t[a]) for i, t in zip(rows, truth) for a in t)
        accuracy[group] = right / sum(len(t) for t in truth)
    return accuracy


@torch.inference_mode()
def wording_gaps(encoder, captions: Captions) -> dict[str, float]:
    """wording_distance between the gate's seen and held-out wording captions and the same
    captions in another seen wording: near 0 when the U-Net will see the same states."""
    from ldm_cli.demo import gate

    cases = gate.prompt_set(64)
    gaps = {}
    for group in ("seen", "held-out wording"):
        prompts = [c.prompt for c in cases if c.group == group]
        others = [reworded(p, i) for i, p in enumerate(prompts)]
        a, b = captions.ids(prompts).to(encoder.device), captions.ids(others).to(encoder.device)
        gaps[group] = wording_distance(encoder(a)[0], a, encoder(b)[0], b).item()
    return gaps


def reworded(prompt: str, i: int) -> str:
    """A full caption in the i-th seen wording, or the next one where that gives the same text."""
    from ldm_cli.demo import evaluate

    scene, n = scenes.Scene(**evaluate.parse(prompt)), len(scenes.SEEN_WORDINGS)
    texts = [scenes.caption(scene, scenes.SEEN_WORDINGS[(i + k) % n], set(scenes.ATTRIBUTES)) for k in range(n)]
    return next(t for t in texts if t != prompt)


class Captions:
    """Token ids for training captions, each caption (and word) tokenized once."""

    def __init__(self):
        self.tokenizer, self.cache, self.word_ids = architecture.tokenizer(), {}, {}

    def ids(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            tokens = self.tokenizer(missing, padding="max_length", truncation=True,
                                    max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
            self.cache.update(zip(missing, tokens))
        return torch.stack([self.cache[t] for t in texts])

    def word_id(self, word: str) -> int:
        """The token that ends `word` (CLIP's tokenizer splits words alike in any caption)."""
        if word not in self.word_ids:
            self.word_ids[word] = self.tokenizer(word, add_special_tokens=False).input_ids[-1]
        return self.word_ids[word]


def captions_for(table: list[list[str]], indices: list[int], rng: random.Random) -> list[str]:
    """Seen wordings with attributes randomly left out; CFG_DROP of them empty."""
    return [training_captions(scenes.Scene(*table[i]), rng)[0][0] for i in indices]


def text_stage_encoder(out: Path):
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(out / "text_stage" / "text_encoder", dtype=torch.float32).eval().requires_grad_(False)
