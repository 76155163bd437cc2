"""The client's types read only what the server's response models guarantee, so the two cannot drift apart:
each client type is built from an object the server's model produced."""

from __future__ import annotations

import dataclasses

import pytest

from clients import types
from server import protocol
from server.engine import GenerationResult

RESULT = GenerationResult(text="Paris.", finish_reason="stop", prompt_tokens=7, completion_tokens=2,
                          cached_tokens=5)
SESSION = protocol.SessionObject(id="sess_1", mode="fam", model="m", tokens=3, state_bytes=10, created=1,
                                 metadata={"k": "v"})


@pytest.mark.parametrize(("client_type", "server_models"), [
    (types.Session, [protocol.SessionObject]),
    (types.IngestProgress, [protocol.IngestProgressEvent]),
    (types.Usage, [protocol.Usage]),
    (types.Model, [protocol.ModelCard]),
])
def test_client_fields_are_server_fields(client_type, server_models):
    for model in server_models:
        assert {f.name for f in dataclasses.fields(client_type)} <= set(model.model_fields), model


def test_client_types_parse_what_the_server_sends():
    assert types.Session.from_dict(SESSION.model_dump(mode="json")) == types.Session(
        id="sess_1", mode="fam", model="m", tokens=3, state_bytes=10, created=1, metadata={"k": "v"})
    event = protocol.IngestProgressEvent(tokens_done=1, tokens_total=2, pages_done=None, pages_total=None)
    assert types.IngestProgress.from_dict(event.model_dump()) == types.IngestProgress(1, 2)
    for chat in (False, True):
        reply = protocol.Reply("m", chat=chat, include_usage=True)
        parsed = types.Completion.from_dict(reply.complete(RESULT).model_dump(mode="json"))
        assert (parsed.text, parsed.finish_reason, parsed.model) == ("Paris.", "stop", "m")
        assert parsed.usage == types.Usage(7, 2, 9)
    card = protocol.ModelCard(id="m", created=1, owned_by="fam-server")
    assert types.Model.from_dict(protocol.ModelList(data=[card]).model_dump()["data"][0]) == types.Model(
        "m", "fam-server", 1)
