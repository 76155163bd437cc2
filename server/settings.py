"""Server settings: the only code in the server that reads the environment.

Every setting is an environment variable `FAM_<NAME>` (e.g. `FAM_PORT=9000`, `FAM_API_KEYS=k1,k2`); the
`fam-server` command line flags (`FLAGS`) override them (see `server.__main__`). Tests build `Settings(...)`
directly.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.config import MODES
from server.engine import EngineConfig

# The settings `fam-server` also takes as command line flags (`data_dir` -> `--data-dir`); the rest come from the
# environment only. Every flag's help is its field's description (see server.__main__).
FLAGS = ("host", "port", "model", "adapter", "mode", "block_size", "memory_blocks", "fam_len", "dtype",
         "decode_dtype", "device", "data_dir", "store")
STORE_SCHEMES = ("redis://", "rediss://", "unix://")


class Settings(BaseSettings):
    """Pure data: reading it touches no file (the data directory's lock and secret are taken at start-up, in
    `server.data_dir`)."""

    model_config = SettingsConfigDict(env_prefix="FAM_", extra="ignore")

    # --- listening
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")

    # --- the model (None / unset = what the model package chooses: the default model, the adapter's FAM config)
    model: str | None = Field(None, description="a Hugging Face folder, a .gguf file or a hub id "
                                                "(unset: SmolLM2-135M-Instruct)")
    adapter: str | None = Field("auto", description="a FAM adapter file, 'auto' (the bundled one for the default "
                                                    "model) or 'none'")
    mode: str | None = Field(None, description=f"default mode of new sessions and session-less requests: "
                                               f"{', '.join(MODES)} (unset: the adapter's default_mode, fam for "
                                               "the bundled one; sink without an adapter)")
    block_size: int | None = Field(None, ge=1, description="tokens per block B (unset: the adapter's or the "
                                                           "model's)")
    memory_blocks: int | None = Field(None, ge=0, description="memory blocks m (unset: the adapter's or the "
                                                              "model's)")
    fam_len: int | None = Field(None, ge=1, description="FAM vectors per layer F (unset: the adapter's or the "
                                                        "model's)")
    dtype: str = Field("auto", description="auto (bfloat16 on CUDA and on CPUs with AMX, else float32), bfloat16 "
                                           "or float32")
    decode_dtype: str = Field("auto", description="a copy of the weights that a session decoding alone reads: auto "
                                                  "(bfloat16 when the model runs float32 on a CPU: ~1.5x single-"
                                                  "stream decode for half the weights' memory more), bfloat16 or "
                                                  "none; all but none run that row as a matrix-vector product where "
                                                  "it pays (bf16/fp16 weights on a CPU with AMX)")
    device: str = Field("auto", description="cpu, cuda or auto")

    # --- storage and security
    data_dir: Path = Field(Path("./data"), description="where session snapshots, the generated snapshot secret "
                                                       "and the server's lock are kept")
    store: str | None = Field(None, description="where sessions live: unset = data_dir; redis://host:port/db = a "
                                                "Redis that several replicas share (needs FAM_SECRET)")
    secret: SecretStr | None = Field(None, description="HMAC key for snapshots (unset: generated once and kept in "
                                                       "data_dir/secret; required with a Redis store)")
    lease_seconds: float = Field(10.0, gt=0, description="Redis store: a replica's lease on a session it changes "
                                                         "lasts this long unless renewed (a dead replica's sessions "
                                                         "are free again after it)")
    lease_wait_seconds: float = Field(30.0, ge=0, description="Redis store: a change waits this long for another "
                                                              "replica's lease before answering 503 session_busy")
    api_keys: SecretStr | None = Field(None, description="comma-separated Bearer keys (unset: no authentication)")

    # --- limits
    max_body_bytes: int = Field(64 * 2**20, ge=1024, description="larger request bodies get 413")
    max_pdf_pages: int = Field(2000, ge=1, description="PDFs with more pages get 413")
    max_sessions: int = Field(1000, ge=1, description="more sessions get 429 too_many_sessions")
    max_queue: int = Field(64, ge=1, description="unfinished requests on the model worker; more get 429 + "
                                                 "Retry-After")
    max_tokens: int = Field(4096, ge=1, description="cap on max_tokens / max_completion_tokens of one request")
    memory_budget_bytes: int = Field(2 * 2**30, ge=0, description="resident session states above this spill to "
                                                                  "disk")
    checkpoint_seconds: float = Field(60.0, gt=0, description="a long ingest also saves its session this often")
    bulk_seconds_busy: float = Field(0.3, gt=0, le=60, description="seconds of ingest work per engine step while "
                                     "chats generate (and for 2 s after; the engine turns it into tokens at the "
                                     "cost of a row it measures): about what a chat's prompt waits for ingest in "
                                     "flight and each of its tokens waits; larger keeps more of the ingest's rate "
                                     "(README: engine benchmark)")

    log_level: str = Field("info", description="debug, info, warning or error")

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, v: str | None) -> str | None:
        if v is not None and v not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        return v

    @field_validator("store")
    @classmethod
    def _store_url(cls, v: str | None) -> str | None:
        if v in (None, ""):
            return None
        if not v.startswith(STORE_SCHEMES):
            raise ValueError(f"store must be a Redis URL ({', '.join(s + '...' for s in STORE_SCHEMES)}), or unset "
                             "for the data directory")
        return v

    @model_validator(mode="after")
    def _shared_secret(self) -> Settings:
        if self.store is not None and self.secret is None:
            raise ValueError("a Redis store needs FAM_SECRET: every replica must sign and verify snapshots with the "
                             "same key")
        return self

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

    def engine_config(self, secret: bytes) -> EngineConfig:
        """The engine's configuration; `secret` is the snapshot key (`server.data_dir.snapshot_secret`)."""
        return EngineConfig(
            data_dir=self.data_dir,
            secret=secret,
            default_mode=self.mode,
            max_sessions=self.max_sessions,
            max_queue=self.max_queue,
            max_tokens=self.max_tokens,
            max_pdf_pages=self.max_pdf_pages,
            memory_budget_bytes=self.memory_budget_bytes,
            checkpoint_seconds=self.checkpoint_seconds,
            bulk_seconds_busy=self.bulk_seconds_busy,
            store_url=self.store,
            lease_seconds=self.lease_seconds,
            lease_wait_seconds=self.lease_wait_seconds,
        )
