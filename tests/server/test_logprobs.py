"""logprobs and echo on /v1/completions, logprobs/top_logprobs on chat, in OpenAI's shapes, streamed and not,
checked against the log-softmax of the runtime's own logits."""

from __future__ import annotations

import math

import torch

from server.engine.chat import Turn

PROMPT = "Once upon a time there was"


def reference(rt, mode: str, ids: list[int], n: int) -> tuple[list[int], list[float], list[float]]:
    """Greedy continuation straight from the runtime: (tokens, their logprobs, the prompt's logprobs from its
    second token on)."""
    with torch.inference_mode():
        state = rt.new_state(mode=mode)
        ((state, h),) = rt.forward_many([state], [ids])  # the prompt fits one block of the wide runtime
        lp = torch.log_softmax(rt.logits(h), -1)
        prompt_lps = [float(lp[j - 1, ids[j]]) for j in range(1, len(ids))]
        toks, lps = [], []
        last = lp[-1]
        for _ in range(n):
            tok = int(last.argmax())
            toks.append(tok)
            lps.append(float(last[tok]))
            state, logits = rt.ingest(state, [tok])
            last = torch.log_softmax(logits[0], -1)
    return toks, lps, prompt_lps


def close(a: list[float | None], b: list[float]) -> bool:
    if len(a) != len(b):
        return False
    return all(x is not None and math.isclose(x, y, abs_tol=1e-3) for x, y in zip(a, b, strict=True))


def test_completion_logprobs_are_the_models(make_client, wide_block_runtime):
    client = make_client(wide_block_runtime)
    eng = client.app.state.engine
    ids = eng.encode(PROMPT)
    toks, lps, _ = reference(wide_block_runtime, eng.default_mode, ids, 5)
    body = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "temperature": 0,
                                                "logprobs": 3, "ignore_eos": True}).json()
    (choice,) = body["choices"]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert lp["tokens"] == [eng.decode([t]) for t in toks] and "".join(lp["tokens"]) == choice["text"]
    assert close(lp["token_logprobs"], lps)
    for tok, own, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert len(top) in (3, 4) and top[tok] == own  # 3 alternatives, plus the sampled token (greedy: among them)
        assert max(top.values()) == own
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(5)]


def test_echo_returns_the_prompt_with_its_logprobs(make_client, wide_block_runtime, events):
    client = make_client(wide_block_runtime)
    eng = client.app.state.engine
    ids = eng.encode(PROMPT)
    toks, lps, prompt_lps = reference(wide_block_runtime, eng.default_mode, ids, 2)
    request = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "logprobs": 0, "echo": True, "ignore_eos": True}
    (choice,) = client.post("/v1/completions", json=request).json()["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == PROMPT + eng.decode(toks)
    assert lp["tokens"] == [eng.decode([t]) for t in ids + toks]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing before the first token
    assert close(lp["token_logprobs"][1:], prompt_lps + lps)
    assert all(len(top) == 1 for top in lp["top_logprobs"][1:])  # logprobs=0: the token's own only
    # streamed: the prompt comes first, then the answer; the same tokens and logprobs
    chunks = [e for e in events(client.post("/v1/completions", json={**request, "stream": True}).text)
              if e != "[DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert sum((s["tokens"] for s in streamed), []) == lp["tokens"]
    assert sum((s["text_offset"] for s in streamed), []) == lp["text_offset"]
    got = sum((s["token_logprobs"] for s in streamed), [])
    assert got[0] is None and close(got[1:], lp["token_logprobs"][1:])


def test_echo_without_logprobs(make_client, wide_block_runtime):
    client = make_client(wide_block_runtime)
    (choice,) = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0,
                                                     "echo": True}).json()["choices"]
    assert choice["text"].startswith(PROMPT) and choice["logprobs"] is None


def test_chat_logprobs_and_top_logprobs(make_client, wide_block_runtime, events):
    client = make_client(wide_block_runtime)
    eng = client.app.state.engine
    messages = [{"role": "user", "content": "Say something"}]
    ids = eng.encode(eng.chat.chat_prompt(Turn.NONE, messages))
    toks, lps, _ = reference(wide_block_runtime, eng.default_mode, ids, 4)
    request = {"messages": messages, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 2,
               "ignore_eos": True}
    (choice,) = client.post("/v1/chat/completions", json=request).json()["choices"]
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == [eng.decode([t]) for t in toks]
    assert close([c["logprob"] for c in content], lps)
    for c in content:
        assert set(c) == {"token", "logprob", "bytes", "top_logprobs"} and c["bytes"] == list(c["token"].encode())
        assert len(c["top_logprobs"]) == 2 and c["top_logprobs"][0]["logprob"] == c["logprob"]  # greedy: the top
        assert c["top_logprobs"][0]["logprob"] >= c["top_logprobs"][1]["logprob"]
    # streamed: each content chunk carries its tokens' logprobs
    chunks = [e for e in events(client.post("/v1/chat/completions", json={**request, "stream": True}).text)
              if e != "[DONE]"]
    streamed = sum((c["choices"][0]["logprobs"]["content"] for c in chunks if c["choices"][0]["logprobs"]), [])
    assert [c["token"] for c in streamed] == [c["token"] for c in content]
    assert close([c["logprob"] for c in streamed], [c["logprob"] for c in content])
    # logprobs without top_logprobs: the tokens' own only
    (plain,) = client.post("/v1/chat/completions", json={**request, "top_logprobs": None}).json()["choices"]
    assert all(c["top_logprobs"] == [] for c in plain["logprobs"]["content"])


def test_echo_with_max_tokens_zero_scores_the_prompt(make_client, wide_block_runtime):
    """What evaluation harnesses send to score a text: echo, logprobs, max_tokens 0."""
    client = make_client(wide_block_runtime)
    eng = client.app.state.engine
    ids = eng.encode(PROMPT)
    _, _, prompt_lps = reference(wide_block_runtime, eng.default_mode, ids, 0)
    body = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0, "logprobs": 1,
                                                "echo": True}).json()
    (choice,) = body["choices"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] == len(ids)
    lp = choice["logprobs"]
    assert lp["tokens"] == [eng.decode([t]) for t in ids] and lp["token_logprobs"][0] is None
    assert close(lp["token_logprobs"][1:], prompt_lps)
