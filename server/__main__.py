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

from server.app import create_app
from server.data_dir import DataDirLock, DataDirLocked
from server.settings import FLAGS, Settings


def build_parser() -> argparse.ArgumentParser:
    """One flag per name in `settings.FLAGS`; its help is the setting's description, variable and default."""
    parser = argparse.ArgumentParser(prog="fam-server", description="Long-document LLM server (TransformerFAM). "
                                     "Every setting is also an environment variable; a flag wins over it.")
    for name in FLAGS:
        field = Settings.model_fields[name]
        default = "" if field.default is None else f", default {field.default}"
        kind = int if _is_int(field.annotation) else str
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind,
                            help=f"{field.description} (FAM_{name.upper()}{default})")
    return parser


def _is_int(annotation: object) -> bool:
    return annotation is int or int in getattr(annotation, "__args__", ())


def parse_settings(argv: list[str] | None = None) -> Settings:
    parser = build_parser()
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        return Settings(**given)  # init arguments take precedence over FAM_* variables
    except ValidationError as e:
        parser.error(str(e))


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lock = None
    if settings.store is None:  # sessions in the data dir: one server owns it (a Redis store is shared)
        try:
            lock = DataDirLock.acquire(settings.data_dir)  # before listening: a second server never answers at all
        except DataDirLocked as e:
            sys.exit(f"fam-server: error: {e}")
    app = create_app(settings, data_dir_lock=lock)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())


if __name__ == "__main__":
    main()
