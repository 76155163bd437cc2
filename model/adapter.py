"""FAM adapters: the trained FAM prompt plus LoRA deltas, in one small safetensors file with JSON metadata.

At load each LoRA delta is merged into its projection's weight (W <- W + alpha/r · B A, in float32, rounded once
to the weights' dtype), so the adapter costs nothing per token. Merged into bf16 weights a small delta loses much
of its own precision (68% relative error of the delta on the step-113 adapter), but the rounding errors do not add
up: the merged model's next-token distribution is as close to the float32 model with exact side paths as bf16 side
paths were (docs/lora_merge.md, `python -m training.lora_merge`). An adapter records the fingerprint of the base
model it was trained on and refuses any other base.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from model.config import MODES, FamConfig

if TYPE_CHECKING:
    from model.runtime import FamRuntime

ADAPTER_FORMAT = "fam-adapter/1"
BUNDLED_DIR = Path(__file__).parent / "adapters"
# The adapter shipped for the default model; "auto" loads it when the default model is loaded.
BUNDLED = {"SmolLM2-135M-Instruct": BUNDLED_DIR / "smollm2-135m-instruct-fam.safetensors"}


class AdapterError(ValueError):
    pass


@dataclass
class Adapter:
    prompt: Tensor  # [F, d] the learned FAM prompt P
    lora: dict[str, tuple[Tensor, Tensor]]  # module name -> (A [r, in], B [out, r])
    meta: dict[str, Any] = field(default_factory=dict)  # base_model, fam_config, lora config, training recipe
    path: Path | None = None

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self.prompt.float().numpy().tobytes())
        for name in sorted(self.lora):
            a, b = self.lora[name]
            h.update(name.encode() + a.float().numpy().tobytes() + b.float().numpy().tobytes())
        return h.hexdigest()[:16]

    def fam_config(self) -> FamConfig:
        return FamConfig(**self.meta["fam_config"])

    @property
    def default_mode(self) -> str:
        """The mode of new sessions while this adapter is loaded and the server is told none: the mode its depth
        test showed it holds to (meta `default_mode`, written by `training.adapter_config` with the measurement),
        else `sink`, which needs no training to hold."""
        return self.meta.get("default_mode", "sink")

    def apply(self, rt: FamRuntime) -> None:
        """Check the base model, then set P and merge the LoRA into rt's projections (see the module's doc)."""
        want = self.meta.get("base_model_fingerprint")
        if want != rt.model_fingerprint:
            raise AdapterError(
                f"adapter {self.path or ''} was trained for base model {self.meta.get('base_model')!r} "
                f"(fingerprint {want}), but the loaded model is {rt.name!r} (fingerprint {rt.model_fingerprint})"
            )
        m = rt.module
        if tuple(self.prompt.shape) != tuple(m.fam_prompt.shape):
            raise AdapterError(f"adapter prompt shape {tuple(self.prompt.shape)} does not fit the model's "
                               f"FAM prompt {tuple(m.fam_prompt.shape)} (fam_len mismatch)")
        scale = float(self.meta["lora"]["alpha"]) / float(self.meta["lora"]["r"])
        modules = dict(m.named_modules())
        for name, (a, b) in self.lora.items():
            mod = modules.get(name)
            if not isinstance(mod, torch.nn.Linear):
                raise AdapterError(f"adapter targets unknown module {name!r}")
            if a.shape[1] != mod.in_features or b.shape[0] != mod.out_features or a.shape[0] != b.shape[1]:
                raise AdapterError(f"adapter LoRA for {name!r} has shapes A {tuple(a.shape)}, B {tuple(b.shape)}; "
                                   f"the module is {mod.in_features} -> {mod.out_features}")
        with torch.no_grad():
            m.fam_prompt.copy_(self.prompt.to(m.fam_prompt))
            for name, (a, b) in self.lora.items():
                w = modules[name].weight
                delta = scale * (b.float() @ a.float()).to(w.device)
                w.copy_((w.float() + delta).to(w.dtype))
        m.invalidate_cache()
        rt.adapter = self


def save_adapter(path: str | os.PathLike[str], prompt: Tensor, lora: dict[str, tuple[Tensor, Tensor]],
                 meta: dict[str, Any]) -> None:
    tensors = {"fam_prompt": prompt.detach().float().cpu().contiguous()}
    for name, (a, b) in lora.items():
        tensors[f"{name}.lora_A"] = a.detach().float().cpu().contiguous()
        tensors[f"{name}.lora_B"] = b.detach().float().cpu().contiguous()
    tmp = Path(f"{path}.tmp")
    save_file(tensors, str(tmp), metadata={"format": ADAPTER_FORMAT, "meta": json.dumps(meta)})
    os.replace(tmp, path)


def load_adapter(spec: str | os.PathLike[str], model_name: str) -> Adapter | None:
    """`spec` is a file path, or "auto": the bundled adapter for `model_name` if one exists, else None."""
    if str(spec) == "auto":
        bundled = BUNDLED.get(model_name)
        if bundled is None or not bundled.is_file():
            return None
        spec = bundled
    path = Path(spec)
    if not path.is_file():
        raise AdapterError(f"adapter file not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"corrupted or unreadable adapter file {path}: {e}") from e
    if header.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{path} is not a FAM adapter (format {header.get('format')!r})")
    lora: dict[str, tuple[Tensor, Tensor]] = {}
    for key in tensors:
        if key.endswith(".lora_A"):
            name = key.removesuffix(".lora_A")
            lora[name] = (tensors[key], tensors[f"{name}.lora_B"])
    adapter = Adapter(prompt=tensors["fam_prompt"], lora=lora, meta=json.loads(header["meta"]), path=path)
    if adapter.default_mode not in MODES:
        raise AdapterError(f"{path} declares an unknown default_mode {adapter.default_mode!r}")
    return adapter
