"""Mistral's Tekken tokenizer (the one FLUX.2 dev's Mistral Small 3.x reads), built offline from
the vocabulary and merges ldm ships in configs/mistral_tokenizer/ (see its NOTICE), the way
transformers converts a tekken.json: byte-level BPE behind Tekken's split pattern, whole
vocabulary words taken before merges (tiktoken's rule), the 1000 control tokens special, and no
BOS added by the tokenizer itself (the chat template writes it).

A diffusers folder's own `tokenizer/` (its tokenizer.json and chat template) is read as it is.
ComfyUI's Mistral file carries Mistral's tekken.json as a uint8 tensor: it is checked against
ldm's copy (pattern, control tokens, every word's bytes at its rank) and refused if it differs.
"""
from __future__ import annotations

import base64
import functools
import json
from pathlib import Path

from ldm_cli import limits, untrusted_json
from ldm_cli.errors import LdmError
from ldm_cli.loading.recipe import MISTRAL_TOKENIZER, read_json
from ldm_cli.loading.tensors import Checkpoint

MARK = "Tekken"  # tokenizer_config.json's tokenizer_class in ldm's copy: built here, not by transformers
EMBEDDED = "tekken_model"  # the tensor holding a file's own tekken.json (ComfyUI's)


def is_tekken(folder: Path) -> bool:
    config = folder / "tokenizer_config.json"
    return config.is_file() and read_json(config).get("tokenizer_class") == MARK


def load(folder: Path | None = None):
    """A folder's own tokenizer when it has a tokenizer.json, else ldm's copy."""
    if folder is not None and (folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return shipped(MISTRAL_TOKENIZER if folder is None or not is_tekken(folder) else folder)


@functools.lru_cache(maxsize=2)
def shipped(folder: Path):
    """Reading 269,443 merges takes seconds: one process builds it once."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    config = read_json(folder / "tokenizer_config.json")
    vocab = str(folder / "vocab.json")
    bpe = BPE.from_file(vocab, str(folder / "merges.txt"), fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    tokenizer.model.ignore_merges = True  # a word in the vocabulary is one token, as tiktoken takes it
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(config["pattern"]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    controls = [tokenizer.id_to_token(i) for i in range(config["special_tokens"])]
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in controls])
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    names = ("bos_token", "eos_token", "pad_token", "unk_token", "padding_side", "chat_template")
    return TokenizersBackend(tokenizer_object=tokenizer, **{k: config[k] for k in names})


def check_embedded(checkpoint: Checkpoint) -> None:
    """The tekken.json a text-encoder file carries must be the vocabulary ldm tokenizes with."""
    if EMBEDDED not in checkpoint.shapes:
        return
    if checkpoint.shapes[EMBEDDED][0] > limits.MAX_TEKKEN_BYTES:
        raise LdmError(f"{checkpoint.name}'s {EMBEDDED} is over {limits.MAX_TEKKEN_BYTES:,} bytes; the file is damaged")
    data = untrusted_json.loads(checkpoint.get(EMBEDDED).numpy().tobytes(), f"{checkpoint.name}'s {EMBEDDED}",
                                max_chars=limits.MAX_TEKKEN_BYTES)
    if not same_vocabulary(data):
        raise LdmError(f"{checkpoint.name} carries a Tekken vocabulary other than Mistral Small 3.x's, which ldm "
                       "tokenizes with; pass FLUX.2 dev's own Mistral file")


def same_vocabulary(data) -> bool:
    config = read_json(MISTRAL_TOKENIZER / "tokenizer_config.json")
    try:
        settings, words = data["config"], data["vocab"]
        specials = settings["default_num_special_tokens"]
        count = settings["default_vocab_size"] - specials
        if settings["pattern"] != config["pattern"] or specials != config["special_tokens"]:
            return False
        theirs = [spelled(base64.b64decode(w["token_bytes"])) for w in words[:count]]
    except (KeyError, TypeError, ValueError):
        return False
    with open(MISTRAL_TOKENIZER / "vocab.json", encoding="utf-8") as f:
        ours = sorted(json.load(f).items(), key=lambda item: item[1])[specials:]
    return len(ours) == len(theirs) and all(word == mine for word, (mine, _) in zip(theirs, ours))


@functools.cache
def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in which byte-level BPE vocabularies are written."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def spelled(word: bytes) -> str:
    table = _byte_spelling()
    return "".join(table[b] for b in word)
