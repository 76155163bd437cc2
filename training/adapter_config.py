"""Change the FAM settings an adapter file declares for inference, keeping its weights bit for bit.

    python -m training.adapter_config model/adapters/smollm2-135m-instruct-fam.safetensors fam_gate=0.75

Only settings that change how the trained weights are run (not what they were trained for) may change here:
`fam_gate` (docs/design.md). The adapter's weight fingerprint stays the same; its FamConfig, and so the
fingerprint of the states it makes, changes, and the meta records each change with the measurement behind it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from model.adapter import load_adapter, save_adapter
from model.config import FamConfig

CHANGEABLE = {"fam_gate"}


def set_config(path: Path, changes: dict, reason: str) -> dict:
    adapter = load_adapter(path, model_name="")
    bad = set(changes) - CHANGEABLE
    if bad:
        raise SystemExit(f"cannot change {sorted(bad)} after training (changeable: {sorted(CHANGEABLE)})")
    meta = dict(adapter.meta)
    meta["fam_config"] = FamConfig(**{**meta["fam_config"], **changes}).__dict__
    meta["inference_changes"] = [*meta.get("inference_changes", []), {"set": changes, "why": reason}]
    before = adapter.fingerprint
    save_adapter(path, adapter.prompt, adapter.lora, meta)
    assert load_adapter(path, model_name="").fingerprint == before, "weights changed"
    return meta["fam_config"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("adapter", type=Path)
    ap.add_argument("changes", nargs="+", metavar="KEY=VALUE", help="JSON values, e.g. fam_gate=0.75")
    ap.add_argument("--why", default="", help="recorded in the adapter's meta")
    args = ap.parse_args()
    changes = {k: json.loads(v) for k, v in (c.split("=", 1) for c in args.changes)}
    print(json.dumps(set_config(args.adapter, changes, args.why)))


if __name__ == "__main__":
    main()
