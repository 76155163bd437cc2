"""Export an adapter file from a training checkpoint (weights only; the meta records config, recipe and step).

    python -m training.export_adapter runs/fam/ckpt.pt model/adapters/smollm2-135m-instruct-fam.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from model.config import FamConfig
from model.runtime import FamRuntime
from training.finetune import export_adapter

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    import torch

    meta = torch.load(args.checkpoint, weights_only=False, map_location="cpu")["meta"]
    init_prompt = None
    if meta["fam_config"]["mode"] != "fam":  # no trained prompt: store the model's initial one
        cfg = FamConfig(**{k: v for k, v in meta["fam_config"].items() if k != "sink_tokens"})
        init_prompt = FamRuntime.load(None, fam=cfg, dtype="bfloat16").module.fam_prompt.detach()
    meta = export_adapter(args.checkpoint, args.out, init_prompt)
    size = args.out.stat().st_size
    print(json.dumps({"out": str(args.out), "bytes": size, "step": meta["step"]}))


if __name__ == "__main__":
    main()
