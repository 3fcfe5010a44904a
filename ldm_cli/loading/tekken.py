"""Mistral's Tekken tokenizer (the one FLUX.2 dev's Mistral Small 3.x reads), built offline from
the vocabulary and merges ldm ships in configs/mistral_tokenizer/ (see its NOTICE), the way
transformers converts a tekken.json: byte-level BPE behind Tekken's split pattern, whole
vocabulary words taken before merges (tiktoken's rule), the 1000 control tokens special, and no
BOS added by the tokenizer itself (the chat template writes it).

A diffusers folder's own `tokenizer/` (its tokenizer.json and chat template) is read as it is.
"""
from __future__ import annotations

import functools
from pathlib import Path

from ldm_cli.loading.recipe import MISTRAL_TOKENIZER, read_json

MARK = "Tekken"  # tokenizer_config.json's tokenizer_class in ldm's copy: built here, not by transformers


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
