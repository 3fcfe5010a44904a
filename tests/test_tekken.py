"""The Tekken tokenizer ldm ships for FLUX.2 dev's Mistral Small 3.x gives the ids Mistral publish
(mistral-common's docs/usage/tokenizers.md), and the prompt template FLUX.2 dev's pipeline writes."""
from ldm_cli.loading import tekken


def test_ids_are_mistrals_published_ones():
    tokenizer = tekken.load()
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hello, how are you?"}], tokenize=True,
                                         return_dict=True)
    assert chat["input_ids"] == [1, 3, 22177, 1044, 2606, 1584, 1636, 1063, 4]
    assert tokenizer("Plz tekkenize me", add_special_tokens=False).input_ids == [4444, 1122, 16058, 3569, 2033, 1639]


def test_the_system_turn_and_padding_are_mistral_smalls():
    tokenizer = tekken.load()
    turns = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "a red fox"}]}]
    assert tokenizer.apply_chat_template(turns, tokenize=False) == \
        "<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]a red fox[/INST]"
    padded = tokenizer.apply_chat_template([turns], tokenize=True, return_dict=True, padding="max_length",
                                           max_length=24, truncation=True)
    ids, mask = padded["input_ids"][0], padded["attention_mask"][0]
    assert (ids[:2], ids[-1], tokenizer.pad_token_id) == ([1, 17], 11, 11)  # <s>, [SYSTEM_PROMPT]; <pad> on the right
    assert mask == [1] * mask.count(1) + [0] * (24 - mask.count(1))
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Be brief.a red fox"


def test_a_folders_own_tokenizer_json_wins(tmp_path):
    tekken.shipped(tekken.MISTRAL_TOKENIZER).save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.json").is_file()
    own = tekken.load(tmp_path)
    assert own is not tekken.load()  # read from the folder, not ldm's copy
    assert own("a red fox", add_special_tokens=False).input_ids == tekken.load()("a red fox", add_special_tokens=False).input_ids
    assert tekken.load(tmp_path / "missing") is tekken.load()
