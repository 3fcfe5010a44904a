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
SHAPE_WORD = re.compile(r"\b(" + "|".join(scenes.SHAPES) + r")\b")

VALUES = {"shape": scenes.SHAPES, "color": tuple(scenes.COLORS), "position": tuple(scenes.POSITIONS),
          "size": tuple(scenes.SIZES), "background": tuple(scenes.BACKGROUNDS)}


def training_caption(scene: scenes.Scene, rng: random.Random) -> tuple[str, dict[str, int]]:
    """A seen-wording caption (CFG_DROP of them empty) and, per attribute, the index of the value
    it names, len(values) when it names none."""
    if rng.random() < CFG_DROP:
        return "", {a: len(v) for a, v in VALUES.items()}
    keep = {"shape"} | {a for a in scenes.ATTRIBUTES[1:] if rng.random() >= ATTRIBUTE_DROP}
    text = scenes.caption(scene, rng.choice(scenes.SEEN_WORDINGS), keep)
    return text, {a: v.index(getattr(scene, a)) if a in keep else len(v) for a, v in VALUES.items()}


@functools.cache
def stand_in_words() -> tuple[str, ...]:
    """Whole words of the CLIP vocabulary (3+ letters) that are not words of this world."""
    world = {w for text in (*VALUES["shape"], *VALUES["color"], *VALUES["position"], *VALUES["size"],
                            *VALUES["background"], *scenes.PHRASES.values(), "background") for w in text.split()}
    vocabulary = architecture.tokenizer().get_vocab()
    return tuple(sorted(w[:-4] for w in vocabulary if w.endswith("</w>") and len(w) >= 7
                        and w[:-4].isascii() and w[:-4].isalpha() and w[:-4] not in world))


def swap_object(text: str, labels: dict[str, int], rng: random.Random) -> tuple[str, dict[str, int], str | None]:
    """With chance OBJECT_SWAP, the caption with its shape word replaced by a stand-in word (the
    shape then counts as not named); and the caption's object word (None in an empty caption)."""
    if not text:
        return text, labels, None
    if rng.random() >= OBJECT_SWAP:
        return text, labels, SHAPE_WORD.search(text).group(0)
    word = rng.choice(stand_in_words())
    return SHAPE_WORD.sub(word, text), {**labels, "shape": len(VALUES["shape"])}, word


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


def summary(hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The mean of the states from the end-of-text token on: each has seen the whole caption,
    and they are most of what the U-Net's cross-attention sees."""
    eos = architecture.text_config()["eos_token_id"]
    after = (ids == eos).long().cumsum(dim=1) > 0
    weights = after.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1)


def train_text(args) -> None:
    torch.manual_seed(args.seed)
    encoder = architecture.text_encoder().to(args.device)
    probe = Probe(encoder.config.hidden_size).to(args.device)
    optimizer = torch.optim.AdamW(list(encoder.parameters()) + list(probe.parameters()), lr=args.lr, weight_decay=0.0)
    checkpoint = Checkpoint(args.out / "text_stage", {"text_encoder": encoder}, optimizer, {"probe": probe})
    captions = Captions()

    def step_fn(step: int):
        rng = random.Random(args.seed * 1_000_003 + step)
        texts, labels, objects = zip(*(swap_object(*training_caption(scenes.random_scene(rng), rng), rng)
                                       for _ in range(args.batch)))
        ids = captions.ids(list(texts)).to(args.device)
        hidden = encoder(ids)[0]
        logits = probe(hidden, ids)
        losses = [torch.nn.functional.cross_entropy(logits[a], torch.tensor([l[a] for l in labels], device=args.device))
                  for a in VALUES]
        summary_loss = sum(losses) / len(losses)
        words = [read_at(captions, o, l) for o, l in zip(objects, labels)]
        return summary_loss + WORD_LOSS * probe.word_loss(hidden, ids, labels, words), summary_loss.item()

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
    return "probe reads back " + ", ".join(f"{group} {share:.1%}" for group, share in accuracy.items())


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
    return [training_caption(scenes.Scene(*table[i]), rng)[0] for i in indices]


def text_stage_encoder(out: Path):
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(out / "text_stage" / "text_encoder", dtype=torch.float32).eval().requires_grad_(False)
