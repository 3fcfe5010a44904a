"""The LoRAs and embeddings of one loaded model, for the whole run.

- `check` (before any model loads): each `<lora:...>` of a prompt names a file that is a LoRA;
- `Session.resolve` (model loaded, nothing rendered yet): the LoRAs fit the model, the
  embeddings a prompt names fit it, and the settings record A1111's `Lora hashes` and
  `TI hashes` (a PNG's recorded hashes that differ are said in one line);
- `Session.activate` (before a batch's prompts are encoded): the batch's LoRA set merged in,
  the previous set's weights restored first (merge.py), nothing reloaded from disk but the
  small LoRA files, each read once.
"""
from __future__ import annotations

from pathlib import Path

from ldm_cli import prompt_syntax, schedulers
from ldm_cli.networks import embeddings, formats, hashes, lookup, merge, tags, targets
from ldm_cli.networks.lookup import NetworkOptions
from ldm_cli.notes import note_once
from ldm_cli.settings import Settings

# families whose prompts A1111 reads with textual inversion (CLIP token embeddings it splices)
EMBEDDING_FAMILIES = ("sd1", "sd2", "sdxl")


def attach(model, options: NetworkOptions, source: str | None) -> None:
    """Give `model` its session; `source`: the model as the user named it (None: built-in),
    beside which the default folders are."""
    model.networks = Session(model, options, source)
    model.embeddings = model.networks.embeddings  # what the prompt's tokenizer asks (clip_text.py)


class Session:
    def __init__(self, model, options: NetworkOptions, source: str | None):
        self.model, self.options, self.source = model, options, source
        self.components = targets.components(model)
        self.merger = merge.Merger()
        self.current: tuple = ()
        self._table: dict | None = None
        self._files: dict[Path, formats.LoraFile] = {}
        self._hashes: dict[Path, str] = {}
        self._text_keys: dict[tuple, tuple] = {}
        self.embeddings = self._library() if model.family.name in EMBEDDING_FAMILIES else None

    def _library(self) -> embeddings.Library:
        widths = [encoder.config.hidden_size for encoder in self.model.text_encoders]
        return embeddings.Library(lookup.embedding_files(self.options, self.source), self.model.tokenizers[0],
                                  widths, self.options.allow_pickle)

    # -- which LoRAs ------------------------------------------------------------------------
    def applied(self, prompt: str) -> list[merge.Applied]:
        return [merge.Applied(self._lora(tag.name), tag.te, tag.unet, tag.name) for tag in tags.lora_tags(prompt)]

    def _lora(self, name: str) -> formats.LoraFile:
        path = lookup.find_lora(name, self.options, self.source)
        if path not in self._files:
            self._files[path] = formats.open_lora(path, self.options.allow_pickle)
        return self._files[path]

    def plan(self, loras: list[merge.Applied]) -> merge.Plan:
        return merge.plan(self.components, self.table(), loras, self.model.family.label)

    def table(self) -> dict[str, list[targets.Target]]:
        if self._table is None:
            self._table = targets.table(self.model)
        return self._table

    def text_key(self, prompt: str) -> tuple:
        """What of the prompt's LoRA set changes the text encoders: two prompts with equal keys
        encode alike (a LoRA of the denoiser alone, or at te weight 0, changes no encoding)."""
        tags = lora_key(prompt)
        if tags not in self._text_keys:
            table = self.table()
            self._text_keys[tags] = tuple((a.lora.path, a.te) for a in self.applied(prompt) if a.te != 0 and any(
                t.text for layer in a.lora.layers for t in table.get(layer, ())))
        return self._text_keys[tags]

    # -- a run's settings -------------------------------------------------------------------
    def few_step_defaults(self, prompt: str) -> dict:
        """The settings a LoRA of the prompt made for few steps names in its metadata (presets.py),
        said once; {} when none does."""
        from ldm_cli import presets
        from ldm_cli.loading.tensors import read_header

        for a in self.applied(prompt):
            if a.lora.path.suffix.lower() == ".safetensors" and (found := presets.from_metadata(
                    read_header(a.lora.path)[1])):
                note_once(f"LoRA {a.lora.name} is a {found[0]} LoRA (its metadata says): "
                          f"{presets.described(found[1])} unless given otherwise")
                return found[1]
        return {}

    def resolve(self, s: Settings) -> Settings:
        """`s` with A1111's hash records, after checking the LoRAs and embeddings fit the model
        (a hires prompt's LoRAs too: its pass merges them, as A1111's does)."""
        loras = self.applied(s.prompt) + (self.applied(s.hires_prompt) if s.hires_prompt else [])
        for prompt in (s.prompt, s.hires_prompt):  # each pass's set fits the model
            if prompt and (applied := self.applied(prompt)):
                self.plan(applied)
        found = {a.mentioned: self._hash(hashes.lora_hash, a.lora.path) for a in loras}
        steps = schedulers.prompt_steps(s.scheduler, s.steps)  # the steps its prompt schedules span
        used = self.used_embeddings(s.prompt, steps) + self.used_embeddings(s.negative, steps, negative=True)
        ti = [(e.name, self._hash(hashes.embedding_hash, e.path)) for e in used]
        _compare("LoRA", s.lora_hashes, found, {a.mentioned: a.lora.path for a in loras})
        _compare("embedding", s.ti_hashes, dict(ti), {e.name: e.path for e in used})
        out = s.merged()
        out.lora_hashes, out.ti_hashes = hashes.record(list(found.items())), hashes.record(ti)
        return out

    def _hash(self, digest, path: Path) -> str:
        if path not in self._hashes:
            self._hashes[path] = digest(path)
        return self._hashes[path]

    def used_embeddings(self, text: str, steps: int, negative: bool = False) -> list[embeddings.Embedding]:
        if self.embeddings is None or not text or not self.embeddings.files:
            return []  # no embeddings: the prompt is not parsed for their names (every line of a batch asks)
        return self.embeddings.used(encoded_texts(text, steps, negative))

    # -- a batch ----------------------------------------------------------------------------
    def activate(self, prompt: str) -> None:
        """Merge the LoRAs `prompt` asks for (and only those) into the model."""
        loras = self.applied(prompt)
        key = tuple((a.lora.path, a.te, a.unet) for a in loras)
        if key == self.current:
            return
        self.merger.restore()
        self.current = ()
        if loras:
            self.merger.merge(self.components, self.plan(loras))
            self.current = key

    def drop_text_encoders(self) -> None:
        """Let go of the text encoders (memory.free_text_encoders): their layers are no longer
        merged into or restored, and a later set's text-encoder layers are skipped, not missing."""
        self.table()  # built while the encoders are here, so their layer names stay known
        self.components = {k: v for k, v in self.components.items() if k == targets.DENOISER}
        self.merger.forget(set(self.components))

    def deactivate(self) -> None:
        self.merger.restore()
        self.current = ()


def lora_key(prompt: str) -> tuple:
    """What makes two prompts' LoRA sets the same (renders sharing a batch must share it)."""
    return tuple(tags.lora_tags(prompt))


def encoded_texts(prompt: str, steps: int, negative: bool = False) -> list[str]:
    """The texts A1111 tokenizes one by one for a prompt, and so matches embedding names in: each
    weighted fragment of each scheduled prompt of each AND part (the positive prompt without its
    extra-network tags; the negative prompt has no AND parts)."""
    text = prompt if negative else prompt_syntax.extra_networks(prompt)[0]
    parts = [text] if negative else [part for part, _ in prompt_syntax.and_parts(text)]
    return [fragment for part in parts for _, scheduled in prompt_syntax.schedule(part, steps)
            for fragment, weight in prompt_syntax.emphasis(scheduled)
            if (fragment, weight) != (prompt_syntax.BREAK, prompt_syntax.BREAK_WEIGHT)]


def _compare(what: str, recorded: str | None, found: dict[str, str], paths: dict[str, Path]) -> None:
    """One line per name whose file's hash differs from the one a PNG recorded."""
    for name, digest in hashes.parse(recorded).items():
        if name in found and found[name] != digest:
            note_once(f"warning: the {what} {name!r} ({paths[name]}) has hash {found[name]}, not the {digest} "
                 "the image recorded; the result may differ")
        elif name not in found and what == "embedding":
            note_once(f"warning: the image used the embedding {name!r}, which is not in the embeddings folders; "
                 "its name is read as words")
