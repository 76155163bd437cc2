"""The executor: the only code in the engine that calls the model.

It runs the works of one engine step as one batched pass (`FamRuntime.forward_many`: the dense layers over the
rows of every work at once, attention per session over its own cache, so sessions at any fill of their block
share the pass), then one `lm_head` over the rows whose logits were asked for. If the batched pass raises, each
work runs alone, so that a failure stays with the work that caused it.

A pass with interactive work (decode, prompts) or with few rows runs on one torch thread, a bulk one (ingest
slices) on all of them: a small pass is a chain of tiny kernels, where the threads of a pool wait on each other at
every op, and while answers stream the event loop's thread takes a core besides. Measured through the server on 2
cores (scripts/bench_server.py --targets): single-stream decode 12.5 tok/s with two threads, 28-33 with one,
while ingest alone gains from two.
"""

from __future__ import annotations

import logging

import torch

from model import FamRuntime
from server.engine.work import Output, Work

log = logging.getLogger(__name__)


# Passes with fewer rows than this, or with any work that wants logits, run on one thread (see the docstring).
SMALL_PASS_ROWS = 64


class Executor:
    def __init__(self, rt: FamRuntime):
        self.rt = rt
        self.threads = torch.get_num_threads()  # the pool size the server was started with

    def run(self, works: list[Work]) -> list[Output | Exception]:
        try:
            return list(self._pass(works))
        except Exception as e:
            if len(works) == 1:
                return [e]
            log.warning("a batched pass of %d works failed (%s: %s); running them one by one", len(works),
                        type(e).__name__, e)
            return [self._alone(w) for w in works]

    def _alone(self, work: Work) -> Output | Exception:
        try:
            return self._pass([work])[0]
        except Exception as e:
            return e

    def _pass(self, works: list[Work]) -> list[Output]:
        small = sum(len(w.tokens) for w in works) < SMALL_PASS_ROWS
        torch.set_num_threads(1 if small or any(w.logits != "none" for w in works) else self.threads)
        results = self.rt.forward_many([w.state for w in works], [w.tokens for w in works])
        rows = [h[-1:] if w.logits == "last" else h for w, (_, h) in zip(works, results, strict=True)
                if w.logits != "none"]
        logits = iter(self.rt.logits(torch.cat(rows)).split([len(r) for r in rows]) if rows else ())
        outputs = []
        for w, (state, _) in zip(works, results, strict=True):
            x = None if w.logits == "none" else next(logits)
            outputs.append(Output(state, x[0] if w.logits == "last" and x is not None else x))
        return outputs
