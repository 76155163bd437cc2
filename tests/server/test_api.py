"""The HTTP API in-process: sessions, ingest (JSON, multipart, raw, SSE progress, idempotency), fork, snapshots,
OpenAI-shaped completions and chat (streaming, usage, stop, commit), tokenizer routes, health, metrics, auth."""

from __future__ import annotations

import threading

import pytest
import torch
from fastapi.testclient import TestClient

from model import FamConfig, FamRuntime
from server import app as app_module
from server.app import create_app
from server.settings import Settings

TEXT = ("The lighthouse keeper wrote in her log every evening. The storms came from the west, "
        "and the ships stayed in the harbour until the sea was calm again. ") * 3
ASK = [{"role": "user", "content": "Where did the storms come from?"}]


def new_session(client, **body) -> str:
    r = client.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def greedy_chat(client, sid=None, max_tokens=6, **extra):
    body = {"model": "any", "messages": ASK, "max_tokens": max_tokens, "temperature": 0, **extra}
    if sid:
        body["session_id"] = sid
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------------------------------------------- sessions


def test_session_lifecycle(client, tiny_runtime):
    r = client.post("/v1/sessions", json={"mode": "bswa", "metadata": {"title": "log"}})
    assert r.status_code == 201
    s = r.json()
    assert set(s) == {"id", "object", "mode", "model", "tokens", "state_bytes", "created", "metadata"}
    assert (s["object"], s["mode"], s["model"], s["tokens"], s["metadata"]) == (
        "session", "bswa", tiny_runtime.name, 0, {"title": "log"})
    assert s["state_bytes"] > 0
    default = client.post("/v1/sessions").json()  # no body: the server's default mode (no adapter: sink)
    assert tiny_runtime.adapter is None and default["mode"] == "sink"
    listed = client.get("/v1/sessions").json()
    assert listed["object"] == "list" and {x["id"] for x in listed["data"]} == {s["id"], default["id"]}
    assert client.get(f"/v1/sessions/{s['id']}").json() == s
    assert client.delete(f"/v1/sessions/{s['id']}").json() == {"id": s["id"], "object": "session.deleted",
                                                               "deleted": True}
    assert client.get(f"/v1/sessions/{s['id']}").status_code == 404
    assert [x["id"] for x in client.get("/v1/sessions").json()["data"]] == [default["id"]]


def test_sessions_default_to_the_mode_the_adapter_declares(make_client, tiny_chat_dir, tmp_path):
    """An adapter that records default_mode (the bundled one: fam, once it passed the depth test) gives new sessions
    that mode; --mode overrides it; an adapter that records none leaves sink (test_session_lifecycle)."""
    from model.adapter import save_adapter

    base = FamRuntime.load(tiny_chat_dir, dtype="float32")
    meta = {"base_model": base.name, "base_model_fingerprint": base.model_fingerprint,
            "fam_config": base.fam_config.__dict__, "lora": {"r": 2, "alpha": 4}}
    for declared, expected in ((None, "sink"), ("fam", "fam"), ("bswa", "bswa")):
        path = tmp_path / f"{declared}.safetensors"
        save_adapter(path, base.module.fam_prompt, {}, meta | ({"default_mode": declared} if declared else {}))
        rt = FamRuntime.load(tiny_chat_dir, dtype="float32", adapter=path)
        client = make_client(rt, data_dir=tmp_path / f"data-{declared}")
        assert client.post("/v1/sessions").json()["mode"] == expected
    assert make_client(rt, data_dir=tmp_path / "told", mode="full").post("/v1/sessions").json()["mode"] == "full"


def test_ingest_json_grows_the_session(client):
    sid = new_session(client)
    r = client.post(f"/v1/sessions/{sid}/ingest", json={"text": TEXT})
    assert r.status_code == 200 and r.json()["object"] == "session"
    first = r.json()["tokens"]
    assert first > 0
    second = client.post(f"/v1/sessions/{sid}/ingest", json={"text": "More."}).json()["tokens"]
    assert first < second < first + 10  # the turn opens once: the second ingest adds only its own tokens
    assert client.get(f"/v1/sessions/{sid}").json()["tokens"] == second


def test_ingest_stream_reports_progress(client, events):
    sid = new_session(client)
    r = client.post(f"/v1/sessions/{sid}/ingest", json={"text": TEXT, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    evs = events(r.text)
    assert evs[-1] == "[DONE]" and evs[-2]["object"] == "session"
    progress = evs[:-2]
    assert len(progress) > 3 and all(e["object"] == "ingest.progress" for e in progress)
    done = [e["tokens_done"] for e in progress]
    assert done == sorted(done) and done[-1] == progress[-1]["tokens_total"]
    assert all(e["pages_done"] is None and e["pages_total"] is None for e in progress)  # text has no pages
    assert evs[-2]["tokens"] >= progress[-1]["tokens_total"]


def test_ingest_pdf_multipart_with_query_stream(client, events, make_pdf):
    sid = new_session(client)
    pdf = make_pdf(["First page about storms. " * 8, "Second page about ships. " * 8, "Third page."])
    r = client.post(f"/v1/sessions/{sid}/ingest?stream=true", files={"file": ("log.pdf", pdf, "application/pdf")})
    evs = events(r.text)
    progress = [e for e in evs if isinstance(e, dict) and e.get("object") == "ingest.progress"]
    assert progress[-1]["pages_total"] == 3 and progress[-1]["pages_done"] == 3
    pages = [e["pages_done"] for e in progress]
    assert pages == sorted(pages) and pages[0] < 3  # pages complete one after another
    assert evs[-1] == "[DONE]" and evs[-2]["tokens"] > 0


def test_ingest_raw_text_body(client):
    sid = new_session(client)
    r = client.post(f"/v1/sessions/{sid}/ingest", content=TEXT.encode(), headers={"content-type": "text/plain"})
    assert r.status_code == 200 and r.json()["tokens"] > 0


def test_idempotent_ingest_over_http(client):
    sid = new_session(client)
    headers = {"Idempotency-Key": "upload-1"}
    first = client.post(f"/v1/sessions/{sid}/ingest", json={"text": TEXT}, headers=headers)
    again = client.post(f"/v1/sessions/{sid}/ingest", json={"text": TEXT}, headers=headers)
    assert again.status_code == 200 and again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert client.get(f"/v1/sessions/{sid}").json()["tokens"] == first.json()["tokens"]  # ingested once
    other = client.post(f"/v1/sessions/{sid}/ingest", json={"text": "different"}, headers=headers)
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"


def _state(client, sid, rt):
    data = client.get(f"/v1/sessions/{sid}/state").content
    return client.app.state.engine.store.unpack(data)[0]


def _next_logits(rt, state):
    with torch.inference_mode():
        return rt.ingest(state, rt.encode(" and"))[1]


def test_text_ingested_in_pieces_equals_whole_text(client, tiny_runtime):
    cut = TEXT.index(" ships")  # a space after a non-space: tokenisation does not change across the cut
    whole, pieces = new_session(client), new_session(client)
    client.post(f"/v1/sessions/{whole}/ingest", json={"text": TEXT})
    client.post(f"/v1/sessions/{pieces}/ingest", json={"text": TEXT[:cut]})
    client.post(f"/v1/sessions/{pieces}/ingest", json={"text": TEXT[cut:]})
    a, b = _state(client, whole, tiny_runtime), _state(client, pieces, tiny_runtime)
    assert int(a.n_tokens[0]) == int(b.n_tokens[0])
    torch.testing.assert_close(_next_logits(tiny_runtime, a), _next_logits(tiny_runtime, b))


def test_fork_is_independent(client):
    sid = new_session(client)
    client.post(f"/v1/sessions/{sid}/ingest", json={"text": TEXT})
    r = client.post(f"/v1/sessions/{sid}/fork")
    assert r.status_code == 201
    fork = r.json()
    assert fork["id"] != sid and fork["tokens"] == client.get(f"/v1/sessions/{sid}").json()["tokens"]
    assert greedy_chat(client, fork["id"])["choices"] == greedy_chat(client, sid)["choices"]
    client.post(f"/v1/sessions/{fork['id']}/ingest", json={"text": "A new chapter."})
    assert client.get(f"/v1/sessions/{fork['id']}").json()["tokens"] > fork["tokens"]
    assert client.get(f"/v1/sessions/{sid}").json()["tokens"] == fork["tokens"]


def test_snapshot_export_import_round_trip(client):
    sid = new_session(client, metadata={"book": "log"})
    client.post(f"/v1/sessions/{sid}/ingest", json={"text": TEXT})
    snap = client.get(f"/v1/sessions/{sid}/state")
    assert snap.status_code == 200 and snap.headers["content-type"] == "application/octet-stream"
    r = client.post("/v1/sessions/import", content=snap.content)
    assert r.status_code == 201
    copy = r.json()
    assert copy["id"] != sid and copy["metadata"] == {"book": "log"}
    assert copy["tokens"] == client.get(f"/v1/sessions/{sid}").json()["tokens"]
    assert greedy_chat(client, copy["id"])["choices"] == greedy_chat(client, sid)["choices"]


def test_snapshot_from_another_configuration_is_refused(make_client, tiny_chat_dir, error):
    source = make_client()
    sid = new_session(source)
    snap = source.get(f"/v1/sessions/{sid}/state").content
    other_rt = FamRuntime.load(tiny_chat_dir, fam=FamConfig(block_size=32, memory_blocks=1, fam_len=4),
                               dtype="float32")
    other = make_client(runtime=other_rt, data_dir=source.app.state.settings.data_dir.parent / "other")
    err = error(other.post("/v1/sessions/import", content=snap), 422, "invalid_snapshot")
    assert "block_size" in err["message"]


def test_snapshot_signed_by_another_server_is_refused(make_client, tmp_path, error):
    source = make_client()
    snap = source.get(f"/v1/sessions/{new_session(source)}/state").content
    other = make_client(secret="another-secret", data_dir=tmp_path / "other")
    err = error(other.post("/v1/sessions/import", content=snap), 422, "invalid_snapshot")
    assert "signature" in err["message"]


# ---------------------------------------------------------------------------------------------------- generation


def test_completion_shape(client):
    r = client.post("/v1/completions", json={"model": "x", "prompt": "Once upon a time", "max_tokens": 5,
                                             "temperature": 0})
    body = r.json()
    assert r.status_code == 200
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert isinstance(body["created"], int) and body["model"] == client.app.state.engine.rt.name
    (choice,) = body["choices"]
    assert set(choice) == {"index", "text", "finish_reason", "logprobs"}
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["logprobs"] is None
    usage = body["usage"]
    assert usage["completion_tokens"] == 5 and usage["total_tokens"] == usage["prompt_tokens"] + 5
    assert usage["prompt_tokens"] == len(client.post("/tokenize", json={"text": "Once upon a time"}).json()["tokens"])


def test_completion_from_token_ids_matches_text(client):
    ids = client.post("/tokenize", json={"text": "Once upon a time"}).json()["tokens"]
    by_text = client.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0})
    by_ids = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 4, "temperature": 0})
    assert by_ids.json()["choices"][0]["text"] == by_text.json()["choices"][0]["text"]


def test_chat_shape_and_session_usage(client):
    sid = new_session(client)
    tokens = client.post(f"/v1/sessions/{sid}/ingest", json={"text": TEXT}).json()["tokens"]
    body = greedy_chat(client, sid)
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    msg = body["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == tokens
    assert body["usage"]["prompt_tokens"] > tokens


def test_stream_chunks_and_usage(client, events):
    r = client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 5, "temperature": 0, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    evs = events(r.text)
    assert evs[-1] == "[DONE]"
    chunks, usage = evs[:-2], evs[-2]
    assert {c["id"] for c in chunks} == {usage["id"]} and len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["choices"][0]["delta"] == {}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == greedy_chat(client, max_tokens=5)["choices"][0]["message"]["content"]


def test_completion_stream_without_usage(client, events):
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "stream": True, "temperature": 0})
    evs = events(r.text)
    assert evs[-1] == "[DONE]" and all("usage" not in c for c in evs[:-1])
    assert all(c["object"] == "text_completion" for c in evs[:-1])
    assert evs[-2]["choices"][0]["finish_reason"] == "length"


def test_stop_string_ends_the_answer(client):
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0, "seed": 7}  # seeded: repeatable
    full = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), f"need a visible stop string in {full!r}"
    cut = client.post("/v1/completions", json={**body, "stop": stop}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full[:full.index(stop)]


def test_seed_makes_sampling_repeatable(client):
    body = {"prompt": "The sea", "max_tokens": 6, "temperature": 1.0, "seed": 1234}
    a, b = client.post("/v1/completions", json=body).json(), client.post("/v1/completions", json=body).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_commit_appends_only_when_asked(client):
    sid = new_session(client)
    tokens = client.post(f"/v1/sessions/{sid}/ingest", json={"text": TEXT}).json()["tokens"]
    answer = greedy_chat(client, sid)
    assert client.get(f"/v1/sessions/{sid}").json()["tokens"] == tokens  # a question on a copy
    committed = greedy_chat(client, sid, commit=True)
    assert committed["choices"] == answer["choices"]
    usage = committed["usage"]
    after = client.get(f"/v1/sessions/{sid}").json()["tokens"]
    assert after == usage["prompt_tokens"] + usage["completion_tokens"]  # stopped by length: no end token
    # the next question now follows the committed turn
    follow = greedy_chat(client, sid)
    assert follow["usage"]["prompt_tokens_details"]["cached_tokens"] == after


def test_completion_commit_appends_raw_text(client):
    sid = new_session(client)
    r = client.post("/v1/completions", json={"prompt": "Dear diary,", "max_tokens": 3, "temperature": 0,
                                             "session_id": sid, "commit": True}).json()
    assert client.get(f"/v1/sessions/{sid}").json()["tokens"] == r["usage"]["total_tokens"]


def test_long_prompt_without_session_is_accepted(make_client, wide_block_runtime):
    client = make_client(runtime=wide_block_runtime)
    prompt = "word " * 100_000
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] >= 100_000


def test_full_mode_answers_up_to_the_context(make_client, wide_block_runtime, error):
    client = make_client(runtime=wide_block_runtime, mode="full")
    ctx = wide_block_runtime.module.arch.max_position_embeddings
    word = client.post("/tokenize", json={"text": " word"}).json()["tokens"]
    r = client.post("/v1/completions", json={"prompt": word * (ctx - 2), "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2 and r.json()["choices"][0]["finish_reason"] == "length"
    error(client.post("/v1/completions", json={"prompt": word * ctx, "max_tokens": 1}), 400,
          "context_length_exceeded")


def test_max_tokens_cap(make_client, error):
    client = make_client(max_tokens=8)
    error(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 9}), 400, "invalid_value")
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 8}).status_code == 200


# ---------------------------------------------------------------------------------------------------- other routes


def test_models_tokenizer_health(client, tiny_runtime):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [tiny_runtime.name]
    assert models["data"][0]["object"] == "model"
    tok = client.post("/tokenize", json={"text": "Hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) == 2
    assert client.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"text": "Hello world"}
    assert client.get("/health").json() == {"status": "ok", "model": tiny_runtime.name}


def test_metrics(client):
    sid = new_session(client)
    client.post(f"/v1/sessions/{sid}/ingest", json={"text": TEXT})
    greedy_chat(client, max_tokens=3)
    text = client.get("/metrics").text
    lines = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert lines["fam_sessions"] == 1 and lines["fam_state_bytes"] > 0 and lines["fam_queue_depth"] == 0
    assert 1 <= lines["fam_ingest_busy_tokens"] <= 256  # the engine has measured the ingest above
    assert lines["fam_tokens_ingested_total"] >= client.get(f"/v1/sessions/{sid}").json()["tokens"]
    assert lines["fam_tokens_generated_total"] >= 3
    assert any(k.startswith('fam_request_seconds_bucket{') and 'route="/v1/chat/completions"' in k for k in lines)


def test_health_is_503_while_loading(monkeypatch, tmp_path, tiny_runtime, error):
    release = threading.Event()

    def slow_load(settings):
        release.wait(10)
        return tiny_runtime

    monkeypatch.setattr(app_module, "load_runtime", slow_load)
    with TestClient(create_app(Settings(data_dir=tmp_path, secret="s"))) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        error(client.get("/v1/models"), 503, "model_loading")
        release.set()
        for _ in range(200):
            if client.get("/health").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert client.get("/v1/models").status_code == 200


def test_the_model_loads_in_a_thread_that_ends_with_the_load(monkeypatch, tmp_path, tiny_runtime):
    """Torch work in a thread that lives on (asyncio's pool) leaves an OpenMP team beside the model worker's, and
    libgomp then stops spinning between ops: the server's ingest ran at 0.68x the in-process rate (README)."""
    loaders: list[threading.Thread] = []

    def load(settings):
        loaders.append(threading.current_thread())
        return tiny_runtime

    monkeypatch.setattr(app_module, "load_runtime", load)
    with TestClient(create_app(Settings(data_dir=tmp_path, secret="s"))) as client:
        for _ in range(200):
            if client.get("/health").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert client.get("/health").status_code == 200
        (loader,) = loaders
        loader.join(5)
        assert loader is not threading.main_thread() and not loader.is_alive()


def test_cpu_has_amx_reads_the_flags(tmp_path):
    from model.loader import cpu_has_amx

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert cpu_has_amx(str(info)) is True
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert cpu_has_amx(str(info)) is False
    assert cpu_has_amx(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("amx, dtype", [(True, torch.bfloat16), (False, torch.float32), (None, torch.float32)])
def test_dtype_auto_is_bfloat16_only_on_cpus_with_amx(monkeypatch, amx, dtype):
    from model import loader

    monkeypatch.setattr(loader, "cpu_has_amx", lambda: amx)
    assert loader.resolve_dtype("auto", torch.device("cpu")) == dtype
    assert loader.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16  # asked for, it is kept


def test_failed_load_is_reported(tmp_path, error):
    with TestClient(create_app(Settings(data_dir=tmp_path, secret="s", model=str(tmp_path / "missing")))) as client:
        for _ in range(100):
            if client.get("/health").json()["status"] != "loading":
                break
            threading.Event().wait(0.05)
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "error" and "missing" in r.json()["error"]
        assert "failed to load" in error(client.post("/v1/sessions"), 503, "model_loading")["message"]


# ---------------------------------------------------------------------------------------------------- auth


@pytest.fixture
def secured(make_client):
    return make_client(api_keys="key-one, key-two")


def test_api_keys_required(secured, error):
    err = error(secured.get("/v1/models"), 401, "unauthorized")
    assert err["type"] == "authentication_error"
    error(secured.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
    error(secured.post("/tokenize", json={"text": "x"}), 401, "unauthorized")
    error(secured.post("/v1/completions", content=b"{bad", headers={"content-type": "application/json"}), 401,
          "unauthorized")  # refused before the body is read
    assert secured.get("/health").status_code == 200 and secured.get("/metrics").status_code == 200
    assert secured.get("/v1/models", headers={"Authorization": "Bearer key-two"}).status_code == 200


def test_sessions_are_private_to_their_key(secured, error):
    one, two = {"Authorization": "Bearer key-one"}, {"Authorization": "Bearer key-two"}
    sid = secured.post("/v1/sessions", headers=one).json()["id"]
    error(secured.get(f"/v1/sessions/{sid}", headers=two), 404, "session_not_found")
    error(secured.post(f"/v1/sessions/{sid}/ingest", json={"text": "x"}, headers=two), 404, "session_not_found")
    error(secured.post("/v1/chat/completions", json={"messages": ASK, "session_id": sid}, headers=two), 404,
          "session_not_found")
    error(secured.delete(f"/v1/sessions/{sid}", headers=two), 404, "session_not_found")
    assert secured.get("/v1/sessions", headers=two).json()["data"] == []
    assert [s["id"] for s in secured.get("/v1/sessions", headers=one).json()["data"]] == [sid]
