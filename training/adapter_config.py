"""Change the settings an adapter file declares for inference, keeping its weights bit for bit.

    python -m training.adapter_config model/adapters/smollm2-135m-instruct-fam.safetensors fam_gate=0.75
    python -m training.adapter_config FILE default_mode=fam --why "depth test: ..."

Only settings that change how the trained weights are run (not what they were trained for) may change here:
`fam_gate` (docs/design.md), and `default_mode`, the mode of new sessions while the adapter is loaded and the
server is told none (`sink` when unset; set it to `fam` once the adapter passes the depth test). The adapter's
weight fingerprint stays the same; a new `fam_gate` changes its FamConfig, and so the fingerprint of the states it
makes. The meta records each change with the measurement behind it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from model.adapter import load_adapter, save_adapter
from model.config import MODES, FamConfig

CHANGEABLE = {"fam_gate"}  # FamConfig fields
SERVING = {"default_mode"}  # the meta's own serving settings


def set_config(path: Path, changes: dict, reason: str) -> dict:
    adapter = load_adapter(path, model_name="")
    bad = set(changes) - CHANGEABLE - SERVING
    if bad:
        raise SystemExit(f"cannot change {sorted(bad)} after training (changeable: {sorted(CHANGEABLE | SERVING)})")
    if changes.get("default_mode", "sink") not in MODES:
        raise SystemExit(f"default_mode must be one of {', '.join(MODES)}")
    meta = dict(adapter.meta)
    meta["fam_config"] = FamConfig(**{**meta["fam_config"],
                                      **{k: v for k, v in changes.items() if k in CHANGEABLE}}).__dict__
    meta.update({k: v for k, v in changes.items() if k in SERVING})
    meta["inference_changes"] = [*meta.get("inference_changes", []), {"set": changes, "why": reason}]
    before = adapter.fingerprint
    save_adapter(path, adapter.prompt, adapter.lora, meta)
    assert load_adapter(path, model_name="").fingerprint == before, "weights changed"
    return meta["fam_config"]


def value(text: str):
    """A KEY=VALUE's value: JSON (0.75, true), else the word itself (fam)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("adapter", type=Path)
    ap.add_argument("changes", nargs="+", metavar="KEY=VALUE",
                    help="JSON values or plain words, e.g. fam_gate=0.75 default_mode=fam")
    ap.add_argument("--why", default="", help="recorded in the adapter's meta")
    args = ap.parse_args()
    changes = {k: value(v) for k, v in (c.split("=", 1) for c in args.changes)}
    print(json.dumps(set_config(args.adapter, changes, args.why)))


if __name__ == "__main__":
    main()
