"""Long PDFs through the API with progress events: a generated one always, the R manual when installed (Debian
r-doc-pdf; the CI script installs it). The tiny model with 512-token blocks keeps this fast."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
from pypdf import PdfReader

from server.engine.documents import PAGE_SEPARATOR

R_INTRO = Path("/usr/share/R/doc/manual/R-intro.pdf")
WORDS = ("the data frame vector matrix function argument value list factor model plot summary object class "
         "method, (x <- c(1, 2, 3)); mean(x) = 2.").split()


def ingest_pdf(client, events, data: bytes, name: str) -> tuple[list[dict], dict]:
    sid = client.post("/v1/sessions").json()["id"]
    r = client.post(f"/v1/sessions/{sid}/ingest", files={"file": (name, data, "application/pdf")},
                    data={"stream": "true"})
    assert r.status_code == 200, r.text
    evs = events(r.text)
    assert evs[-1] == "[DONE]" and evs[-2]["object"] == "session", evs[-3:]
    return evs[:-2], evs[-2]


def check_progress(progress: list[dict], pages: int) -> None:
    assert all(p["object"] == "ingest.progress" and p["pages_total"] == pages for p in progress)
    tokens = [p["tokens_done"] for p in progress]
    done = [p["pages_done"] for p in progress]
    assert tokens == sorted(tokens) and done == sorted(done)
    assert tokens[-1] == progress[-1]["tokens_total"] and done[-1] == pages
    assert len(set(done)) > pages // 4  # pages complete gradually, not all at the end


def expected_tokens(client, data: bytes) -> int:
    """Tokens of the whole extracted text tokenised in one call (the chunked ingest must match it)."""
    engine = client.app.state.engine
    text = PAGE_SEPARATOR.join(p.extract_text() or "" for p in PdfReader(io.BytesIO(data)).pages)
    return len(engine.encode_document(text))


def test_long_generated_pdf(make_client, events, make_pdf, wide_block_runtime):
    client = make_client(runtime=wide_block_runtime)
    rng = random.Random(0)
    pages = [" ".join(rng.choice(WORDS) for _ in range(400)) for _ in range(40)]
    data = make_pdf(pages)
    progress, session = ingest_pdf(client, events, data, "long.pdf")
    check_progress(progress, 40)
    assert progress[-1]["tokens_total"] == expected_tokens(client, data) > 20_000
    assert session["tokens"] > progress[-1]["tokens_total"]  # plus the few tokens that open the user turn


@pytest.mark.skipif(not R_INTRO.is_file(), reason="R-intro.pdf not installed (Debian package r-doc-pdf)")
def test_r_intro_manual(make_client, events, wide_block_runtime):
    client = make_client(runtime=wide_block_runtime)
    data = R_INTRO.read_bytes()
    n_pages = len(PdfReader(io.BytesIO(data)).pages)
    progress, session = ingest_pdf(client, events, data, R_INTRO.name)
    check_progress(progress, n_pages)
    assert progress[-1]["tokens_total"] == expected_tokens(client, data)
    assert session["tokens"] > progress[-1]["tokens_total"]
