"""Generation over a state: sampling, incremental detokenisation, stop strings, and a step-wise driver.

`Generation` never calls the model: it says which tokens to feed next and turns the logits into sampled tokens and
text, so that an engine can batch the model calls of many generations; `drive`/`generate` run one alone on a
runtime, for scripts and tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from model.runtime import FamRuntime
from model.state import FamState


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256  # 0: read (and score) the prompt only
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence of any of these strings
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def sample(logits: Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """logits [V] -> one token id. Sampling runs on the CPU, where the seeded generator lives, in float64: a
    temperature such as 1e-300 is 0 in float32."""
    logits = logits.double().cpu()
    if p.temperature == 0:
        return int(logits.argmax())
    # relative to the largest logit, so that a vanishing temperature sends the others to -inf (greedy) instead of
    # overflowing every logit to inf and the softmax to NaN
    logits = (logits - logits.max()) / p.temperature
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


@dataclass(frozen=True)
class TokenLogprob:
    """A token with its log-probability under the model (the log-softmax of its logits, before temperature or
    top-k/top-p) and the most likely alternatives at its position, most likely first."""

    id: int
    text: str  # the token decoded alone
    logprob: float | None  # None: a prompt's first token (nothing before it is scored)
    top: tuple[tuple[str, float], ...] = ()


class Generation:
    """One request's decoding, without the model: which tokens to feed next and what to make of the logits.

    A driver alternates `next_tokens(limit)` (feed them to the model) and `accept(logits)`: the prompt goes in
    chunks of at most `limit` tokens, then each sampled token is fed back, until EOS, a stop string or max_tokens.
    `logits_wanted(n)` says which logits `accept` needs: "none" (a prompt chunk before the last), "last" (the
    next-token logits [V]) or "all" ([n, V], for the prompt's logprobs). After `done`, `pending` is the last sampled
    token (EOS included) that was never fed: a committed turn feeds it too.

    `logprobs` (None: off) asks for the sampled tokens' logprobs with that many alternatives each;
    `prompt_logprobs` for the prompt's tokens too (the first has logprob None: nothing precedes it here).
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, decode: Callable[[list[int]], str],
                 eos_ids: set[int], *, logprobs: int | None = None, prompt_logprobs: bool = False):
        if not prompt_ids:
            raise ValueError("a generation needs at least one prompt token")
        self.prompt_ids, self.params, self._decode = prompt_ids, params, decode
        self.n_logprobs, self.want_prompt_logprobs = logprobs, prompt_logprobs
        self.finish_reason: str | None = None
        self.completion_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []  # one per completion token (when asked)
        self.prompt_logprobs: list[TokenLogprob] = [TokenLogprob(prompt_ids[0], decode(prompt_ids[:1]), None)
                                                    ] if prompt_logprobs else []
        self.pending: int | None = None  # sampled token not yet fed
        self._fed = 0
        self._gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self._detok = Detokenizer(decode, params.stop)
        self._eos = set() if params.ignore_eos else eos_ids

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def prompt_done(self) -> bool:
        return self._fed == len(self.prompt_ids)

    @property
    def prompt_left(self) -> int:
        return len(self.prompt_ids) - self._fed

    @property
    def text(self) -> str:
        return self._detok.text

    def next_tokens(self, limit: int) -> list[int]:
        assert not self.done and limit > 0
        if not self.prompt_done:
            return self.prompt_ids[self._fed:self._fed + limit]
        assert self.pending is not None
        return [self.pending]

    def logits_wanted(self, n: int) -> str:
        if self.prompt_done:
            return "last"
        if self.want_prompt_logprobs:
            return "all"
        return "last" if self._fed + n == len(self.prompt_ids) else "none"

    def accept(self, n: int, logits: Tensor | None) -> str:
        """After the model read `next_tokens` (n of them): the text this produced (often empty)."""
        if not self.prompt_done:
            if self.want_prompt_logprobs:
                assert logits is not None and logits.shape[0] == n
                targets = self.prompt_ids[self._fed + 1:self._fed + n + 1]
                self.prompt_logprobs += [self._logprob(logits[i], t, self.n_logprobs or 0)
                                         for i, t in enumerate(targets)]
                logits = logits[-1]
            self._fed += n
            if not self.prompt_done:
                return ""
        else:
            self.pending = None
        if self.params.max_tokens == 0:  # the prompt only
            self.finish_reason = "length"
            return ""
        assert logits is not None
        logits = logits.reshape(-1)
        tok = sample(logits, self.params, self._gen)
        self.pending = tok
        if tok in self._eos:
            self.finish_reason = "stop"
            return self._detok.flush()
        self.completion_ids.append(tok)
        if self.n_logprobs is not None:
            self.logprobs.append(self._logprob(logits, tok, self.n_logprobs))
        piece = self._detok.add(tok)
        if self._detok.stopped:
            self.finish_reason = "stop"
        elif len(self.completion_ids) >= self.params.max_tokens:
            self.finish_reason = "length"
            piece += self._detok.flush()
        return piece

    def _logprob(self, logits: Tensor, token: int, top: int) -> TokenLogprob:
        lp = torch.log_softmax(logits.float(), -1)
        alts = ()
        if top:
            values, ids = lp.topk(top)
            alts = tuple((self._decode([int(i)]), float(v)) for v, i in zip(values, ids, strict=True))
        return TokenLogprob(token, self._decode([token]), float(lp[token]), alts)


def drive(rt: FamRuntime, state: FamState, g: Generation) -> Iterator[tuple[str, FamState]]:
    """Run a generation on one state, block by block: (text piece, state so far) after each model call; the last
    state has every sampled token (EOS included) ingested, the committed turn."""
    while not g.done:
        toks = g.next_tokens(state.cfg.block_size - state.n_block)
        want = g.logits_wanted(len(toks))
        ((state, h),) = rt.forward_many([state], [toks])
        logits = None if want == "none" else rt.logits(h[-1] if want == "last" else h)
        yield g.accept(len(toks), logits), state
    if g.pending is not None:
        state, _ = rt.ingest(state, [g.pending])
        yield "", state


def generate(rt: FamRuntime, state: FamState, prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
    for piece, _ in drive(rt, state, Generation(prompt_ids, params, rt.decode, rt.eos_token_ids)):
        if piece:
            yield piece
