"""training.adapter_config changes an adapter's declared inference settings and nothing else."""

from __future__ import annotations

import pytest
import torch

from model.adapter import load_adapter, save_adapter
from model.config import FamConfig
from training.adapter_config import set_config


def test_set_config_keeps_the_weights_and_records_the_change(tmp_path):
    path = tmp_path / "a.safetensors"
    lora = {"layers.0.self_attn.q_proj": (torch.randn(2, 8), torch.randn(8, 2))}
    save_adapter(path, torch.randn(4, 8), lora, {"fam_config": FamConfig(fam_len=4).__dict__, "step": 7})
    before = load_adapter(path, "")
    assert set_config(path, {"fam_gate": 0.75}, "depth test")["fam_gate"] == 0.75
    after = load_adapter(path, "")
    assert after.fingerprint == before.fingerprint and after.meta["step"] == 7
    assert after.fam_config() == before.fam_config().replace(fam_gate=0.75)
    assert after.meta["inference_changes"] == [{"set": {"fam_gate": 0.75}, "why": "depth test"}]
    with pytest.raises(SystemExit, match="fam_len"):
        set_config(path, {"fam_len": 8}, "")


def test_default_mode_is_a_serving_setting_of_the_meta(tmp_path):
    """default_mode goes to the meta (not the FamConfig, so states keep their fingerprint) and is what the adapter
    answers; unset it is sink, and an unknown mode is refused when set and when loaded."""
    import json

    from model.adapter import AdapterError
    from training.adapter_config import value

    path = tmp_path / "a.safetensors"
    cfg = FamConfig(fam_len=4)
    save_adapter(path, torch.randn(4, 8), {}, {"fam_config": cfg.__dict__})
    assert load_adapter(path, "").default_mode == "sink"
    assert set_config(path, {"default_mode": value("fam")}, "depth test") == cfg.__dict__
    after = load_adapter(path, "")
    assert after.default_mode == "fam" and after.fam_config() == cfg
    assert after.meta["inference_changes"] == [{"set": {"default_mode": "fam"}, "why": "depth test"}]
    with pytest.raises(SystemExit, match="default_mode"):
        set_config(path, {"default_mode": "memory"}, "")
    save_adapter(path, torch.randn(4, 8), {}, {"fam_config": cfg.__dict__, "default_mode": "memory"})
    with pytest.raises(AdapterError, match="default_mode"):
        load_adapter(path, "")
    assert value("0.75") == 0.75 and value("fam") == "fam" and json.dumps(value("true")) == "true"
