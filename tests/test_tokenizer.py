from transformers import CLIPTokenizer

from tinyworld.shapes import shape_words
from tinyworld.tokenizer import apply_merges, save_word_tokenizer, word_merges


def test_every_word_is_one_token_in_the_real_clip_tokenizer(tmp_path):
    # A word split into characters would make the tiny text encoder learn spelling instead of meaning.
    words = shape_words() + ["creature", "cat", "cats", "at", "red", "ed", "reddish", "dragon", "drag"]
    save_word_tokenizer(words, tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, tokenizer.convert_ids_to_tokens(ids))


def test_unknown_words_still_tokenize_by_characters(tmp_path):
    tokenizer = save_word_tokenizer(["red"], tmp_path)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("zebra", add_special_tokens=False).input_ids)
    assert "".join(tokens).replace("</w>", "") == "zebra"
    assert tokenizer.unk_token_id not in tokenizer("zebra").input_ids[1:-1]


def test_merges_resolve_suffix_conflicts():
    # "ed" is merged first, which would split "red" into r + ed unless a repair merge is added.
    merges = word_merges(["ed", "red"])
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    assert apply_merges("red", ranks) == ["red</w>"]
    assert apply_merges("ed", ranks) == ["ed</w>"]
