"""Settings: FAM_* environment variables, command line flags over them (their help generated from the settings)."""

from __future__ import annotations

import pytest

from server.__main__ import parse_settings
from server.settings import FLAGS, Settings


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
    assert (s.model, s.adapter, s.dtype, s.device, str(s.data_dir)) == (None, "auto", "auto", "auto", "data")
    assert s.fam_overrides() == {} and s.api_key_list == []
    assert Settings(adapter="none").adapter is None


def test_bad_values_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--mode", "nonsense"])
    assert "mode" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings(["--block-size", "0"])


def test_help_is_generated_from_the_settings(capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name in FLAGS:
        field = Settings.model_fields[name]
        assert f"--{name.replace('_', '-')}" in help_text and f"FAM_{name.upper()}" in help_text
        assert " ".join(field.description.split()) in help_text, name
    assert "FAM_PORT, default 8000" in help_text and "FAM_DTYPE, default auto" in help_text


def test_every_setting_is_described():
    assert all(field.description for field in Settings.model_fields.values())


def test_reading_settings_touches_no_file(tmp_path):
    Settings(data_dir=tmp_path / "data").engine_config(b"k")
    assert not (tmp_path / "data").exists()


def test_a_redis_store_needs_the_shared_secret(monkeypatch, capsys):
    monkeypatch.delenv("FAM_SECRET", raising=False)
    with pytest.raises(SystemExit):
        parse_settings(["--store", "redis://127.0.0.1:6379/0"])
    assert "FAM_SECRET" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings(["--store", "memcached://x"])
    assert "Redis URL" in capsys.readouterr().err
    monkeypatch.setenv("FAM_SECRET", "shared")
    s = parse_settings(["--store", "redis://127.0.0.1:6379/0"])
    cfg = s.engine_config(b"shared")
    assert (cfg.store_url, cfg.lease_seconds, cfg.lease_wait_seconds) == ("redis://127.0.0.1:6379/0", 10.0, 30.0)
    assert Settings(store="").store is None  # an empty FAM_STORE is the data directory


def test_the_ingest_slice_under_chats_reaches_the_engine(monkeypatch):
    from server.engine import EngineConfig

    default = EngineConfig(data_dir=".", secret=b"k").bulk_seconds_busy
    assert Settings().engine_config(b"k").bulk_seconds_busy == default
    monkeypatch.setenv("FAM_BULK_SECONDS_BUSY", "0.5")
    assert Settings().engine_config(b"k").bulk_seconds_busy == 0.5
    monkeypatch.setenv("FAM_BULK_SECONDS_BUSY", "0")
    with pytest.raises(ValueError, match="bulk_seconds_busy"):
        Settings()
