"""Shared fixtures: tiny random Llama / Qwen2 checkpoints written to disk, loaded through the real loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)


def write_tiny_checkpoint(folder: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A random HF model saved as a normal folder, with a byte-level tokenizer borrowed from nothing:
    the tests that need text use the real model; these use token ids directly."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(**TINY, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        model = LlamaForCausalLM(cfg)
    else:
        cfg = Qwen2Config(**TINY, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
        model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    return {a: write_tiny_checkpoint(tmp_path_factory.mktemp(a), a) for a in ("llama", "qwen2")}
