"""Documents to token ids: text extraction (plain text, markdown, PDF) and chunked tokenisation.

A document is a list of pages (one page for text files); its text is the pages joined by PAGE_SEPARATOR.
Tokenisation is incremental (a page at a time, in chunks of bounded size) and exact: the ids are those of
tokenising the whole text in one call. A chunk is cut only just before a space that follows a non-space
character; byte-level BPE pre-tokenisers (GPT-2, Llama 3, Qwen2) never join those two characters in one
pre-token, and their regex reads forwards only, so the text after the cut tokenises the same on its own.
`chunking_is_exact` checks this for the loaded tokenizer at startup (SentencePiece tokenizers that prepend a
space to every call fail it); where it fails, the document is tokenised in one call.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import logging
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from server.engine.errors import DocumentTooLarge, InvalidRequest, PdfEncrypted, PdfInvalid, PdfNoText

log = logging.getLogger(__name__)

PAGE_SEPARATOR = "\n\n"
CHUNK_CHARS = 64 * 1024  # text handed to the tokenizer per call (about 15k tokens)
PDF_TYPES = ("application/pdf", "application/x-pdf")
TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown")
PROBE_TEXT = "Alpha  beta, gamma.\n\nDelta\tepsilon 12 345 6789 x  y.\n- item one\n- item two (3.14)  end "

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class Document:
    pages: list[str]
    kind: str  # "text" or "pdf"


@dataclass(frozen=True)
class TokenizedDocument:
    ids: list[int]
    page_ends: list[int]  # page_ends[i]: tokens up to the end of page i (for pages_done in progress)
    paged: bool = True  # a PDF has pages to report; a text file has none

    @property
    def digest(self) -> str:
        """Identifies the content (not its encoding on the wire): a repeated Idempotency-Key is checked
        against it."""
        return hashlib.sha256(array("l", self.ids).tobytes()).hexdigest()

    def pages_done(self, tokens_done: int) -> int:
        return sum(1 for end in self.page_ends if end <= tokens_done)


# ------------------------------------------------------------------------------------------------ extraction


def extract(data: bytes, content_type: str | None, filename: str | None, max_pages: int) -> Document:
    """Bytes of an uploaded file -> pages. PDF when the type, the name or the content says so; else UTF-8 text."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    name = (filename or "").lower()
    if ctype in PDF_TYPES or name.endswith(".pdf") or data.startswith(b"%PDF-"):
        return extract_pdf(data, max_pages)
    if ctype.startswith("text/") or name.endswith(TEXT_SUFFIXES) or ctype in ("", "application/octet-stream"):
        return text_document(decode_text(data))
    raise InvalidRequest(f"unsupported file type {ctype!r}: send a PDF, plain text or markdown", param="file")


def decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"the file is not UTF-8 text (byte {e.start}: {e.reason})", param="file") from e


def text_document(text: str) -> Document:
    if not text.strip():
        raise InvalidRequest("the text is empty", param="text")
    return Document(pages=[text], kind="text")


def extract_pdf(data: bytes, max_pages: int) -> Document:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not _decrypt_without_password(reader):
            raise PdfEncrypted("the PDF is encrypted (password-protected); send an unencrypted copy")
        n = len(reader.pages)
    except PdfEncrypted:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError) as e:
        # pypdf reports damaged files through many exception types; all mean "not a readable PDF" here
        raise PdfInvalid(f"not a readable PDF ({type(e).__name__}: {e})") from e
    if n > max_pages:
        raise DocumentTooLarge(f"the PDF has {n} pages; this server accepts at most {max_pages}")
    pages = []
    for i, page in enumerate(reader.pages):
        try:
            pages.append(page.extract_text() or "")
        except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError) as e:
            raise PdfInvalid(f"page {i + 1} of the PDF is damaged ({type(e).__name__}: {e})") from e
    if not any(p.strip() for p in pages):
        raise PdfNoText(f"the PDF ({n} pages) has no extractable text (scanned images need OCR first)")
    return Document(pages=pages, kind="pdf")


def _decrypt_without_password(reader) -> bool:
    """Many PDFs are encrypted with an empty user password (owner restrictions only): those open."""
    from pypdf.errors import DependencyError, PdfReadError

    try:
        return bool(reader.decrypt(""))
    except (DependencyError, PdfReadError, NotImplementedError):
        return False


# ------------------------------------------------------------------------------------------------ tokenisation


def safe_cut(text: str, lo: int = 0, hi: int | None = None) -> int:
    """The last index i in (lo, hi] with text[i] == " " and text[i - 1] not whitespace; -1 if there is none."""
    i = text.rfind(" ", lo + 1, len(text) if hi is None else hi + 1)
    while i > lo:
        if not text[i - 1].isspace():
            return i
        i = text.rfind(" ", lo + 1, i)
    return -1


def next_safe_cut(text: str, start: int) -> int:
    """The first safe cut at or after `start`; -1 if there is none."""
    i = text.find(" ", max(start, 1))
    while i != -1 and text[i - 1].isspace():
        i = text.find(" ", i + 1)
    return i


class IncrementalTokenizer:
    """Feed text in pieces, get the ids of the whole text. Whenever `chunk_chars` characters are waiting, the
    text up to the last safe cut within them (or the first one after) is tokenised; the rest waits for more
    text or `flush`. `marks` records (characters, tokens) after every tokenizer call."""

    def __init__(self, encode: Encode, chunk_chars: int = CHUNK_CHARS, exact_chunks: bool = True):
        self._encode, self._chunk, self._exact = encode, chunk_chars, exact_chunks
        self._buf = ""
        self._pos = 0  # start of the text not yet tokenised
        self.marks: list[tuple[int, int]] = [(0, 0)]

    def feed(self, text: str) -> list[int]:
        self._buf, self._pos = self._buf[self._pos:] + text, 0
        ids: list[int] = []
        while self._exact and len(self._buf) - self._pos >= self._chunk:
            start = self._pos
            cut = safe_cut(self._buf, start, start + self._chunk)
            if cut == -1:
                cut = next_safe_cut(self._buf, start + self._chunk)
            if cut == -1:
                break
            ids += self._encoded(self._buf[start:cut])
            self._pos = cut
        return ids

    def flush(self) -> list[int]:
        rest, self._buf, self._pos = self._buf[self._pos:], "", 0
        return self._encoded(rest) if rest else []

    def _encoded(self, text: str) -> list[int]:
        ids = self._encode(text)
        chars, tokens = self.marks[-1]
        self.marks.append((chars + len(text), tokens + len(ids)))
        return ids


def tokenize_pages(pages: Iterable[str], encode: Encode, chunk_chars: int = CHUNK_CHARS,
                   exact_chunks: bool = True, paged: bool = True) -> TokenizedDocument:
    """Page ends in tokens are interpolated (by characters) inside the tokenizer call that covered them."""
    inc = IncrementalTokenizer(encode, chunk_chars, exact_chunks)
    ids: list[int] = []
    char_ends: list[int] = []
    chars = 0
    for i, page in enumerate(pages):
        piece = page if i == 0 else PAGE_SEPARATOR + page
        ids += inc.feed(piece)
        chars += len(piece)
        char_ends.append(chars)
    ids += inc.flush()
    return TokenizedDocument(ids=ids, page_ends=[_tokens_at(inc.marks, c) for c in char_ends], paged=paged)


def _tokens_at(marks: list[tuple[int, int]], chars: int) -> int:
    i = bisect.bisect_left(marks, (chars, -1))
    if i == len(marks):
        return marks[-1][1]
    c1, t1 = marks[i]
    if c1 == chars or i == 0:
        return t1
    c0, t0 = marks[i - 1]
    return t0 + (t1 - t0) * (chars - c0) // (c1 - c0)


def chunking_is_exact(encode: Encode, text: str = PROBE_TEXT) -> bool:
    """Whether cutting at every safe point of `text` reproduces the one-call tokenisation."""
    whole = encode(text)
    cuts = [i for i in range(1, len(text)) if text[i] == " " and not text[i - 1].isspace()]
    ok = all(encode(text[:c]) + encode(text[c:]) == whole for c in cuts)
    if not ok:
        log.warning("this tokenizer does not split exactly at spaces: documents are tokenised in one call")
    return ok
