"""schemathesis over the OpenAPI document, against the real app (tiny model) on a loopback port: no answer is a
5xx, and every answer has a documented status, content type and schema (SSE events included).

Bounded for CI on 2 cores: a few dozen examples per operation, and a short stateful run that follows the links
schemathesis infers (a created session's id into ingest, fork, export, delete, ...)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance]
LIMITS = settings(max_examples=25, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
MAX_TOKENS = 8  # the server's cap: longer requests are a 400, and short answers keep the run fast


def _operations() -> list[tuple[str, str]]:
    """(method, path) of every documented operation (the document needs no running server)."""
    from server.app import create_app

    return [(method.upper(), path) for path, item in create_app().openapi()["paths"].items() for method in item]


def _bounded(case) -> None:
    """Chat requests default to 512 tokens: ask for the server's cap unless the case sets max_tokens."""
    if isinstance(case.body, dict) and "messages" in case.body:
        case.body.setdefault("max_tokens", MAX_TOKENS)


@pytest.mark.parametrize(("method", "path"), _operations())
def test_no_5xx_and_answers_match_the_document(live_server, method, path):
    api = schemathesis.openapi.from_url(f"{live_server(max_tokens=MAX_TOKENS)}/openapi.json")

    @given(case=api[path][method].as_strategy())
    @LIMITS
    def check(case):
        _bounded(case)
        case.call_and_validate(checks=CHECKS)

    check()


def test_stateful_workflows_never_5xx(live_server):
    api = schemathesis.openapi.from_url(f"{live_server(max_tokens=MAX_TOKENS)}/openapi.json")

    class Workflow(api.as_state_machine()):  # type: ignore[misc]
        def before_call(self, case):
            _bounded(case)

        def validate_response(self, response, case, **kwargs):
            case.validate_response(response, checks=CHECKS)

    Workflow.run(settings=settings(LIMITS, max_examples=8, stateful_step_count=6))
