"""The block's arithmetic, in two flavours: ``exact`` (row-independent) and ``fast`` (torch's own).

Microbatching must not change results, and the strongest check is bit for bit. That needs every
op to compute a token's row the same way whatever other rows share the call, which torch's CPU
kernels do not promise:

- matmul picks its kernel and blocking by the row count (a one-row slice goes to a GEMV), so a
  row of ``x[a:b] @ w`` can differ from the same row of ``x @ w`` in the last bits;
- SIMD transcendental functions (``exp`` inside ``silu``/``sigmoid``) differ from the scalar code
  that handles a loop's tail, so an element's result depends on where the slice starts.

``exact`` avoids both: a matmul is a broadcast multiply and a sum over the shared dimension (each
output a fixed-order reduction of its own row), and ``silu``/``sigmoid`` run in float64 and round
once, so a lane-dependent last bit of the float64 result never survives the rounding. Norms,
softmax over a fixed length, element-wise arithmetic and gathers are already row-independent.
``fast`` uses ``torch.matmul`` and the fp32 activations: results then agree within float
tolerance only. Rotary embeddings read a precomputed cos/sin table in both, as serving engines do.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor


@attrs.frozen
class Kernels:
    """The arithmetic the block runs: ``Kernels(exact=True)`` is row-independent."""

    exact: bool = True

    def linear(self, x: Tensor, w: Tensor) -> Tensor:
        """``x @ w`` over the last dimension of ``x`` (``w`` is ``[in, out]``)."""
        if not self.exact:
            return x @ w
        return (x.unsqueeze(-1) * w).sum(-2)

    def bmm(self, a: Tensor, b: Tensor) -> Tensor:
        """Batched ``a @ b`` (``[..., m, k] @ [..., k, n]``)."""
        if not self.exact:
            return a @ b
        return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)

    def silu(self, x: Tensor) -> Tensor:
        if not self.exact:
            return torch.nn.functional.silu(x)
        return torch.nn.functional.silu(x.double()).to(x.dtype)

    def sigmoid(self, x: Tensor) -> Tensor:
        if not self.exact:
            return torch.sigmoid(x)
        return torch.sigmoid(x.double()).to(x.dtype)

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """RMSNorm over the last dimension, accumulated in float32."""
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight

    def swiglu(self, x: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
        """``down(silu(gate(x)) * up(x))`` with ``gate_up`` = ``[in, 2 * inner]``."""
        g, u = self.linear(x, gate_up).chunk(2, dim=-1)
        return self.linear(self.silu(g) * u, down)


def rope_table(dim: int, max_positions: int, theta: float, dtype: torch.dtype) -> Tensor:
    """``[max_positions, dim]``: cos for the first half of the columns, sin for the second."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype)


def apply_rope(x: Tensor, table: Tensor, positions: Tensor) -> Tensor:
    """Rotate ``x`` (``[T, ..., dim]``, GPT-NeoX halves) by each token's position."""
    cos, sin = table[positions].chunk(2, dim=-1)
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
