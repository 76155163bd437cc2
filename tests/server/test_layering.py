"""The engine knows nothing about HTTP: no web framework, no settings module, no server code outside itself."""

from __future__ import annotations

import ast
from pathlib import Path

import server.engine

ENGINE_DIR = Path(server.engine.__file__).parent
FORBIDDEN = ("fastapi", "starlette", "sse_starlette", "uvicorn", "pydantic_settings", "pydantic", "httpx",
             "prometheus_client", "multipart", "python_multipart")


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_engine_imports_no_http_or_settings_code():
    files = sorted(ENGINE_DIR.glob("*.py"))
    assert len(files) >= 5, files  # the check must actually see the engine's modules
    offenders = []
    for path in files:
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top in FORBIDDEN or (top == "server" and not name.startswith("server.engine")):
                offenders.append(f"{path.name}: {name}")
    assert not offenders, offenders


def test_checker_sees_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import fastapi\nfrom server.errors import APIError\nfrom server.engine.store import Session\n")
    assert imported_modules(probe) == ["fastapi", "server.errors", "server.engine.store"]
