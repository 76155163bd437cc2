"""TransformerFAM over a Llama-family decoder, top to bottom (FAM_SPEC.md is the contract).

One code path serves the four modes. A call processes a chunk of T tokens that lies inside one block of B
tokens. Per layer, the query rows are the chunk's tokens, preceded by the layer's F feedback rows when the chunk
completes its block; the key columns are [feedback rows | cached slots | chunk]:

    query \\ key      feedback (F)   cached slots (S)                 chunk (T)
    feedback rows    all            only the current block's slots   all
    chunk token t    all            all                              keys <= t

Cached slots are [sinks | memory blocks | earlier tokens of the current block]. The feedback rows run through the
layer's own norm, attention and MLP; their output is the layer's new feedback state, read by the same layer in the
next block. Chunk tokens never see it. When a block completes, memory is trimmed to the last m blocks.

bswa is fam with F = 0; sink keeps the first tokens and re-bases positions into the cache; full never evicts.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F_
from torch import Tensor, nn

from model.config import ArchConfig, FamConfig
from model.decode import DecodeBatch
from model.state import FamState

# Attention of up to this many query rows runs as plain matmuls in bf16/fp16 on CPUs without AMX
# (Attention.few_queries; `loader.few_query_rows` sets each model's).
FEW_QUERIES = 64
# Projections of up to this many rows run as W @ x^T where one row runs as mv (`project`).
FEW_ROWS = 64


def row_product(x: Tensor, w: Tensor, mv: bool) -> Tensor:
    """One row x [..., in] times w^T, computed in w's dtype and returned in x's; `mv`: as a matrix-vector product
    (`FamLM.keep_row_weights`)."""
    xw = x.to(w.dtype)
    y = torch.mv(w, xw.reshape(-1)).view(*x.shape[:-1], w.shape[0]) if mv else F_.linear(xw, w)
    return y.to(x.dtype)


def weight_first(x: Tensor, w: Tensor) -> Tensor:
    """x [..., in] times w^T computed as W @ x^T (the orientation in which oneDNN's and MKL's GEMMs are faster for
    few rows against a wide weight: `project`, `FamLM.logits`)."""
    rows = x.numel() // x.shape[-1]
    return (w @ x.reshape(rows, -1).T).T.contiguous().reshape(*x.shape[:-1], -1)


def project(lin: nn.Module, x: Tensor) -> Tensor:
    """lin(x), except that one row (a token decoded alone) reads the layer's `row_weight` where the model keeps
    one (`FamLM.keep_row_weights`): a one-row projection reads every weight once for two FLOPs each, so its time is
    the weights' bytes over the memory bandwidth, and a bfloat16 copy halves them. Where one row runs as mv (bf16
    on AMX CPUs), 2 to `FEW_ROWS` rows (a decode batch, a short prompt) run as W @ x^T: oneDNN's bf16 GEMM is
    faster in that orientation for few rows (2 AMX cores, 8 rows: [3072, 576] 239 against 413 us, the [49152, 576]
    lm_head 1.6 against 3.8 ms; 30 distinct matrices, so from memory)."""
    rows = x.numel() // x.shape[-1]
    w = getattr(lin, "row_weight", None)
    if w is not None and rows == 1:
        y = row_product(x, w, lin.row_mv)
    elif 1 < rows <= FEW_ROWS and getattr(lin, "row_mv", False) and type(lin) is nn.Linear:
        y = weight_first(x, lin.weight)
    else:
        return lin(x)
    return y if lin.bias is None else y + lin.bias


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """Hugging Face's Llama RMSNorm (normalised in float32, rounded to x's dtype, then scaled), with the float32
        part as PyTorch's fused `rms_norm` (bit for bit the same here, one op instead of five)."""
        return self.weight * F_.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=cfg.o_bias)
        self.few_rows = FEW_QUERIES  # up to this many bf16/fp16 query rows run `few_queries`, not SDPA

    def kv(self, xn: Tensor) -> tuple[Tensor, Tensor]:
        """xn [b, R, d] (normed) -> keys, values [b, kv_heads, R, head_dim], before RoPE."""
        b, r, _ = xn.shape
        k = project(self.k_proj, xn).view(b, r, self.n_kv, self.head_dim).transpose(1, 2)
        v = project(self.v_proj, xn).view(b, r, self.n_kv, self.head_dim).transpose(1, 2)
        return k, v

    def q(self, xn: Tensor) -> Tensor:
        b, r, _ = xn.shape
        return project(self.q_proj, xn).view(b, r, self.n_heads, self.head_dim).transpose(1, 2)

    def qkv(self, xn: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`q(xn)` and `kv(xn)`; one row reads the fused row copy of the three projections where the model keeps
        one (`FamLM.keep_row_weights`): one matmul instead of three."""
        w = getattr(self, "row_qkv", None)
        if w is None or xn.numel() != xn.shape[-1]:
            return self.q(xn), *self.kv(xn)
        y = row_product(xn, w, self.row_mv)
        if self.q_proj.bias is not None:
            y = y + torch.cat((self.q_proj.bias, self.k_proj.bias, self.v_proj.bias))
        b, hd = xn.shape[0], self.head_dim
        q, k, v = y.split((self.n_heads * hd, self.n_kv * hd, self.n_kv * hd), -1)
        return (q.view(b, 1, self.n_heads, hd).transpose(1, 2), k.view(b, 1, self.n_kv, hd).transpose(1, 2),
                v.view(b, 1, self.n_kv, hd).transpose(1, 2))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """q [b, H, R, hd] (rotated), k/v [b, KV, C, hd] (rotated) -> [b, R, d]."""
        return self.out(self.heads(q, k, v, mask))

    def heads(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Attention per head: q [b, H, R, hd], k/v [b, KV, C, hd] -> [b, H, R, hd]. mask: None, boolean [R, C]
        (True = attend) for every batch row, or (one query row, R = 1) an additive bias [b, 1, 1, C] per row in
        q's dtype (0 or -inf)."""
        if q.shape[2] <= self.few_rows and q.dtype != torch.float32:
            return self.few_queries(q, k, v, mask)
        return F_.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)

    def few_queries(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Attention of a few query rows (a decoded token; a block's last token with its F feedback rows) as two
        small matmuls per kv head, the grouped query heads side by side. On a CPU without AMX PyTorch's SDPA kernel
        is slow for few bf16 queries; measured on one thread of the AVX2 EPYC (scripts/bench_attention.py): 63
        against 427 us for one query and 545 keys, 443 against 1,046 us for 33 queries and 578 keys with a mask,
        1,070 against 1,330 for 64; from ~128 queries SDPA is faster. On a CPU with AMX SDPA is faster at every
        size (one thread: 37 against 106 us for one query, 367 against 1,041 for 33, 551 against 2,341 for 64), and
        on CUDA SDPA is the fused kernel: `loader.few_query_rows` turns this path off there. In float32 SDPA is fast
        and is kept."""
        b, r, g = q.shape[0], q.shape[2], self.n_heads // self.n_kv
        qg = q.reshape(b, self.n_kv, g * r, self.head_dim)  # query head h reads kv head h // g
        scores = (qg @ k.transpose(-1, -2)).float() * self.head_dim ** -0.5  # [b, KV, g R, C]
        if mask is not None and mask.dtype == torch.bool:  # [R, C], for every batch row
            scores = scores.masked_fill(~mask.repeat(g, 1), float("-inf"))
        elif mask is not None:  # an additive float32 bias [b, 1, 1, C] for one query row per batch row
            scores = scores + mask
        o = torch.softmax(scores, -1).to(v.dtype) @ v  # [b, KV, g R, hd]
        return o.reshape(b, self.n_heads, r, self.head_dim)

    def out(self, o: Tensor) -> Tensor:
        """[b, H, R, hd] -> [b, R, d]."""
        b, _, r, _ = o.shape
        return project(self.o_proj, o.transpose(1, 2).reshape(b, r, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        d, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(d, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, d, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        w = getattr(self, "row_gate_up", None)  # one row: the fused row copy of gate and up (`keep_row_weights`)
        if w is not None and x.numel() == x.shape[-1]:
            gate, up = row_product(x, w, self.row_mv).chunk(2, -1)
        else:
            gate, up = project(self.gate_proj, x), project(self.up_proj, x)
        return project(self.down_proj, F_.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def finish(self, resid: Tensor, attn_out: Tensor) -> Tensor:
        """Residual after attention, then the post-attention norm and MLP (block rows and FAM rows alike)."""
        y = resid + attn_out
        return y + self.mlp(self.post_attention_layernorm(y))


class Rope:
    """RoPE with angles computed in float64, so that they stay exact at positions in the millions."""

    def __init__(self, inv_freq: Tensor, scaling: float):
        self.inv_freq = inv_freq.double()  # [head_dim / 2]
        self.scaling = scaling

    def cos_sin(self, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """pos [b, n] -> cos, sin [b, 1, n, head_dim] (the head axis broadcasts)."""
        ang = pos.double()[..., None] * self.inv_freq.to(pos.device)
        ang = torch.cat((ang, ang), dim=-1)
        return ((ang.cos() * self.scaling).to(dtype)[:, None], (ang.sin() * self.scaling).to(dtype)[:, None])

    @staticmethod
    def apply(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


class FamLM(nn.Module):
    """The decoder (module names follow the Hugging Face checkpoint, so LoRA targets read the same) plus the
    learned FAM prompt. The model holds weights only: every per-document value lives in a `FamState`."""

    def __init__(self, arch: ArchConfig, fam: FamConfig, rope: Rope):
        super().__init__()
        self.arch, self.fam_cfg, self.rope = arch, fam, rope
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # P: F embeddings at the embedding level (FAM_SPEC "Initial state"); set by init_fam_prompt or an adapter.
        self.fam_prompt = nn.Parameter(torch.zeros(fam.fam_len, arch.hidden_size))
        self._fam0: Tensor | None = None  # inference cache of the initial state

    # ----------------------------------------------------------------------------------------------
    # initial state

    @torch.no_grad()
    def init_fam_prompt(self, token_ids: list[int]) -> None:
        """Initialise P from the token embeddings of a neutral text, repeated to F rows (recorded in adapters)."""
        ids = (token_ids * (self.fam_cfg.fam_len // max(len(token_ids), 1) + 1))[: self.fam_cfg.fam_len]
        self.fam_prompt.copy_(self.embed_tokens.weight[torch.tensor(ids, device=self.fam_prompt.device)])
        self.invalidate_cache()

    def invalidate_cache(self) -> None:
        """Call after changing weights (adapter prompt, training step) outside autograd."""
        self._fam0 = None

    def initial_fam(self) -> Tensor:
        """Run P alone through all layers with bidirectional attention among its F rows.

        Returns the activation entering each layer, F_{-1}^l [L, F, d]. Under autograd it is recomputed (P and
        LoRA change every step); otherwise it is computed once.
        """
        if self._fam0 is not None and not torch.is_grad_enabled():
            return self._fam0
        n = self.fam_cfg.fam_len
        h = self.fam_prompt.to(self.embed_tokens.weight.dtype)[None]  # [1, F, d]
        cos, sin = self.rope.cos_sin(torch.arange(n, device=h.device)[None], h.dtype)
        ins = []
        for layer in self.layers:
            ins.append(h[0])
            xn = layer.input_layernorm(h)
            k, v = layer.self_attn.kv(xn)
            q = Rope.apply(layer.self_attn.q(xn), cos, sin)
            h = layer.finish(h, layer.self_attn.attend(q, Rope.apply(k, cos, sin), v, None))
        out = torch.stack(ins)
        if not torch.is_grad_enabled():
            self._fam0 = out
        return out

    def new_state(self, batch: int = 1, mode: str | None = None, position: int | Tensor = 0) -> FamState:
        """An empty document. `position` (scalar or [batch]) is the RoPE position of its first token: the tests
        shift it, training draws it per row (Random Position Offset); sink mode ignores it."""
        cfg = self.fam_cfg if mode is None else self.fam_cfg.replace(mode=mode)
        a, dev, dt = self.arch, self.embed_tokens.weight.device, self.embed_tokens.weight.dtype
        base = torch.zeros(batch, dtype=torch.int64, device=dev)
        if cfg.mode != "sink":
            base = base + torch.as_tensor(position, dtype=torch.int64, device=dev)
        if cfg.F:
            fam = self.initial_fam()[None].expand(batch, -1, -1, -1)
        else:
            fam = torch.zeros(batch, a.num_layers, 0, a.hidden_size, device=dev, dtype=dt)
        empty = tuple(torch.zeros(batch, a.num_kv_heads, 0, a.head_dim, device=dev, dtype=dt)
                      for _ in range(a.num_layers))
        state = FamState(cfg=cfg, k=empty, v=empty, fam=fam, fam_fresh=torch.ones(batch, dtype=torch.bool, device=dev),
                         base=base, n_tokens=torch.zeros(batch, dtype=torch.int64, device=dev), n_block=0, n_sinks=0)
        return self.with_fam(state, fam, state.fam_fresh) if cfg.F else state

    def with_fam(self, state: FamState, fam: Tensor, fresh: Tensor) -> FamState:
        """Replace the feedback state read by the current block (and its keys/values, rotated to the F positions
        before the block). Random State Passing uses it to start a document from a carried state."""
        nf = state.cfg.F
        pos = state.base[:, None] + state.block_start - nf + torch.arange(nf, device=fam.device)
        cos, sin = self.rope.cos_sin(pos, fam.dtype)
        ks, vs = [], []
        for li, layer in enumerate(self.layers):
            fk, fv = layer.self_attn.kv(layer.input_layernorm(fam[:, li]))
            ks.append(torch.cat((Rope.apply(fk, cos, sin), state.k[li][:, :, nf:]), 2))
            vs.append(torch.cat((fv, state.v[li][:, :, nf:]), 2))
        return replace(state, k=tuple(ks), v=tuple(vs), fam=fam, fam_fresh=fresh)

    # ----------------------------------------------------------------------------------------------
    # the forward

    def forward_chunk(self, state: FamState, tokens: Tensor, grad_from: int = 0) -> tuple[FamState, Tensor]:
        """Process tokens [b, T] that lie inside the current block. Returns the new state and the final-normed
        hidden states of the chunk [b, T, d] (apply `lm_head` to those whose logits are needed).

        `grad_from` (training): layers below it run without autograd, for when nothing below is trained. The
        feedback rows' keys/values that those layers read stay as given (they are made in `with_fam`), but no
        gradient flows back through those layers' token rows."""
        ((new, h),) = self.forward_many([state], [tokens], grad_from)
        return new, h

    def forward_many(self, states: list[FamState], tokens: list[Tensor], grad_from: int = 0,
                     decode: DecodeBatch | None = None) -> list[tuple[FamState, Tensor]]:
        """Several documents in one pass, each with its own cache layout, mode and chunk: the engine's batch across
        sessions, and (one document) `forward_chunk`. Document i is a state of batch b_i (rows of one layout) and
        tokens [b_i, T_i] ([T_i] when b_i = 1) inside its current block. The dense work (norms, projections, MLP,
        for block rows and feedback rows alike) runs over the rows of all documents at once, as one
        [1, sum b_i R_i, d] batch; attention runs per document over its own cache and mask, except for the
        documents that `decode` takes (inference only: those decoding one token inside their block, one alone
        included), which attend together over its persistent buffer. Returns, per document, the new state and the
        final-normed hidden states [b_i, T_i, d]. `grad_from`: as in `forward_chunk`.
        """
        assert len(states) == len(tokens) and states, "one chunk of tokens per state"
        assert decode is None or not torch.is_grad_enabled(), "a DecodeBatch is for inference"
        tokens = [t if t.dim() == 2 else t[None] for t in tokens]
        grouped = [] if decode is None else [
            i for i, (s, t) in enumerate(zip(states, tokens, strict=True)) if DecodeBatch.eligible(s, t.shape[1])]
        slots = decode.admit([states[i] for i in grouped]) if decode is not None else []
        taken = set(grouped)
        alone = [i for i in range(len(states)) if i not in taken]
        out: list[tuple[FamState, Tensor] | None] = [None] * len(states)
        rest = self._forward_rows([states[i] for i in alone], [tokens[i] for i in alone], grad_from, decode,
                                  [tokens[i] for i in grouped], slots)
        for i, r in zip(alone + grouped, rest, strict=True):
            out[i] = r
        return out  # type: ignore[return-value]

    def _forward_rows(self, states: list[FamState], tokens: list[Tensor], grad_from: int,
                      decode: DecodeBatch | None, group_tokens: list[Tensor], slots: list[int]
                      ) -> list[tuple[FamState, Tensor]]:
        """`forward_many`'s pass: the documents `states` one by one in attention, then (with `decode`) the
        documents in its buffer's rows `slots`, with their tokens [1, 1] each. Returns the first's results in
        order, then the second's."""
        dt = self.embed_tokens.weight.dtype
        docs = [_Doc.plan(self, s, t) for s, t in zip(states, tokens, strict=True)]
        gated = any(s.cfg.fam_gate != 1.0 and d.fam_rows for s, d in zip(states, docs, strict=True))
        fam0 = self.initial_fam() if gated else None  # [L, F, d], once per call
        ng = len(slots)
        if ng:
            assert decode is not None
            order = sorted(range(ng), key=slots.__getitem__)  # the group's rows run in buffer order
            g_tok = torch.cat([group_tokens[k] for k in order])  # [n, 1]
            at_g, mask_g = decode.start()
            newest = decode.newest
            g_pos = (torch.cat([s.base for s in newest]) - torch.tensor([s.cfg.F for s in newest], device=at_g.device)
                     + at_g)  # a row's new token sits at cache slot n_cached
        # RoPE tables of the flattened rows (document by document, row by row; the group's last): in the layers
        # that update the feedback state a completing document's rows are [feedback rows ; tokens]; below them
        # only tokens.
        pos = [d.pos.reshape(-1) for d in docs] + ([g_pos] if ng else [])
        cos_all, sin_all = self.rope.cos_sin(torch.cat(pos)[None], dt)
        start = 0
        for d in docs:
            d.index(start)
            start += d.pos.numel()
        g_idx = torch.arange(start, start + ng, device=cos_all.device)
        tables: dict[tuple[bool, ...], tuple[Tensor, Tensor]] = {}
        hs = [self.embed_tokens(t) for t in tokens]  # [b_i, T_i, d] each
        hg = self.embed_tokens(g_tok) if ng else None  # [n, 1, d]
        new_k: list[list[Tensor]] = [[] for _ in docs]
        new_v: list[list[Tensor]] = [[] for _ in docs]
        new_fam: list[list[Tensor]] = [[] for _ in docs]
        grad = torch.is_grad_enabled()
        for li, layer in enumerate(self.layers):
            fam_in = [s.fam[:, li] for s in states]  # outside the no-grad layers: their state passes on with its graph
            with torch.set_grad_enabled(grad and li >= grad_from):
                attn = layer.self_attn
                # feedback rows of each document in this layer (layers below fam_update_from keep their state)
                rows = [d.fam_rows if li >= s.cfg.fam_update_from else 0 for d, s in zip(docs, states, strict=True)]
                key = tuple(r > 0 for r in rows)
                if key not in tables:
                    idx = torch.cat([d.upper if up else d.lower for d, up in zip(docs, key, strict=True)] + [g_idx])
                    tables[key] = cos_all[:, :, idx], sin_all[:, :, idx]
                cos, sin = tables[key]
                x = _cat([_flat(torch.cat((f, h), 1) if r else h)
                          for f, h, r in zip(fam_in, hs, rows, strict=True)] + ([_flat(hg)] if ng else []), 1)
                xn = layer.input_layernorm(x)  # [1, R, d]
                q, k, v = attn.qkv(xn)  # the feedback rows' keys are computed and dropped: their keys are in the state
                q, k = Rope.apply(q, cos, sin), Rope.apply(k, cos, sin)
                outs, at = [], 0
                for i, (d, s, r) in enumerate(zip(docs, states, rows, strict=True)):
                    n = r + d.T
                    rows_i = slice(at, at + d.b * n)
                    keys = torch.cat((s.k[li], _unflat(k[:, :, rows_i], d.b)[:, :, r:]), 2)
                    vals = torch.cat((s.v[li], _unflat(v[:, :, rows_i], d.b)[:, :, r:]), 2)
                    o = attn.heads(_unflat(q[:, :, rows_i], d.b), keys, vals, d.mask if r else d.tok_mask)
                    outs.append(o.transpose(0, 1).reshape(1, o.shape[1], d.b * n, o.shape[3]))
                    new_k[i].append(keys)  # [feedback | cached slots | chunk]: the next state's cache of this layer
                    new_v[i].append(vals)
                    at += d.b * n
                if ng:
                    assert decode is not None
                    gk, gv = decode.write(li, at_g, _unflat(k[:, :, at:], ng), _unflat(v[:, :, at:], ng))
                    o = attn.heads(_unflat(q[:, :, at:], ng), gk, gv, mask_g)  # [n, H, 1, hd]
                    outs.append(o.transpose(0, 1).reshape(1, o.shape[1], ng, o.shape[3]))
                resid = _cat([_flat(torch.cat((f * d.keep, h), 1) if r else h)
                              for f, h, r, d in zip(fam_in, hs, rows, docs, strict=True)]
                             + ([_flat(hg)] if ng else []), 1)
                y = layer.finish(resid, attn.out(_cat(outs, 2)))
                at = 0
                for i, (d, r) in enumerate(zip(docs, rows, strict=True)):
                    yi = y[:, at:at + d.b * (r + d.T)].reshape(d.b, r + d.T, -1)
                    new_fam[i].append(self._gated(states[i].cfg, fam0, li, yi[:, :r]) if r else fam_in[i])
                    hs[i] = yi[:, r:]
                    at += d.b * (r + d.T)
                if ng:
                    hg = y[:, at:].reshape(ng, 1, -1)
        normed = self.norm(_cat([_flat(h) for h in hs] + ([_flat(hg)] if ng else []), 1)).split(
            [d.b * d.T for d in docs] + ([ng] if ng else []), 1)
        out = []
        for i, (d, s) in enumerate(zip(docs, states, strict=True)):
            new = replace(s, k=tuple(new_k[i]), v=tuple(new_v[i]), n_tokens=s.n_tokens + d.T, n_block=s.n_block + d.T)
            if d.completes:
                new = self._complete_block(new, torch.stack(new_fam[i], 1) if d.fam_rows else None)
            out.append((new, normed[i].reshape(d.b, d.T, -1)))
        if ng:
            assert decode is not None
            g_out = normed[-1].reshape(ng, 1, 1, -1)  # by buffer row
            out += [(s, g_out[j]) for s, j in zip(decode.finish(slots), slots, strict=True)]
        return out

    @staticmethod
    def _gated(cfg: FamConfig, fam0: Tensor | None, li: int, fam: Tensor) -> Tensor:
        """Layer li's updated feedback rows [b, F, d] after FamConfig.fam_gate: F0 + g·(F_new - F0), with fam0
        the initial state [L, F, d] (None when the gate is 1)."""
        if fam0 is None or cfg.fam_gate == 1.0:
            return fam
        return fam0[li] + cfg.fam_gate * (fam - fam0[li])

    def _complete_block(self, s: FamState, fam: Tensor | None) -> FamState:
        """Slide the window by one block and swap in the updated feedback state."""
        cfg, nf = s.cfg, s.cfg.F
        n = s.n_cached
        sinks = min(cfg.n_sinks, n)
        drop = max(0, n - sinks - cfg.memory_blocks * cfg.block_size) if cfg.evicts else 0
        k, v, base = s.k, s.v, s.base
        if drop:
            keep = torch.cat((torch.arange(nf + sinks), torch.arange(nf + sinks + drop, nf + n))).to(base.device)
            k = tuple(t.index_select(2, keep) for t in k)
            v = tuple(t.index_select(2, keep) for t in v)
            if cfg.mode == "sink":  # positions are cache slots: the kept memory moves `drop` positions down
                cos, sin = self.rope.cos_sin(torch.full_like(base, -drop)[:, None], k[0].dtype)
                k = tuple(torch.cat((t[:, :, :nf + sinks], Rope.apply(t[:, :, nf + sinks:], cos, sin)), 2) for t in k)
            else:
                base = base + drop
        s = replace(s, k=k, v=v, base=base, n_block=0, n_sinks=sinks)
        return self.with_fam(s, fam, torch.zeros_like(s.fam_fresh)) if fam is not None else s

    def ingest(self, state: FamState, tokens: Tensor) -> tuple[FamState, Tensor]:
        """Any number of tokens [b, N], cut at block boundaries. Returns the new state and the final-normed
        hidden state of the last token [b, d] (the input of the next-token logits)."""
        assert tokens.shape[1] > 0, "ingest needs at least one token"
        for a, b in state.cuts(tokens.shape[1]):
            state, h = self.forward_chunk(state, tokens[:, a:b])
        return state, h[:, -1]

    def keep_row_weights(self, dtype: torch.dtype | None, mv: bool = False) -> None:
        """Keep a copy of every projection's weight (and the lm_head's) in `dtype` for passes of one row, or
        (None) drop the copies; q/k/v and gate/up are copied fused, so one row runs 4 matmuls a layer instead of
        7. Made from the weights as they are now: call it after merging an adapter, never with a LoRA attached.
        `mv`: one row runs as `torch.mv` instead of a one-row GEMM; with no `dtype` the projections' own weights
        serve it, no copy: q/k/v and gate/up move into one fused tensor each, whose rows the projections' weights
        then view (the default model in bf16 on 2 AMX cores: the 211 projections of a token read in 20.0 ms, the
        121 fused ones in 15.8). On 2 AMX cores oneDNN's one-row bf16 GEMM reads a [1536, 576] matrix in
        183 us where `torch.mv` takes 126 (the lm_head 4.1 against 2.6 ms), and a token decoded alone after 8k
        tokens of the default model in bf16 took 43.5 -> 35.7 ms; with oneDNN and MKL held to AVX2 on the same
        machine mv was no faster (`loader.row_mv_pays`).
        For a float32 model on a CPU, bfloat16 copies cost half its projection bytes in memory (~270 MB for the
        default model) and make a session decoding alone ~1.7x faster (58 -> 33 ms a token in process on the
        AVX2 EPYC, 2 threads); passes of two or more rows keep the float32 weights (bfloat16 matmuls are slower
        than float32 ones there on CPUs without AMX). A token decoded alone then rounds its activations to
        bfloat16 in the projections, so it can differ slightly from the same token decoded in a batch with other
        sessions."""
        def copy(*lins: nn.Module) -> Tensor | None:
            if any(type(lin) is not nn.Linear for lin in lins):
                raise TypeError("row copies are made from plain projections (merge a LoRA first)")
            if dtype is None and not mv:
                return None
            if dtype is None and len(lins) == 1:
                return lins[0].weight.detach()  # shared, not copied
            fused = torch.cat([lin.weight.detach() for lin in lins])
            if dtype is not None:
                return fused.to(dtype)
            start = 0
            for lin in lins:  # the weights become views of the fused tensor: the same values, stored once
                n = lin.weight.shape[0]
                lin.weight = nn.Parameter(fused[start:start + n], requires_grad=lin.weight.requires_grad)
                start += n
            return fused

        for layer in self.layers:
            a, mlp = layer.self_attn, layer.mlp
            a.row_qkv, a.o_proj.row_weight = copy(a.q_proj, a.k_proj, a.v_proj), copy(a.o_proj)
            mlp.row_gate_up = copy(mlp.gate_proj, mlp.up_proj) if mlp.gate_proj.bias is None else None
            mlp.down_proj.row_weight = copy(mlp.down_proj)
            for lin in (a.q_proj, a.k_proj, a.v_proj):
                lin.row_weight = None  # read fused
            for lin in (mlp.gate_proj, mlp.up_proj):  # unfused only where the MLP has biases
                lin.row_weight = copy(lin) if mlp.row_gate_up is None else None
            for module in (a, mlp, a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                module.row_mv = mv
        self.lm_head.row_weight, self.lm_head.row_mv = copy(self.lm_head), mv

    def logits(self, hidden: Tensor) -> Tensor:
        """Final-normed hidden states [..., d] -> float32 logits [..., vocab]. One row reads the lm_head's row copy
        where the model keeps one (`project`, which also runs 2 to `FEW_ROWS` bf16 rows as W @ hidden^T on AMX
        CPUs); 2 to 64 float32 rows (a decode batch) run as W @ hidden^T, the orientation in which the float32 GEMM
        is faster for few rows against a large vocabulary (the default model's [49152, 576] lm_head on the AVX2
        EPYC, 2 threads: 4.8 against 17.9 ms for 2 rows, 8.4 against 17.3 for 8, 13.5 against 21.4 for 16, equal
        from 256)."""
        lin, rows = self.lm_head, hidden.numel() // hidden.shape[-1]
        if 1 < rows <= 64 and hidden.dtype == torch.float32 and type(lin) is nn.Linear and lin.bias is None:
            return weight_first(hidden, lin.weight)
        return project(lin, hidden).float()


class _Doc:
    """One document's share of a `forward_many` pass: its rows, positions and masks."""

    def __init__(self, b: int, T: int, completes: bool, fam_rows: int, pos: Tensor,  # noqa: N803
                 mask: Tensor | None, tok_mask: Tensor | None, keep: Tensor):
        self.b, self.T, self.completes, self.fam_rows, self.pos = b, T, completes, fam_rows, pos
        self.mask, self.tok_mask, self.keep = mask, tok_mask, keep
        self.upper = self.lower = pos.new_empty(0)

    @staticmethod
    def plan(m: FamLM, state: FamState, tokens: Tensor) -> _Doc:
        cfg, S = state.cfg, state.n_cached
        b, T = tokens.shape
        assert b == state.batch_size, f"tokens batch {b} != state batch {state.batch_size}"
        assert 0 < T <= cfg.block_size - state.n_block, (
            f"chunk of {T} tokens does not fit the block ({state.n_block}/{cfg.block_size} used)")
        if not cfg.evicts and S + T > m.arch.max_position_embeddings:
            raise ValueError(f"full mode is limited to the model's context of {m.arch.max_position_embeddings} tokens")
        completes = state.n_block + T == cfg.block_size
        nf = cfg.F
        fam_rows = nf if completes else 0  # feedback rows join the queries when this chunk completes the block
        dev = tokens.device
        # query positions: the feedback rows take the F positions before the block; new token t sits at slot S + t
        pos = state.base[:, None] + torch.cat((state.block_start - fam_rows + torch.arange(fam_rows, device=dev),
                                               S + torch.arange(T, device=dev)))[None]  # [b, fam_rows + T]
        mask = _mask(nf, S, T, state.block_start, fam_rows, dev)
        # the first update of a fresh state may use a zero residual (FamConfig.zero_first_residual)
        keep = (~(state.fam_fresh & cfg.zero_first_residual)).to(m.embed_tokens.weight.dtype)[:, None, None]
        return _Doc(b, T, completes, fam_rows, pos, mask, None if mask is None else mask[fam_rows:], keep)

    def index(self, start: int) -> None:
        """Where this document's rows are among the pass's flattened positions (from `start`): all of them
        (`upper`: with the feedback rows), and its token rows only (`lower`)."""
        n = self.fam_rows + self.T
        self.upper = torch.arange(start, start + self.b * n, device=self.pos.device)
        self.lower = self.upper.view(self.b, n)[:, self.fam_rows:].reshape(-1)


def _cat(ts: list[Tensor], dim: int) -> Tensor:
    """torch.cat, without the copy when there is one tensor (a pass of one document: most decode steps)."""
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)


def _flat(x: Tensor) -> Tensor:
    """[b, n, d] -> [1, b n, d]: a document's rows in the pass's flattened batch."""
    return x.reshape(1, -1, x.shape[-1])


def _unflat(x: Tensor, b: int) -> Tensor:
    """[1, heads, b n, hd] (a document's slice of the flattened rows) -> [b, heads, n, hd]."""
    _, heads, bn, hd = x.shape
    return x.reshape(heads, b, bn // b, hd).transpose(0, 1)


def _mask(nf: int, S: int, T: int, block_start: int, fam_rows: int, device: torch.device) -> Tensor | None:
    """Boolean mask [fam_rows + T, nf + S + T] (True = attend), per the table in the module docstring."""
    if T == 1 and not fam_rows:
        return None  # one token sees everything cached
    chunk = torch.ones(T, nf + S + T, dtype=torch.bool, device=device)
    chunk[:, nf + S:] = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    if not fam_rows:
        return chunk
    fam = torch.ones(fam_rows, nf + S + T, dtype=torch.bool, device=device)
    fam[:, nf:nf + block_start] = False  # FAM queries never see the memory blocks (nor sinks)
    return torch.cat((fam, chunk), 0)
