"""Training is not inference: the server's packages import neither the training package nor its dependencies."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAINING_ONLY = ("training", "peft", "matplotlib")


def imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_model_and_server_import_no_training_code():
    files = sorted((ROOT / "model").rglob("*.py")) + sorted((ROOT / "server").rglob("*.py"))
    assert len(files) >= 10, files
    offenders = [f"{p.relative_to(ROOT)}: {n}" for p in files for n in imports(p) if n.split(".")[0] in TRAINING_ONLY]
    assert not offenders, offenders


def test_training_lives_in_its_package():
    assert not [p.name for p in (ROOT / "model").glob("*.py") if p.stem in ("train", "finetune", "data", "tiny")]
    assert {"train", "finetune", "data", "tiny", "export_adapter", "evaluate"} <= {
        p.stem for p in (ROOT / "training").glob("*.py")}
