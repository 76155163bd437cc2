"""Settings: FAM_* environment variables, command line flags over them, the persisted snapshot secret."""

from __future__ import annotations

import pytest

from server.__main__ import parse_settings
from server.settings import Settings


def test_environment_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("FAM_PORT", "9100")
    monkeypatch.setenv("FAM_BLOCK_SIZE", "64")
    monkeypatch.setenv("FAM_API_KEYS", " a , b,, ")
    monkeypatch.setenv("FAM_DATA_DIR", str(tmp_path))
    s = parse_settings(["--block-size", "128", "--mode", "bswa"])
    assert (s.port, s.block_size, s.mode, s.data_dir) == (9100, 128, "bswa", tmp_path)  # the flag wins
    assert s.api_key_list == ["a", "b"]
    assert s.fam_overrides() == {"block_size": 128}


def test_defaults(monkeypatch):
    for name in ("FAM_MODEL", "FAM_ADAPTER", "FAM_DTYPE", "FAM_DEVICE", "FAM_DATA_DIR", "FAM_BLOCK_SIZE"):
        monkeypatch.delenv(name, raising=False)
    s = Settings()
    assert (s.model, s.adapter, s.dtype, s.device, str(s.data_dir)) == (None, "auto", "bfloat16", "auto", "data")
    assert s.fam_overrides() == {} and s.api_key_list == []
    assert Settings(adapter="none").adapter is None


def test_bad_values_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--mode", "nonsense"])
    assert "mode" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings(["--block-size", "0"])


def test_generated_secret_is_kept(tmp_path, monkeypatch):
    monkeypatch.delenv("FAM_SECRET", raising=False)
    first = Settings(data_dir=tmp_path).snapshot_secret()
    assert len(first) == 64 and (tmp_path / "secret").stat().st_mode & 0o777 == 0o600
    assert Settings(data_dir=tmp_path).snapshot_secret() == first  # the same after a restart
    assert Settings(data_dir=tmp_path, secret="given").snapshot_secret() == b"given"
