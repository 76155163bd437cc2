"""The evaluation's cells: a cell is done per (system, dtype), so a float32 run of a system measured in bf16 is
measured again, not skipped, and the report keeps the two apart."""

from __future__ import annotations

import json

from training.evaluate import done_cells, label, report


def _nexttoken(system: str, key: int, correct: int, dtype: str | None = None) -> dict:
    cell = {"system": system, "task": "nexttoken", "length": 64, "key": key, "skip": 16, "correct_far": correct,
            "n_far": 47}
    return cell if dtype is None else {**cell, "dtype": dtype}


def test_cells_are_done_per_dtype_and_reported_apart(tmp_path):
    cells = tmp_path / "cells.jsonl"
    rows = [_nexttoken("sink-base", 0, 20), _nexttoken("sink-base", 0, 30, "float32")]  # the first predates --dtype
    cells.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert done_cells(cells) == {("sink-base", "bfloat16", "nexttoken", 64, 0),
                                 ("sink-base", "float32", "nexttoken", 64, 0)}
    assert [label(r) for r in rows] == ["sink-base", "sink-base (float32)"]
    out = tmp_path / "eval.md"
    report(cells, out)
    text = out.read_text()
    assert f"| sink-base | {20 / 47:.4f} | 47 | 1 |" in text
    assert f"| sink-base (float32) | {30 / 47:.4f} | 47 | 1 |" in text
    assert "PassKey" not in text  # no PassKey cells, no empty table
