"""The executor: the only code in the engine that calls the model.

It runs the works of one engine step as one batched pass (`FamRuntime.forward_many`: the dense layers over the
rows of every work at once, attention per session over its own cache, so sessions at any fill of their block
share the pass), then one `lm_head` over the rows whose logits were asked for. Sessions that decode step after
step (one alone too) keep their caches in the executor's `DecodeBatch` (one padded buffer per layer, appended in
place, one attention call for all of them; dropped when the worker goes idle); the states the jobs get back are
still values. If the batched pass raises, each work runs alone, so that a failure stays with the work that caused
it.

Every pass runs on the pool the server was started with. An earlier rule ran small and interactive passes on one
thread, because two threads decoded at 12.5 tok/s through the server and one at 28-33. The likely cause was an
OpenMP team left in a loader thread (fixed in `server.app`), not the pass size: with it gone, all threads are
faster for every kind of pass (scripts/bench_server.py --targets, 2 cores, one run each: single-stream decode 14.5
against 10.1 tok/s, 8 streams 42.6 against 28.9, ingest under chats 256 against 162 tok/s).
"""

from __future__ import annotations

import logging

import torch

from model import DecodeBatch, FamRuntime
from server.engine.work import Output, Work

log = logging.getLogger(__name__)


class Executor:
    def __init__(self, rt: FamRuntime):
        self.rt = rt
        self.decode = DecodeBatch()  # the caches of the sessions that decode step after step (model/decode.py)

    def run(self, works: list[Work]) -> list[Output | Exception]:
        try:
            return list(self._pass(works, self.decode))
        except Exception as e:
            self.decode = DecodeBatch()  # its rows may be half-written (the states it returned are untouched)
            if len(works) == 1:
                return [e]
            log.warning("a batched pass of %d works failed (%s: %s); running them one by one", len(works),
                        type(e).__name__, e)
            return [self._alone(w) for w in works]

    def release(self) -> None:
        """Drop the decode buffers (idle: nothing decodes). The states handed out keep only their own rows' views."""
        self.decode = DecodeBatch()

    def _alone(self, work: Work) -> Output | Exception:
        try:
            return self._pass([work])[0]
        except Exception as e:
            return e

    def _pass(self, works: list[Work], decode: DecodeBatch | None = None) -> list[Output]:
        results = self.rt.forward_many([w.state for w in works], [w.tokens for w in works], decode)
        rows = [h[-1:] if w.logits == "last" else h for w, (_, h) in zip(works, results, strict=True)
                if w.logits != "none"]
        logits = iter(self.rt.logits(torch.cat(rows)).split([len(r) for r in rows]) if rows else ())
        outputs = []
        for w, (state, _) in zip(works, results, strict=True):
            x = None if w.logits == "none" else next(logits)
            outputs.append(Output(state, x[0] if w.logits == "last" and x is not None else x))
        return outputs
