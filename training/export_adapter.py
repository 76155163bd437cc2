"""Export an adapter file from a training checkpoint (weights only; the meta records config, recipe and step).

    python -m training.export_adapter runs/fam/ckpt.pt model/adapters/smollm2-135m-instruct-fam.safetensors
    python -m training.export_adapter runs/curriculum/C5/ckpt.pt out.safetensors --block-size 256 --memory-blocks 1

--block-size / --memory-blocks ship the weights at another layout than the run trained at (its meta keeps that one
as `trained_fam_config`).
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
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--memory-blocks", type=int, default=None)
    args = ap.parse_args()
    import torch

    meta = torch.load(args.checkpoint, weights_only=False, map_location="cpu")["meta"]
    init_prompt = None
    if meta["fam_config"]["mode"] != "fam":  # no trained prompt: store the model's initial one
        cfg = FamConfig(**{k: v for k, v in meta["fam_config"].items() if k != "sink_tokens"})
        init_prompt = FamRuntime.load(None, fam=cfg, dtype="bfloat16").module.fam_prompt.detach()
    layout = {k: v for k, v in (("block_size", args.block_size), ("memory_blocks", args.memory_blocks))
              if v is not None}
    meta = export_adapter(args.checkpoint, args.out, init_prompt, layout)
    size = args.out.stat().st_size
    print(json.dumps({"out": str(args.out), "bytes": size, "step": meta["step"]}))


if __name__ == "__main__":
    main()
