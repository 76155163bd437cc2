"""Server settings: the only code in the server that reads the environment.

Every setting is an environment variable `FAM_<NAME>` (e.g. `FAM_PORT=9000`, `FAM_API_KEYS=k1,k2`); the
`fam-server` command line flags override them (see `server.__main__`). Tests build `Settings(...)` directly.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.config import MODES
from server.engine import EngineConfig
from server.engine.store import atomic_write


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FAM_", extra="ignore")

    # --- listening
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    # --- the model (None / unset = what the model package chooses: the default model, the adapter's FAM config)
    model: str | None = None  # a Hugging Face folder, a .gguf file or a hub id; unset = SmolLM2-135M-Instruct
    adapter: str | None = "auto"  # a FAM adapter file, "auto" (the bundled one for the default model) or "none"
    mode: str | None = None  # default mode of new sessions and session-less requests; unset = sink
    block_size: int | None = Field(None, ge=1)
    memory_blocks: int | None = Field(None, ge=0)
    fam_len: int | None = Field(None, ge=1)
    dtype: str = "bfloat16"
    device: str = "auto"

    # --- storage and security
    data_dir: Path = Path("./data")  # session snapshots and the generated snapshot secret live here
    secret: SecretStr | None = None  # HMAC key for snapshots; unset = generated once and kept in data_dir/secret
    api_keys: SecretStr | None = None  # comma-separated Bearer keys; unset = no authentication

    # --- limits
    max_body_bytes: int = Field(64 * 2**20, ge=1024)  # larger request bodies get 413
    max_pdf_pages: int = Field(2000, ge=1)
    max_sessions: int = Field(1000, ge=1)
    max_queue: int = Field(64, ge=1)  # unfinished requests on the model worker; more get 429 + Retry-After
    max_tokens: int = Field(4096, ge=1)  # cap on max_tokens / max_completion_tokens of one request
    memory_budget_bytes: int = Field(2 * 2**30, ge=0)  # resident session states above this spill to disk
    checkpoint_seconds: float = Field(60.0, gt=0)  # a long ingest also saves its session this often

    log_level: str = "info"

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, v: str | None) -> str | None:
        if v is not None and v not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        return v

    @field_validator("adapter")
    @classmethod
    def _adapter_none(cls, v: str | None) -> str | None:
        return None if v in (None, "", "none") else v

    @property
    def api_key_list(self) -> list[str]:
        raw = self.api_keys.get_secret_value() if self.api_keys else ""
        return [k.strip() for k in raw.split(",") if k.strip()]

    def fam_overrides(self) -> dict[str, int]:
        """The FAM settings given explicitly (the rest keep the adapter's or the model package's defaults)."""
        given = {"block_size": self.block_size, "memory_blocks": self.memory_blocks, "fam_len": self.fam_len}
        return {k: v for k, v in given.items() if v is not None}

    def snapshot_secret(self) -> bytes:
        """FAM_SECRET, or a random secret generated on first use and kept (mode 0600) in data_dir/secret, so
        that snapshots signed before a restart still verify after it."""
        if self.secret is not None:
            return self.secret.get_secret_value().encode()
        path = self.data_dir / "secret"
        if not path.is_file():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(path, secrets.token_hex(32).encode(), mode=0o600)
        return path.read_bytes().strip()

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            data_dir=self.data_dir,
            secret=self.snapshot_secret(),
            default_mode=self.mode,
            max_sessions=self.max_sessions,
            max_queue=self.max_queue,
            max_tokens=self.max_tokens,
            max_pdf_pages=self.max_pdf_pages,
            memory_budget_bytes=self.memory_budget_bytes,
            checkpoint_seconds=self.checkpoint_seconds,
        )
