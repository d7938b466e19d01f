"""MLA attention as ops: the eleven ``fine``-grain ops of the DeepSeek template (bf16, prefill),
one method each.

    input_norm  hidden, residual -> x, res1      add the residual, RMSNorm
    q_a         x -> q_lat                       low-rank query down-projection
    q_norm      q_lat -> q_lat_n                 RMSNorm of the query latent
    q_b         q_lat_n -> q                     query up-projection (nope + rope parts per head)
    q_rope      q -> q_pe                        rotary embedding of the rope part
    kv_a        x -> kv_lat                      compressed KV latent + the shared rotary key
    kv_prep     kv_lat -> kv_cache               latent RMSNorm, key rope, KV-cache write
    kv_b        kv_cache -> kv_up                every context latent up-projected, per request
    kv_expand   kv_up -> kv_heads                keys [nope | rope] and values laid out per head
    core_attn   q_pe, kv_heads -> attn_o         causal attention per request over its context
    o_proj      attn_o -> h

Attention is computed in the "naive" (prefill) form: ``kv_b`` up-projects every cached latent.
The ``kv_cache`` value is this microbatch's new cache rows; the rows before them (earlier steps,
or the first half of a request cut by the split) come from the cache, which the plan orders
(``kv_b``, the first reader of ``kv_cache``) after the previous microbatch's ``kv_prep``. Keys
are padded to the request's length at the end of the step, so a token's softmax has the same
length however the batch was cut.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from overlap.ops_graph import Role, op
from overlap.reference.kernels import apply_rope


def weight(g: torch.Generator, *shape: int, scale: float = 1.0) -> nn.Parameter:
    """A ``[in, out]`` (or stacked) weight, N(0, 1/in) * scale, from generator ``g``."""
    return nn.Parameter(torch.randn(*shape, generator=g) * scale / shape[-2] ** 0.5,
                        requires_grad=False)


def norm_weight(g: torch.Generator, width: int) -> nn.Parameter:
    return nn.Parameter(1.0 + 0.1 * torch.randn(width, generator=g), requires_grad=False)


class MLAAttention(nn.Module):
    """The attention half of a DeepSeek decoder layer (a base of the block classes).

    Subclasses set ``cfg`` (ReferenceConfig), ``kernels``, ``forward`` (the model's
    ForwardContext), ``layer_index`` and ``rope`` before calling :meth:`init_attention`.
    """

    def init_attention(self, g: torch.Generator) -> None:
        m = self.cfg.model
        h, nh, kvr = m.hidden_size, m.num_heads, m.kv_lora_rank
        dn, dr, dv = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        self.input_norm_w = norm_weight(g, h)
        self.w_q_a = weight(g, h, m.q_lora_rank)
        self.q_norm_w = norm_weight(g, m.q_lora_rank)
        self.w_q_b = weight(g, m.q_lora_rank, nh * (dn + dr))
        self.w_kv_a = weight(g, h, kvr + dr)
        self.kv_norm_w = norm_weight(g, kvr)
        self.w_kv_b = weight(g, kvr, nh * (dn + dv))
        self.w_o = weight(g, nh * dv, h)
        self.scale = (dn + dr) ** -0.5

    def _norm(self, x: Tensor, w: Tensor) -> Tensor:
        return self.kernels.rms_norm(x, w, self.cfg.rms_norm_eps)

    @op.compute(reads=("hidden", "residual"), writes=("x", "res1"), role=Role.NORM)
    def input_norm(self, hidden: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        res1 = hidden + residual
        return self._norm(res1, self.input_norm_w), res1

    @op.compute(reads="x", writes="q_lat", role=Role.MLA_MATRIX)
    def q_a(self, x: Tensor) -> Tensor:
        return self.kernels.linear(x, self.w_q_a)

    @op.compute(reads="q_lat", writes="q_lat_n", role=Role.MLA_VECTOR)
    def q_norm(self, q_lat: Tensor) -> Tensor:
        return self._norm(q_lat, self.q_norm_w)

    @op.compute(reads="q_lat_n", writes="q", role=Role.MLA_MATRIX)
    def q_b(self, q_lat_n: Tensor) -> Tensor:
        return self.kernels.linear(q_lat_n, self.w_q_b)

    @op.compute(reads="q", writes="q_pe", role=Role.MLA_VECTOR)
    def q_rope(self, q: Tensor) -> Tensor:
        m = self.cfg.model
        meta = self.forward.current("q_rope")
        q = q.view(q.shape[0], m.num_heads, m.qk_nope_head_dim + m.qk_rope_head_dim)
        nope, pe = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        return torch.cat([nope, apply_rope(pe, self.rope, meta.positions)], dim=-1)

    @op.compute(reads="x", writes="kv_lat", role=Role.MLA_MATRIX)
    def kv_a(self, x: Tensor) -> Tensor:
        return self.kernels.linear(x, self.w_kv_a)

    @op.compute(reads="kv_lat", writes="kv_cache", role=Role.MLA_VECTOR)
    def kv_prep(self, kv_lat: Tensor) -> Tensor:
        m = self.cfg.model
        meta = self.forward.current("kv_prep")
        latent, k_pe = kv_lat.split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        rows = torch.cat([self._norm(latent, self.kv_norm_w),
                          apply_rope(k_pe, self.rope, meta.positions)], dim=-1)
        cache = meta.cache.rows[self.layer_index]
        start = 0
        for piece, rid in zip(meta.pieces, meta.request_ids):
            cache[rid][piece.context_len:piece.context_len + piece.length] = (
                rows[start:start + piece.length])
            start += piece.length
        return rows

    @op.compute(reads="kv_cache", writes="kv_up", role=Role.MLA_MATRIX)
    def kv_b(self, kv_cache: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per request: its whole context's latents (the cached rows before this microbatch's,
        padded to the request's length) up-projected, and their rope keys."""
        m = self.cfg.model
        meta = self.forward.current("kv_b")
        cache = meta.cache.rows[self.layer_index]
        out, start = [], 0
        for piece, rid, total in zip(meta.pieces, meta.request_ids, meta.totals):
            end = start + piece.length
            before = cache[rid][:piece.context_len]
            pad = kv_cache.new_zeros(total - piece.context_len - piece.length, kv_cache.shape[1])
            keys = torch.cat([before, kv_cache[start:end], pad])
            latent, k_pe = keys.split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
            out.append((self.kernels.linear(latent, self.w_kv_b), k_pe))
            start = end
        return out

    @op.compute(reads="kv_up", writes="kv_heads", role=Role.MLA_VECTOR)
    def kv_expand(self, kv_up: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Per request: keys ``[nope | rope]`` (the rope key shared by every head) and values."""
        m = self.cfg.model
        nh, dn, dv = m.num_heads, m.qk_nope_head_dim, m.v_head_dim
        out = []
        for up, k_pe in kv_up:
            length = up.shape[0]
            k_nope, v = up.view(length, nh, dn + dv).split([dn, dv], -1)
            out.append((torch.cat([k_nope, k_pe[:, None, :].expand(length, nh, -1)], dim=-1), v))
        return out

    @op.compute(reads=("q_pe", "kv_heads"), writes="attn_o", role=Role.ATTN1)
    def core_attn(self, q_pe: Tensor, kv_heads: list[tuple[Tensor, Tensor]]) -> Tensor:
        meta = self.forward.current("core_attn")
        out, start = [], 0
        for piece, (key, v) in zip(meta.pieces, kv_heads):
            end = start + piece.length
            out.append(self._attend(q_pe[start:end], key, v, piece.context_len))
            start = end
        if not out:
            m = self.cfg.model
            return q_pe.new_zeros(0, m.num_heads * m.v_head_dim)
        return torch.cat(out)

    def _attend(self, q: Tensor, key: Tensor, v: Tensor, first: int) -> Tensor:
        """Causal attention of ``q`` (positions ``first``, ``first + 1``, ...) over ``key``/``v``."""
        m, k = self.cfg.model, self.kernels
        nh, dv = m.num_heads, m.v_head_dim
        length = key.shape[0]
        scores = k.bmm(q.transpose(0, 1), key.permute(1, 2, 0)) * self.scale  # [nh, n, length]
        positions = torch.arange(first, first + q.shape[0])
        hidden = torch.arange(length)[None, :] > positions[:, None]
        probs = torch.softmax(scores.float().masked_fill(hidden, float("-inf")), dim=-1)
        o = k.bmm(probs.to(q.dtype), v.transpose(0, 1))  # [nh, n, dv]
        return o.transpose(0, 1).reshape(q.shape[0], nh * dv)

    @op.compute(reads="attn_o", writes="h", role=Role.ATTN1)
    def o_proj(self, attn_o: Tensor) -> Tensor:
        return self.kernels.linear(attn_o, self.w_o)
