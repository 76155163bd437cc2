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


def test_adapter_lora_is_merged_into_the_weights(tiny_chat_dir, tmp_path):
    """The loaded adapter's model computes what the base model with the LoRA side paths x·(alpha/r)·AᵀBᵀ added to
    its projections computes (float32), and the prompt is the adapter's."""
    base = FamRuntime.load(tiny_chat_dir, dtype="float32")
    torch.manual_seed(0)
    names = ["layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"]
    modules = dict(base.module.named_modules())
    lora = {n: (torch.randn(2, modules[n].in_features) * 0.1, torch.randn(modules[n].out_features, 2) * 0.1)
            for n in names}
    prompt = torch.randn_like(base.module.fam_prompt)
    path = tmp_path / "a.safetensors"
    save_adapter(path, prompt, lora, {"base_model": base.name, "base_model_fingerprint": base.model_fingerprint,
                                      "fam_config": base.fam_config.__dict__, "lora": {"r": 2, "alpha": 4}})
    adapted = FamRuntime.load(tiny_chat_dir, dtype="float32", adapter=path)
    for n, (a, b) in lora.items():  # the reference: side paths on the base model
        modules[n].register_forward_hook(lambda m, args, out, a=a, b=b: out + 2.0 * (args[0] @ a.t()) @ b.t())
    with torch.no_grad():
        base.module.fam_prompt.copy_(prompt)
    base.module.invalidate_cache()
    ids = base.encode(" the keeper wrote about storms and ships and harbour lights " * 6)
    with torch.inference_mode():
        want = base.ingest(base.new_state(mode="fam"), ids)
        got = adapted.ingest(adapted.new_state(mode="fam"), ids)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[0].fam, want[0].fam, rtol=1e-4, atol=1e-4)
    assert adapted.model_fingerprint == base.model_fingerprint  # the base model it was checked against
