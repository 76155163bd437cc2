"""A few answers from the real default model (SmolLM2-135M-Instruct) through the HTTP API."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from model import FamRuntime
from server.app import create_app
from server.settings import Settings

pytestmark = pytest.mark.realmodel

STORY = ("Maria owns a small bakery in Lyon. Her cat is called Whiskers and sleeps near the oven. "
         "Every morning she bakes forty croissants.")


@pytest.fixture(scope="module")
def real(default_model_dir, tmp_path_factory):
    rt = FamRuntime.load(default_model_dir, dtype="float32", device="cpu")
    settings = Settings(data_dir=tmp_path_factory.mktemp("real-data"), secret="s")
    with TestClient(create_app(settings, rt)) as client:
        yield client


def ask(client, question: str, **extra) -> str:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": question}],
                                                  "max_tokens": 24, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("mode", ["full", "bswa"])
def test_capital_of_france(real, mode):
    sid = real.post("/v1/sessions", json={"mode": mode}).json()["id"]
    assert "Paris" in ask(real, "What is the capital of France?", session_id=sid)


@pytest.mark.parametrize("mode", ["bswa", "fam"])
def test_question_about_an_ingested_document(real, mode):
    sid = real.post("/v1/sessions", json={"mode": mode}).json()["id"]
    assert real.post(f"/v1/sessions/{sid}/ingest", json={"text": STORY}).status_code == 200
    assert "Whiskers" in ask(real, "What is the name of Maria's cat?", session_id=sid)


def test_sessions_default_to_fam_with_the_bundled_adapter(tmp_path):
    """The bundled adapter passed the depth test (within 1 point of sink to 1M tokens, docs/depth_float32_w8k.md)
    and declares `fam` its default mode; without an adapter sessions default to sink."""
    rt = FamRuntime.load(None, adapter="auto")
    assert rt.adapter is not None and rt.fam_config.mode == "fam" and rt.adapter.default_mode == "fam"
    with TestClient(create_app(Settings(data_dir=tmp_path, secret="s"), rt)) as client:
        assert client.post("/v1/sessions").json()["mode"] == "fam"
        assert client.post("/v1/sessions", json={"mode": "sink"}).json()["mode"] == "sink"
