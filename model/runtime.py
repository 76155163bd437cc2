"""`FamRuntime`: a loaded model with its tokenizer, the operations on states, and state persistence.

This is the model package's public face: the server and the scripts use it, never FamLM internals.
Nothing here is inference-only: call sites wrap work in `torch.inference_mode()` where they want it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from model import loader
from model.adapter import Adapter, load_adapter
from model.config import FamConfig
from model.decode import DecodeBatch
from model.fam import FamLM
from model.state import FamState

STATE_FORMAT = "fam-state/1"


class StateMismatchError(ValueError):
    """A saved state was made under another model, adapter or configuration."""


class FamRuntime:
    def __init__(self, module: FamLM, tokenizer: Any, name: str, folder: Path, hf_config: Any,
                 adapter: Adapter | None = None):
        self.module, self.tokenizer, self.name, self.folder, self.hf_config = module, tokenizer, name, folder, hf_config
        self.adapter = adapter
        self.model_fingerprint = loader.fingerprint(module)

    # ---------------------------------------------------------------------------------------------- loading

    @classmethod
    def load(cls, source: str | os.PathLike[str] | None = None, *, fam: FamConfig | None = None,
             dtype: str | torch.dtype = "bfloat16", device: str = "cpu",
             adapter: str | os.PathLike[str] | None = None, fam_overrides: dict[str, Any] | None = None,
             decode_dtype: str = "none") -> FamRuntime:
        """Load a checkpoint (see `model.loader`). `adapter` is a path to an adapter file, "auto" (the bundled
        adapter when loading the default model, else none) or None. The FAM layout is `fam`, else the adapter's,
        else the defaults, with `fam_overrides` (e.g. {"block_size": 512}) applied on top. `decode_dtype`: a copy
        of the projection weights for passes of one row (`loader.resolve_decode_dtype`; the server's default is
        "auto"), and anything but "none" runs those passes as `torch.mv` where that pays (`loader.row_mv_pays`);
        keep "none" to train or to change the weights after loading."""
        folder, name = loader.resolve_source(source)
        loader.read_config(folder)
        tokenizer = loader.load_tokenizer(folder)
        adapter_obj = load_adapter(adapter, name) if adapter else None
        fam = (fam or (adapter_obj.fam_config() if adapter_obj else FamConfig())).replace(**(fam_overrides or {}))
        dev = loader.resolve_device(device)
        module, hf_config = loader.load_module(folder, fam, loader.resolve_dtype(dtype, dev), dev, tokenizer)
        rt = cls(module, tokenizer, name, folder, hf_config)
        if adapter_obj:
            adapter_obj.apply(rt)
        row_dtype = loader.resolve_decode_dtype(decode_dtype, rt.dtype, dev)
        module.keep_row_weights(row_dtype, mv=decode_dtype != "none" and loader.row_mv_pays(row_dtype or rt.dtype, dev))
        return rt

    @property
    def device(self) -> torch.device:
        return self.module.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.embed_tokens.weight.dtype

    @property
    def decode_dtype(self) -> torch.dtype | None:
        """The dtype of the weight copy that passes of one row read, or None (they read the model's weights)."""
        lin = self.module.lm_head
        w = getattr(lin, "row_weight", None)
        return None if w is None or w.data_ptr() == lin.weight.data_ptr() else w.dtype

    @property
    def fam_config(self) -> FamConfig:
        return self.module.fam_cfg

    @property
    def eos_token_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(self.hf_config, "eos_token_id", None), "__iter__", None)
        ids |= set(self.hf_config.eos_token_id) if gen_eos else {self.hf_config.eos_token_id}
        return {i for i in ids if i is not None}

    # ---------------------------------------------------------------------------------------------- text

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def chat_text(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render messages with the tokenizer's own chat template."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # ---------------------------------------------------------------------------------------------- states

    def new_state(self, mode: str | None = None, batch: int = 1, position: int = 0) -> FamState:
        return self.module.new_state(batch=batch, mode=mode, position=position)

    def ingest(self, state: FamState, ids: list[int] | Tensor) -> tuple[FamState, Tensor]:
        """Append tokens to a state (batch of one, or [b, N] ids). Returns the new state and next-token logits."""
        t = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        t = t[None] if t.dim() == 1 else t
        state, h = self.module.ingest(state, t)
        return state, self.module.logits(h)

    def ingest_block(self, state: FamState, ids: list[int] | Tensor) -> tuple[FamState, int, Tensor]:
        """Append at most up to the end of the current block: the engine's unit of work. Returns the new state,
        how many of `ids` were consumed and the final-normed hidden state of the last consumed token."""
        t = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        t = t[None] if t.dim() == 1 else t
        _, n = state.cuts(t.shape[1])[0]
        state, h = self.module.forward_chunk(state, t[:, :n])
        return state, n, h[:, -1]

    def forward_many(self, states: list[FamState], ids: list[list[int]], decode: DecodeBatch | None = None
                     ) -> list[tuple[FamState, Tensor]]:
        """One pass over several documents (states of batch 1, each with a chunk inside its current block; see
        `FamLM.forward_many`, and `model.decode` for `decode`). Returns per document the new state and the
        final-normed hidden states [T_i, d]."""
        toks = [torch.as_tensor(i, dtype=torch.long, device=self.device) for i in ids]
        return [(s, h[0]) for s, h in self.module.forward_many(states, toks, decode=decode)]

    def logits(self, hidden: Tensor) -> Tensor:
        """Final-normed hidden states [..., d] -> float32 logits [..., V]."""
        return self.module.logits(hidden)

    # ---------------------------------------------------------------------------------------------- persistence

    def state_fingerprint(self, cfg: FamConfig) -> dict[str, Any]:
        """What a saved state records of its making: model, adapter, B/m/F/mode and dtype (all but the dtype and
        the mode must match for it to load)."""
        return {"model": self.model_fingerprint, "model_name": self.name,
                "adapter": self.adapter.fingerprint if self.adapter else None,
                "dtype": str(self.dtype).removeprefix("torch."), **cfg.describe()}

    def state_to_bytes(self, state: FamState, extra: dict[str, str] | None = None) -> bytes:
        tensors = {"k": torch.stack(state.k, 1), "v": torch.stack(state.v, 1), "fam": state.fam,
                   "fam_fresh": state.fam_fresh.to(torch.uint8), "base": state.base, "n_tokens": state.n_tokens}
        meta = {"format": STATE_FORMAT, "fingerprint": json.dumps(self.state_fingerprint(state.cfg), sort_keys=True),
                "fam_config": json.dumps(state.cfg.__dict__), "n_block": str(state.n_block),
                "n_sinks": str(state.n_sinks), **(extra or {})}
        return st_save({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, metadata=meta)

    def state_from_bytes(self, data: bytes) -> tuple[FamState, dict[str, str]]:
        """Inverse of `state_to_bytes`. Raises StateMismatchError naming every field that differs."""
        meta = read_safetensors_metadata(data)
        if meta.get("format") != STATE_FORMAT:
            raise StateMismatchError(f"not a FAM state (format {meta.get('format')!r}, expected {STATE_FORMAT!r})")
        fields = json.loads(meta["fam_config"])
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(FamConfig)})
        if unknown:  # a state from another version of this server
            raise StateMismatchError(f"state was saved with FAM settings this server does not know: {unknown}")
        cfg = FamConfig(**fields)
        # Sessions may differ in mode; everything else must be this runtime's configuration.
        saved, ours = json.loads(meta["fingerprint"]), self.state_fingerprint(self.fam_config.replace(mode=cfg.mode))
        # The dtype may differ (servers on different hardware pick different ones: `--dtype auto`): the state is
        # cast, exactly from bfloat16 to float32 and rounded the other way.
        diff = [f"{k}: saved {saved.get(k)!r}, this server {ours[k]!r}" for k in ours
                if k != "dtype" and saved.get(k) != ours[k]]
        if diff:
            raise StateMismatchError("state was saved under a different configuration: " + "; ".join(diff))
        t = {k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype) for k, v in st_load(data).items()}
        state = FamState(cfg=cfg, k=t["k"].unbind(1), v=t["v"].unbind(1), fam=t["fam"],
                         fam_fresh=t["fam_fresh"].bool(), base=t["base"], n_tokens=t["n_tokens"],
                         n_block=int(meta["n_block"]), n_sinks=int(meta["n_sinks"]))
        return state, meta

    def save_state(self, state: FamState, path: str | os.PathLike[str]) -> None:
        Path(path).write_bytes(self.state_to_bytes(state))

    def load_state(self, path: str | os.PathLike[str]) -> FamState:
        return self.state_from_bytes(Path(path).read_bytes())[0]


def read_safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob (its header is a little-endian u64 length, then JSON)."""
    if len(data) < 8:
        raise StateMismatchError("not a FAM state: too short")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > 100_000_000:
        raise StateMismatchError("not a FAM state: bad header")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateMismatchError(f"not a FAM state: unreadable header ({e})") from e
    return dict(header.get("__metadata__") or {})

