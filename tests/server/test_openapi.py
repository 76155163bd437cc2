"""The OpenAPI document describes every answer: a schema for each success, the error shape for the rest, and
the SSE streams' event objects."""

from __future__ import annotations

import pytest

from server.app import create_app
from server.settings import Settings


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> dict:
    return create_app(Settings(data_dir=tmp_path_factory.mktemp("data"), secret="s")).openapi()


def test_every_operation_documents_its_success_and_errors(spec):
    schemas = spec["components"]["schemas"]
    for path, item in spec["paths"].items():
        for method, op in item.items():
            where = f"{method.upper()} {path}"
            ok = {k: v for k, v in op["responses"].items() if k.startswith("2")}
            assert ok and all(v.get("content") for v in ok.values()), where
            assert "422" not in op["responses"], f"{where}: FastAPI's validation error shape is never sent"
            if path not in ("/health", "/metrics"):
                assert op["responses"]["4XX"]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorResponse"}, where
            for response in op["responses"].values():
                for content in response.get("content", {}).values():
                    for ref in _refs(content):
                        assert ref.removeprefix("#/components/schemas/") in schemas, (where, ref)


def test_streams_name_their_event_objects(spec):
    def events(path: str) -> list[str]:
        stream = spec["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]
        json_event, done = stream["itemSchema"]["properties"]["data"]["oneOf"]
        assert done == {"const": "[DONE]"}
        one_of = json_event["contentSchema"]["oneOf"]
        return [r["$ref"].rsplit("/", 1)[1] for r in one_of]

    assert events("/v1/chat/completions") == ["ChatCompletionChunk", "ErrorResponse"]
    assert events("/v1/completions") == ["CompletionChunk", "ErrorResponse"]
    assert events("/v1/sessions/{session_id}/ingest") == ["IngestProgressEvent", "SessionObject", "ErrorResponse"]
    session = spec["components"]["schemas"]["SessionObject"]
    assert list(session["properties"]) == ["id", "object", "mode", "model", "tokens", "state_bytes", "created",
                                           "metadata"]


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        return [node["$ref"]] if "$ref" in node else [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []
