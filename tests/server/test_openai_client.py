"""The stock `openai` Python client against a real server on loopback: what OpenAI-compatible means in practice."""

from __future__ import annotations

import httpx
import openai
import pytest

KEY = "sk-test"


@pytest.fixture
def base(live_server) -> str:
    return live_server(api_keys=KEY)


@pytest.fixture
def oai(base) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)


def test_models(oai):
    (model,) = oai.models.list().data
    assert model.object == "model" and model.id


def test_completion(oai):
    r = oai.completions.create(model="any", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].finish_reason == "length" and isinstance(r.choices[0].text, str)
    assert r.usage.completion_tokens == 5 and r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_chat(oai):
    r = oai.chat.completions.create(model="any", messages=[{"role": "system", "content": "Be brief."},
                                                           {"role": "user", "content": "Hello"}],
                                    max_completion_tokens=4, temperature=0, seed=3)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"


def test_streaming_chat_with_usage(oai):
    stream = oai.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
                                         temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    plain = oai.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
                                        temperature=0)
    assert text == plain.choices[0].message.content


def test_streaming_completion(oai):
    pieces = [c.choices[0].text for c in oai.completions.create(model="any", prompt="Hi", max_tokens=4,
                                                                temperature=0, stream=True)]
    plain = oai.completions.create(model="any", prompt="Hi", max_tokens=4, temperature=0)
    assert "".join(pieces) == plain.choices[0].text


def test_session_through_extra_body(oai, base):
    headers = {"Authorization": f"Bearer {KEY}"}
    sid = httpx.post(f"{base}/v1/sessions", headers=headers).json()["id"]
    tokens = httpx.post(f"{base}/v1/sessions/{sid}/ingest", json={"text": "The harbour is quiet tonight."},
                        headers=headers).json()["tokens"]
    r = oai.chat.completions.create(model="any", messages=[{"role": "user", "content": "Is it quiet?"}],
                                    max_tokens=3, temperature=0, extra_body={"session_id": sid})
    assert r.usage.prompt_tokens_details.cached_tokens == tokens
    r = oai.chat.completions.create(model="any", messages=[{"role": "user", "content": "Is it quiet?"}],
                                    max_tokens=3, temperature=0, extra_body={"session_id": sid, "commit": True})
    assert httpx.get(f"{base}/v1/sessions/{sid}", headers=headers).json()["tokens"] > tokens


def test_errors_raise_the_right_exceptions(oai, base):
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="any", messages=[{"role": "user", "content": "x"}],
                                    extra_body={"session_id": "sess_missing"})
    assert e.value.code == "session_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="any", prompt="x", n=2)
    assert e.value.code == "invalid_value" and e.value.param == "n"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()


def test_error_inside_a_stream_raises(oai, base):
    headers = {"Authorization": f"Bearer {KEY}"}
    sid = httpx.post(f"{base}/v1/sessions", json={"mode": "full"}, headers=headers).json()["id"]
    too_long = "word " * 9000  # more than the model's 8192-token context: refused once the job starts
    stream = oai.completions.create(model="any", prompt=too_long, max_tokens=2, stream=True,
                                    extra_body={"session_id": sid})
    with pytest.raises(openai.APIError, match="context"):
        list(stream)
