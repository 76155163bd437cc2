"""Documents to tokens: extraction of text and PDFs, and chunked tokenisation equal to one-call tokenisation."""

from __future__ import annotations

import pytest

from server.engine.documents import (
    PAGE_SEPARATOR,
    chunking_is_exact,
    extract,
    next_safe_cut,
    safe_cut,
    tokenize_pages,
)
from server.engine.errors import DocumentTooLarge, InvalidRequest, PdfEncrypted, PdfInvalid, PdfNoText

PAGES = [
    "Chapter 1.  The  beginning\n\nIt was a dark\tand stormy night; the rain fell in torrents — except at "
    "occasional intervals (12 345 or 6789 of them).\n",
    "  Indented line with trailing spaces   \n\n\n- item one\n- item two: naïve café, 東京, emoji 🙂 end.",
    "x" * 300 + " y " + "z" * 5 + "   ",
    "Last page.",
]


@pytest.fixture(scope="module")
def encode(tiny_runtime):
    tok = tiny_runtime.tokenizer
    return lambda text: list(tok.encode(text, add_special_tokens=False, split_special_tokens=True))


@pytest.mark.parametrize("chunk_chars", [1, 7, 50, 1000, 10**6])
def test_chunked_tokenisation_equals_whole_text(encode, chunk_chars):
    doc = tokenize_pages(PAGES, encode, chunk_chars=chunk_chars)
    assert doc.ids == encode(PAGE_SEPARATOR.join(PAGES))
    assert doc.page_ends == sorted(doc.page_ends) and doc.page_ends[-1] == len(doc.ids)
    assert len(doc.page_ends) == len(PAGES)


def test_small_chunks_really_cut_the_text(encode):
    calls = []
    tokenize_pages(PAGES, lambda t: calls.append(t) or encode(t), chunk_chars=20)
    assert len(calls) > 2 * len(PAGES)  # the text went to the tokenizer in many pieces
    assert "".join(calls) == PAGE_SEPARATOR.join(PAGES)
    assert max(len(c) for c in calls if " " in c[1:]) < 400  # bounded, except where no space allows a cut


@pytest.mark.parametrize("chunk_chars", [1, 10**6])
def test_page_ends_in_tokens(encode, chunk_chars):
    pages = ["one two three four five six seven", "eight nine", "ten eleven twelve"]
    doc = tokenize_pages(pages, encode, chunk_chars=chunk_chars)
    exact = [len(encode(PAGE_SEPARATOR.join(pages[:i + 1]))) for i in range(3)]
    assert doc.page_ends[-1] == exact[-1] == len(doc.ids)
    assert all(abs(a - b) <= 2 for a, b in zip(doc.page_ends, exact, strict=True))  # interpolated in one call
    assert doc.pages_done(0) == 0 and doc.pages_done(exact[0] + 2) >= 1 and doc.pages_done(len(doc.ids)) == 3


def test_safe_cut():
    assert safe_cut("abc def") == 3
    assert safe_cut("abc  def") == 3  # before the whole run of spaces
    assert safe_cut("abc\n def") == -1  # a space after a newline is not a safe cut
    assert safe_cut("nospace") == -1
    assert safe_cut(" leading") == -1
    assert safe_cut("a b c d", 0, 4) == 3 and safe_cut("a b c d", 3, 4) == -1
    assert next_safe_cut("a b c", 2) == 3 and next_safe_cut("abc", 0) == -1


def test_tokenizer_probe(encode):
    assert chunking_is_exact(encode)

    def prefixing(text):  # a SentencePiece-like tokenizer that marks the start of every call
        return [0] + encode(text)

    assert not chunking_is_exact(prefixing)
    doc = tokenize_pages(PAGES, prefixing, chunk_chars=5, exact_chunks=False)
    assert doc.ids == prefixing(PAGE_SEPARATOR.join(PAGES))  # falls back to one call


def test_text_files():
    assert extract("héllo".encode(), "text/plain", None, 10).pages == ["héllo"]
    assert extract(b"# Title\n", None, "notes.md", 10).kind == "text"
    with pytest.raises(InvalidRequest, match="UTF-8"):
        extract(b"\xff\xfe\x00bad", "text/plain", None, 10)
    with pytest.raises(InvalidRequest, match="empty"):
        extract(b"  \n ", "text/plain", None, 10)
    with pytest.raises(InvalidRequest, match="unsupported"):
        extract(b"\x89PNG...", "image/png", "x.png", 10)


def test_pdf_pages(make_pdf):
    doc = extract(make_pdf(["First page.", "Second page."]), "application/pdf", "a.pdf", 10)
    assert doc.kind == "pdf" and [p.strip() for p in doc.pages] == ["First page.", "Second page."]


def test_pdf_detected_by_content(make_pdf):
    assert extract(make_pdf(["Hi there."]), "application/octet-stream", None, 10).kind == "pdf"


def test_bad_pdfs(make_pdf, encrypt_pdf):
    with pytest.raises(PdfInvalid):
        extract(b"this is not a pdf at all", "application/pdf", None, 10)
    with pytest.raises(PdfInvalid):
        extract(b"%PDF-1.7\n1 0 obj << /Type /Catalog >> garbage", None, "x.pdf", 10)
    with pytest.raises(PdfEncrypted):
        extract(encrypt_pdf(make_pdf(["Secret."]), "pw"), "application/pdf", None, 10)
    with pytest.raises(PdfNoText):
        extract(make_pdf(["", ""]), "application/pdf", None, 10)
    with pytest.raises(DocumentTooLarge, match="3 pages"):
        extract(make_pdf(["a", "b", "c"]), "application/pdf", None, 2)


def test_pdf_with_empty_user_password_opens(make_pdf, encrypt_pdf):
    doc = extract(encrypt_pdf(make_pdf(["Readable."]), ""), "application/pdf", None, 10)
    assert doc.pages[0].strip() == "Readable."
