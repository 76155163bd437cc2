"""Loading: real checkpoints through the weight table, and a clear error for every kind of bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from model import FamRuntime
from model.adapter import AdapterError, save_adapter
from model.loader import ModelLoadError, convert_gguf, resolve_source


def test_unknown_architecture_is_named(tiny_dirs, tmp_path):
    folder = tmp_path / "gpt2ish"
    shutil.copytree(tiny_dirs["llama"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'GPT2LMHeadModel'"):
        FamRuntime.load(folder)


def test_missing_files(tmp_path, tiny_chat_dir):
    with pytest.raises(ModelLoadError, match="model not found"):
        resolve_source(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        resolve_source(tmp_path)
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        resolve_source(tmp_path / "missing.gguf")
    folder = tmp_path / "noweights"
    shutil.copytree(tiny_chat_dir, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no .safetensors weights"):
        FamRuntime.load(folder)


def test_corrupted_safetensors(tiny_chat_dir, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_chat_dir, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupted or unreadable safetensors"):
        FamRuntime.load(folder)


def test_wrong_shape_is_named(tiny_chat_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "shape"
    shutil.copytree(tiny_chat_dir, folder)
    t = load_file(folder / "model.safetensors")
    t["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(t, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model.layers.1.mlp.up_proj.weight.*shape \(3, 3\)"):
        FamRuntime.load(folder)


def test_corrupted_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="could not read GGUF file"):
        convert_gguf(bad)


def test_adapter_for_another_base_is_refused(tiny_chat_dir, tmp_path):
    rt = FamRuntime.load(tiny_chat_dir, dtype="float32")
    path = tmp_path / "a.safetensors"
    save_adapter(path, rt.module.fam_prompt, {}, {"base_model": "someone-else", "base_model_fingerprint": "0" * 16,
                                                 "fam_config": rt.fam_config.__dict__, "lora": {"r": 1, "alpha": 1}})
    with pytest.raises(AdapterError, match="trained for base model 'someone-else'"):
        FamRuntime.load(tiny_chat_dir, dtype="float32", adapter=path)
    with pytest.raises(AdapterError, match="adapter file not found"):
        FamRuntime.load(tiny_chat_dir, dtype="float32", adapter=tmp_path / "missing.safetensors")


def test_fingerprint_does_not_depend_on_dtype(tiny_chat_dir):
    """An adapter trained on the bf16 model must apply to the fp32 model (and a different model must differ)."""
    fp32 = FamRuntime.load(tiny_chat_dir, dtype="float32").model_fingerprint
    assert FamRuntime.load(tiny_chat_dir, dtype="bfloat16").model_fingerprint == fp32
    rt = FamRuntime.load(tiny_chat_dir, dtype="float32")
    with torch.no_grad():
        rt.module.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    from model.loader import fingerprint

    assert fingerprint(rt.module) != fp32
