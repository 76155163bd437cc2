"""`fam-server`: run the HTTP server.

Every flag is also an environment variable (`--block-size` = `FAM_BLOCK_SIZE`); a flag given on the command
line wins over the environment. Settings without a flag (API keys, limits, the secret) come from the
environment only: see `server.settings.Settings`.
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn
from pydantic import ValidationError

from model.config import MODES
from server.app import create_app
from server.data_lock import DataDirLock, DataDirLocked
from server.settings import Settings

FLAGS = [
    ("--host", str, "address to listen on (FAM_HOST, default 127.0.0.1)"),
    ("--port", int, "port (FAM_PORT, default 8000)"),
    ("--model", str, "Hugging Face folder, .gguf file or hub id (FAM_MODEL, default SmolLM2-135M-Instruct)"),
    ("--adapter", str, "FAM adapter file, 'auto' or 'none' (FAM_ADAPTER, default auto)"),
    ("--mode", str, f"default session mode: {', '.join(MODES)} (FAM_MODE)"),
    ("--block-size", int, "tokens per block B (FAM_BLOCK_SIZE; default: the adapter's or the model's)"),
    ("--memory-blocks", int, "memory blocks m (FAM_MEMORY_BLOCKS)"),
    ("--fam-len", int, "FAM vectors per layer F (FAM_FAM_LEN)"),
    ("--dtype", str, "bfloat16 or float32 (FAM_DTYPE, default bfloat16)"),
    ("--device", str, "cpu, cuda or auto (FAM_DEVICE, default auto)"),
    ("--data-dir", str, "where session snapshots are kept (FAM_DATA_DIR, default ./data)"),
]


def parse_settings(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="fam-server", description="Long-document LLM server (TransformerFAM)")
    for flag, kind, help_text in FLAGS:
        parser.add_argument(flag, type=kind, help=help_text)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        return Settings(**given)  # init arguments take precedence over FAM_* variables
    except ValidationError as e:
        parser.error(str(e))


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        lock = DataDirLock.acquire(settings.data_dir)  # before listening: a second server never answers at all
    except DataDirLocked as e:
        sys.exit(f"fam-server: error: {e}")
    app = create_app(settings, data_dir_lock=lock)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())


if __name__ == "__main__":
    main()
