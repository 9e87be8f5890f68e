"""A word-level CLIPTokenizer for a small closed vocabulary.

transformers' CLIPTokenizer is byte-pair encoding starting from single characters: a vocabulary of whole words with
no merges would turn every multi-letter word into unknown tokens. So every character is in the vocabulary (any text
still tokenizes), and each word gets a chain of merges that rebuilds it into one token.
"""

import json
import string
from pathlib import Path

from transformers import CLIPTokenizer

SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]
END = "</w>"


def symbols(word: str) -> list[str]:
    """A word as CLIP's BPE starts from it: its characters, the last marked as a word end."""
    return [*word[:-1], word[-1] + END]


def apply_merges(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encode one word: merge the lowest-ranked adjacent pair until none applies."""
    parts = symbols(word)
    while len(parts) > 1:
        pairs = [(ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def word_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges under which every word becomes a single token.

    Each word first gets its left-to-right chain; where another word's merges split it differently, one more merge
    joins whatever pieces remain, until every word is whole.
    """
    merges, seen = [], set()

    def add(pair):
        if pair not in seen:
            seen.add(pair)
            merges.append(pair)

    for word in words:
        pieces = symbols(word)
        for piece in pieces[1:]:
            add((pieces[0], piece))
            pieces[0] = pieces[0] + piece
    for _ in range(max(map(len, words), default=0)):
        ranks = {pair: rank for rank, pair in enumerate(merges)}
        broken = [apply_merges(w, ranks) for w in words if len(apply_merges(w, ranks)) > 1]
        if not broken:
            return merges
        for pieces in broken:
            add((pieces[0], pieces[1]))
    raise RuntimeError("could not build single-token merges")  # unreachable: each round joins a piece per word


def build_vocabulary(words: list[str], merges: list[tuple[str, str]]) -> dict[str, int]:
    alphabet = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    tokens = alphabet + [c + END for c in alphabet] + [a + b for a, b in merges] + SPECIAL_TOKENS
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}


def save_word_tokenizer(words, folder, model_max_length: int = 77) -> CLIPTokenizer:
    """Write vocab.json and merges.txt for `words` to `folder` and load them as a CLIPTokenizer."""
    words = sorted({w.lower() for w in words})
    merges = word_merges(words)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(build_vocabulary(words, merges)))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                              model_max_length=model_max_length, pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    return tokenizer
