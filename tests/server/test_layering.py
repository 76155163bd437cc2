"""The layers import only what they may: the engine knows nothing about HTTP; the HTTP layer sees the engine
only through `server.engine`'s public names (no submodules, no runtime); the model knows nothing above it."""

from __future__ import annotations

import ast
from pathlib import Path

import model
import server
import server.engine

ENGINE_DIR = Path(server.engine.__file__).parent
SERVER_DIR = Path(server.__file__).parent
MODEL_DIR = Path(model.__file__).parent
FORBIDDEN = ("fastapi", "starlette", "sse_starlette", "uvicorn", "pydantic_settings", "pydantic", "httpx",
             "prometheus_client", "multipart", "python_multipart")
HTTP_FILES = [*sorted(SERVER_DIR.glob("*.py")), *sorted((SERVER_DIR / "routes").glob("*.py"))]  # all but engine/


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names imported from it) for every absolute import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names]))
    return found


def imported_modules(path: Path) -> list[str]:
    return [name for name, _ in imports(path)]


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


def test_http_layer_uses_only_the_engine_packages_public_names():
    assert {"app.py", "deps.py", "settings.py", "sessions.py"} <= {p.name for p in HTTP_FILES}, HTTP_FILES
    public = set(server.engine.__all__)
    offenders = []
    for path in HTTP_FILES:
        for module, names in imports(path):
            if module.startswith("server.engine."):
                offenders.append(f"{path.name}: imports {module}")
            elif module == "server.engine" and not set(names) <= public:
                offenders.append(f"{path.name}: {sorted(set(names) - public)} not in server.engine.__all__")
            elif module == "server" and "engine" in names:
                offenders.append(f"{path.name}: imports the server.engine package as a module")
    assert not offenders, offenders


def test_routes_do_not_reach_into_the_engine():
    """No `engine.rt`, `engine.store`, ... in routes: they call the engine's methods and properties."""
    internals = {"rt", "store", "chat", "stats", "config"}
    offenders = []
    for path in [*sorted((SERVER_DIR / "routes").glob("*.py")), SERVER_DIR / "deps.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in internals and _is_engine(node.value):
                offenders.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert not offenders, offenders


# What the HTTP layer calls on the engine: its whole interface (a rewrite of the engine keeps these names).
ENGINE_INTERFACE = {"model_name", "tokenize", "detokenize", "prepare_text", "prepare_file", "create_session",
                    "list_sessions", "get_session", "delete_session", "import_snapshot", "fork", "export", "ingest",
                    "generate", "metrics", "start", "stop"}


def test_the_http_layer_calls_only_the_engine_interface():
    used = {node.attr for path in HTTP_FILES for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Attribute) and _is_engine(node.value)}
    assert used - ENGINE_INTERFACE == set(), "extend ENGINE_INTERFACE only with a method, never an internal"
    assert {"model_name", "generate", "ingest"} <= used  # the scan sees the routes' calls
    missing = {name for name in ENGINE_INTERFACE if not hasattr(server.engine.Engine, name)}
    assert not missing, missing


def _is_engine(node: ast.expr) -> bool:
    """`engine` or `<anything>.engine` (e.g. `request.app.state.engine`)."""
    return (isinstance(node, ast.Name) and node.id == "engine") or (isinstance(node, ast.Attribute)
                                                                    and node.attr == "engine")


def test_model_imports_nothing_above_it():
    files = sorted(MODEL_DIR.rglob("*.py"))
    assert len(files) >= 8, files
    offenders = [f"{path.relative_to(MODEL_DIR)}: {name}" for path in files for name in imported_modules(path)
                 if name.split(".")[0] in ("server", "clients", "fastapi", "starlette", "uvicorn", "httpx")]
    assert not offenders, offenders


def test_checker_sees_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import fastapi\nfrom server.errors import APIError\nfrom server.engine.store import Session\n")
    assert imports(probe) == [("fastapi", []), ("server.errors", ["APIError"]), ("server.engine.store", ["Session"])]
