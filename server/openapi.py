"""What the OpenAPI document says beyond what FastAPI derives from the routes: the error answers of every
route, the SSE streams (each `data:` line is one JSON object of a protocol model, then `[DONE]`) and the binary
bodies. FastAPI lists in `components` only the models it meets in route signatures, so `install` adds the
models that appear only inside streams."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from server.protocol import ErrorResponse

REF = "#/components/schemas/{model}"
_EXTRA_MODELS: dict[type[BaseModel], JsonSchemaMode] = {ErrorResponse: "serialization"}

# every route may answer an error in OpenAI's shape (and never FastAPI's 422 HTTPValidationError: a bad body
# is a 400 `invalid_value` / `invalid_body`)
ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "the request was refused (see the error's `code`)"},
    "5XX": {"model": ErrorResponse, "description": "the server failed, is loading or is shutting down"},
}


def ref(model: type[BaseModel], mode: JsonSchemaMode = "serialization") -> dict[str, str]:
    """A reference to `model`'s schema, which `install` adds to the document's components."""
    _EXTRA_MODELS.setdefault(model, mode)
    return {"$ref": REF.format(model=model.__name__)}


def sse(*models: type[BaseModel], description: str) -> dict[str, Any]:
    """A `text/event-stream` content entry whose events carry one of `models` (or an error), then `[DONE]`."""
    json_event = {"contentMediaType": "application/json",
                  "contentSchema": {"oneOf": [ref(m) for m in (*models, ErrorResponse)]}}
    data = {"type": "string", "oneOf": [json_event, {"const": "[DONE]"}],
            "description": "one JSON object per event; the last event is `[DONE]`"}
    item = {"type": "object", "required": ["data"], "properties": {"data": data}, "description": description}
    return {"text/event-stream": {"itemSchema": item}}


def binary(description: str) -> dict[str, Any]:
    return {"application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                    "description": description}}}


def request_body(description: str, content: dict[str, Any], required: bool = True) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its body itself (several content types, or raw bytes)."""
    return {"requestBody": {"required": required, "description": description, "content": content}}


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            _, defs = models_json_schema(list(_EXTRA_MODELS.items()), ref_template=REF)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, model_schema in defs.get("$defs", {}).items():
                components.setdefault(name, model_schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
