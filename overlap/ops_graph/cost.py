"""Cost formulas: what an op costs as a function of the microbatch shape.

An op's cost is data, not code, so a graph can be written to JSON, read back and simulated
anywhere. Each figure (matrix FLOPs, vector FLOPs, device-memory bytes, communicated bytes) is a
:class:`Formula`: a weighted sum of the :class:`~overlap.ops_graph.shape.Shape` features plus one
saturating term for weights that are read only when some token needs them (routed experts).
The cost model (``overlap.cost``) turns the evaluated :class:`CostFigures` into time.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from overlap.ops_graph.shape import Shape

DTYPES = ("bf16", "int8", "fp8")
FORMULAS = ("flops", "vector_flops", "hbm_bytes", "comm_bytes", "matrix_outputs")


@attrs.frozen
class Formula:
    """``const + per_token*T + per_request*R + per_context*C + per_pair*P + saturating*(1-(1-hit)**T)``.

    The saturating term models weights touched by a token with probability ``hit``: routed-expert
    weights on a rank are read once per op call if any token routes to them, so their bytes grow
    with tokens until every local expert is active.
    """

    const: float = 0.0
    per_token: float = 0.0
    per_request: float = 0.0
    per_context: float = 0.0
    per_pair: float = 0.0
    saturating: float = 0.0
    hit: float = attrs.field(default=0.0)

    @hit.validator
    def _check_hit(self, attribute: attrs.Attribute, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"'hit' must be in [0, 1] (got {value})")

    def __call__(self, shape: Shape) -> float:
        value = (
            self.const
            + self.per_token * shape.tokens
            + self.per_request * shape.requests
            + self.per_context * shape.context
            + self.per_pair * shape.pairs
        )
        if self.saturating:
            value += self.saturating * (1.0 - (1.0 - self.hit) ** shape.tokens)
        return value

    def __add__(self, other: Formula) -> Formula:
        if self.saturating and other.saturating and self.hit != other.hit:
            raise ValueError("cannot add formulas with different saturating 'hit' rates")
        return Formula(
            const=self.const + other.const,
            per_token=self.per_token + other.per_token,
            per_request=self.per_request + other.per_request,
            per_context=self.per_context + other.per_context,
            per_pair=self.per_pair + other.per_pair,
            saturating=self.saturating + other.saturating,
            hit=self.hit if self.saturating else other.hit,
        )

    def to_dict(self) -> dict[str, float]:
        """The non-zero coefficients (a zero formula is ``{}``)."""
        return {k: v for k, v in attrs.asdict(self).items() if v}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Formula:
        unknown = set(data) - set(attrs.fields_dict(cls))
        if unknown:
            valid = ", ".join(attrs.fields_dict(cls))
            raise ValueError(f"unknown formula term(s) {sorted(unknown)}; valid: {valid}")
        for k, v in data.items():  # JSON is untrusted: a term is a finite number >= 0
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < math.inf:
                raise ValueError(f"formula term {k!r} must be a finite number >= 0 (got {v!r})")
        return cls(**{k: float(v) for k, v in data.items()})


ZERO = Formula()


@attrs.frozen
class CostFigures:
    """An op's cost for one microbatch shape, before any hardware is involved."""

    flops: float = 0.0
    vector_flops: float = 0.0
    hbm_bytes: float = 0.0
    comm_bytes: float = 0.0
    dtype: str = "bf16"
    matrix_outputs: float = 0.0


def _check_dtype(instance: object, attribute: attrs.Attribute, value: str) -> None:
    if value not in DTYPES:
        raise ValueError(f"{attribute.name!r} must be one of {', '.join(DTYPES)} (got {value!r})")


@attrs.frozen
class OpCost:
    """The cost formulas of an op, and the dtype of its matrix work.

    flops:        matrix-unit (GEMM) floating point operations on this rank.
    vector_flops: vector-unit element operations (norms, rotary embedding, activations, softmax).
    hbm_bytes:    device-memory bytes read and written (weights, activations, KV cache).
    comm_bytes:   bytes this rank puts into the op's collective: the buffer of an all-reduce, the
                  local shard of an all-gather, the input of a reduce-scatter, the whole send
                  buffer of an all-to-all (including the share that stays on the rank).
    matrix_outputs: output elements of the op's GEMMs (M x N, summed over its GEMMs): each
                  output tile pays a fixed prologue/epilogue, which is why a GEMM with a short
                  reduction (small K) reaches less of the matrix peak (``Hardware.matrix_half_k``).
    """

    flops: Formula = ZERO
    vector_flops: Formula = ZERO
    hbm_bytes: Formula = ZERO
    comm_bytes: Formula = ZERO
    dtype: str = attrs.field(default="bf16", validator=_check_dtype)
    matrix_outputs: Formula = ZERO

    def __call__(self, shape: Shape) -> CostFigures:
        return CostFigures(
            flops=self.flops(shape),
            vector_flops=self.vector_flops(shape),
            hbm_bytes=self.hbm_bytes(shape),
            comm_bytes=self.comm_bytes(shape),
            dtype=self.dtype,
            matrix_outputs=self.matrix_outputs(shape),
        )

    def __add__(self, other: OpCost) -> OpCost:
        return OpCost(
            flops=self.flops + other.flops,
            vector_flops=self.vector_flops + other.vector_flops,
            hbm_bytes=self.hbm_bytes + other.hbm_bytes,
            comm_bytes=self.comm_bytes + other.comm_bytes,
            dtype=self.dtype if self.flops != ZERO else other.dtype,
            matrix_outputs=self.matrix_outputs + other.matrix_outputs,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in FORMULAS:
            terms = getattr(self, name).to_dict()
            if terms:
                out[name] = terms
        if self.dtype != "bf16":
            out["dtype"] = self.dtype
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OpCost:
        fields = {*FORMULAS, "dtype"}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown cost field(s) {sorted(unknown)}; valid: {', '.join(sorted(fields))}")
        kwargs: dict[str, Any] = {
            k: Formula.from_dict(v) for k, v in data.items() if k != "dtype"
        }
        if "dtype" in data:
            kwargs["dtype"] = data["dtype"]
        return cls(**kwargs)


FREE = OpCost()
