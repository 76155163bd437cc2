"""What a job asks of the model in one engine step, and what it gets back.

A job plans a `Work` (a state, the tokens to append to it, which logits it needs), the executor runs the works of
a step together, and the job commits the `Output`. Nothing else passes between jobs and the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from model import FamState

Logits = Literal["none", "last", "all"]


@dataclass(frozen=True)
class Work:
    state: FamState  # batch of one
    tokens: list[int]  # at least one, at most up to the end of the state's current block
    logits: Logits = "none"  # "last": next-token logits [V]; "all": logits at every position [T, V]


@dataclass(frozen=True)
class Output:
    state: FamState  # the work's state with its tokens appended
    logits: Tensor | None  # float32, as `Work.logits` asked
