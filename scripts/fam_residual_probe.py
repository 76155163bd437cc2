"""Next-token loss of the untrained default model in fam mode after its first block, for three first-update rules:
the paper's zero residual, the initial state as residual (the default), and a feedback state never updated.
docs/design.md quotes its output.   python scripts/fam_residual_probe.py
"""

import importlib.util
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import FamConfig, FamRuntime  # noqa: E402

torch.set_num_threads(2)
kjv = Path(list(importlib.util.find_spec("bible").submodule_search_locations)[0]) / "data" / "kjv.jsonl"
text = " ".join(json.loads(line)["text"] for line, _ in zip(open(kjv), range(120), strict=False))
B = 256


def loss(zero_first_residual: bool, frozen: bool) -> tuple[float, float]:
    cfg = FamConfig(mode="fam", block_size=B, memory_blocks=1, fam_len=32, zero_first_residual=zero_first_residual)
    rt = FamRuntime.load(None, fam=cfg, dtype="bfloat16", adapter=None)
    ids = torch.tensor([rt.encode(text)[:6 * B]])
    with torch.no_grad():
        s, outs = rt.new_state(), []
        for i in range(0, ids.shape[1], B):
            f0 = s.fam
            s, h = rt.module.forward_chunk(s, ids[:, i:i + B])
            outs.append(rt.module.logits(h))
            if frozen:
                s = rt.module.with_fam(s, f0, s.fam_fresh)
    lg = torch.cat(outs, 1)[0, B - 1:-1]  # predictions of the tokens after block 0
    return F.cross_entropy(lg, ids[0, B:]).item(), (lg.argmax(-1) == ids[0, B:]).float().mean().item()


for name, zero, frozen in (("zero residual (paper)", True, False), ("initial state as residual", False, False),
                           ("feedback never updated", False, True)):
    ce, acc = loss(zero, frozen)
    print(f"{name}: loss {ce:.2f}, accuracy {100 * acc:.1f}%")
