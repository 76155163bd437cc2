"""Generation over a state: sampling, incremental detokenisation, stop strings, and a step-wise driver.

`Generation` advances in small units (one prompt block, or one sampled token) so that a scheduler can interleave
many of them; `generate` runs one to the end for scripts and tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from model.runtime import FamRuntime
from model.state import FamState


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence of any of these strings
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def sample(logits: Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """logits [V] -> one token id. Sampling runs on the CPU, where the seeded generator lives."""
    logits = logits.float().cpu()
    if p.temperature == 0:
        return int(logits.argmax())
    logits = logits / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if p.top_p < 1:
        sorted_p, idx = probs.sort(descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > p.top_p  # keep the smallest prefix whose mass reaches top_p
        probs = probs.scatter(0, idx, sorted_p.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=gen))


class Detokenizer:
    """Turns a growing token list into text pieces, never emitting half a UTF-8 character (a piece is released
    only when its decoding no longer ends in U+FFFD), and holding back text that may begin a stop string."""

    def __init__(self, decode, stop: tuple[str, ...]):
        self._decode, self._stop = decode, stop
        self.ids: list[int] = []
        self.text = ""  # decoded text of all ids (complete characters only)
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self._decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        self.text = text
        for s in self._stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                self.text, self.stopped = self.text[:at], True
        limit = len(self.text) if self.stopped else len(self.text) - self._held_back()
        piece = self.text[self.emitted:limit]
        self.emitted = max(self.emitted, limit)
        return piece

    def flush(self) -> str:
        piece, self.emitted = self.text[self.emitted:], len(self.text)
        return piece

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best


@dataclass
class Generation:
    """One request: ingest `prompt_ids` into `state`, then sample until EOS, a stop string or max_tokens.

    `step()` does one unit of work and returns the text it produced. `state` always holds what has been
    ingested; `final_state()` also ingests the last sampled token (for a committed turn).
    """

    rt: FamRuntime
    state: FamState
    prompt_ids: list[int]
    params: SamplingParams
    finish_reason: str | None = None
    completion_ids: list[int] = field(default_factory=list)
    _fed: int = 0
    _logits: Tensor | None = None
    _pending: int | None = None  # sampled token not yet ingested

    def __post_init__(self) -> None:
        self._gen = torch.Generator().manual_seed(self.params.seed) if self.params.seed is not None else None
        self._detok = Detokenizer(self.rt.decode, self.params.stop)
        self._eos = set() if self.params.ignore_eos else self.rt.eos_token_ids
        if not self.prompt_ids:
            raise ValueError("a generation needs at least one prompt token")

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def prompt_done(self) -> bool:
        return self._fed == len(self.prompt_ids)

    def step(self) -> str:
        if self.done:
            return ""
        if not self.prompt_done:  # one block (or the rest of the current block) of the prompt
            self.state, n, h = self.rt.ingest_block(self.state, self.prompt_ids[self._fed:])
            self._fed += n
            if self.prompt_done:
                self._logits = self.rt.module.logits(h)[0]
            return ""
        if self._pending is not None:
            self.state, logits = self.rt.ingest(self.state, [self._pending])
            self._logits, self._pending = logits[0], None
        tok = sample(self._logits, self.params, self._gen)
        self._pending = tok
        if tok in self._eos:
            self.finish_reason = "stop"
            return self._detok.flush()
        self.completion_ids.append(tok)
        piece = self._detok.add(tok)
        if self._detok.stopped:
            self.finish_reason = "stop"
        elif len(self.completion_ids) >= self.params.max_tokens:
            self.finish_reason = "length"
            piece += self._detok.flush()
        return piece

    @property
    def text(self) -> str:
        return self._detok.text

    def final_state(self) -> FamState:
        """The state with prompt and every sampled token (EOS included) ingested: the committed turn."""
        if self._pending is not None:
            self.state, _ = self.rt.ingest(self.state, [self._pending])
            self._pending = None
        return self.state


def generate(rt: FamRuntime, state: FamState, prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
    g = Generation(rt, state, prompt_ids, params)
    while not g.done:
        piece = g.step()
        if piece:
            yield piece
