"""An op: one node of a layer's graph, described by what it reads, writes and costs.

Strategies never look at an op's callable; they place ops on streams by *kind* (compute work,
a collective, or something that blocks the host) and by *role*, a short label such as ``attn``
or ``dispatch`` that names the op's place in a MoE layer, so one strategy serves every model.
"""

from __future__ import annotations

import enum
import keyword
from collections.abc import Callable
from typing import Any

import attrs

from overlap.ops_graph.cost import FREE, OpCost


class OpKind(enum.Enum):
    """What an op occupies while it runs."""

    COMPUTE = "compute"  # matrix/vector work on the device's compute units
    COMM = "comm"  # a collective over a process group
    HOST = "host"  # blocks the host (a device->host copy such as ``.cpu().tolist()``)


class Collective(enum.Enum):
    """The collective a COMM op performs."""

    ALL_TO_ALL = "all_to_all"
    ALL_GATHER = "all_gather"
    REDUCE_SCATTER = "reduce_scatter"
    ALL_REDUCE = "all_reduce"


class Role:
    """Well-known op roles in a MoE decoder layer (an op's ``role`` may be any identifier).

    The built-in strategies key their orders on these; an op with another role is placed by its
    kind and dependencies alone.
    """

    NORM = "norm"
    ATTN = "attn"  # whole attention block: norm, MLA/MHA, o_proj
    ATTN0 = "attn0"  # attention stage 0: q/kv down and up projections
    ATTN1 = "attn1"  # attention stage 1: core attention, o_proj
    MLA_MATRIX = "mla_matrix"  # fine-grained MLA matmuls
    MLA_VECTOR = "mla_vector"  # fine-grained MLA vector work: norms, rope, KV-cache write
    QUANT = "quant"  # activation cast to FP8 (per-token 1x128 block scales) before an FP8 GEMM
    GATE = "gate"  # post-attention norm + router
    DISPATCH = "dispatch"
    EXPERTS = "experts"  # routed experts
    PERMUTE = "permute"  # MoE permute / unpermute: rows into expert order and back (weighted)
    COMBINE = "combine"
    SHARED = "shared"  # shared experts
    MLP = "mlp"  # dense feed-forward
    MERGE = "merge"  # routed + shared sum
    TP_COMM = "tp_comm"  # tensor-parallel all-reduce / all-gather / reduce-scatter


def _at_least_one(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name!r} must be an integer >= 1 (got {value!r})")


@attrs.frozen
class Routing:
    """How an expert all-to-all's tokens fan out, so the cost model can count what really moves.

    The op's ``comm_bytes`` count ``topk`` copies of each token (one per chosen expert) of
    ``experts`` routed experts spread evenly over the group. Group-limited routing (DeepSeek-V3's
    ``n_group`` / ``topk_group``) picks a token's experts inside ``max_groups`` of ``groups``
    contiguous expert groups; ``max_groups >= groups`` means no limit.
    """

    topk: int = attrs.field(validator=_at_least_one)
    experts: int = attrs.field(validator=_at_least_one)
    groups: int = attrs.field(default=1, validator=_at_least_one)
    max_groups: int = attrs.field(default=1, validator=_at_least_one)

    def __attrs_post_init__(self) -> None:
        if self.topk > self.experts:
            raise ValueError(f"'topk' ({self.topk}) must be <= 'experts' ({self.experts})")
        if self.experts % self.groups:
            raise ValueError(f"'experts' ({self.experts}) must split evenly into 'groups' "
                             f"({self.groups})")


@attrs.frozen
class Comm:
    """The collective of a COMM op and the process group it runs on; ``routing`` (expert
    all-to-alls only) says how its tokens fan out over the group."""

    collective: Collective = attrs.field(converter=Collective)
    group: str
    size: int = attrs.field(default=1)
    routing: Routing | None = attrs.field(
        default=None, converter=lambda r: Routing(**r) if isinstance(r, dict) else r,
        validator=attrs.validators.optional(attrs.validators.instance_of(Routing)))

    @size.validator
    def _check_size(self, attribute: attrs.Attribute, value: int) -> None:
        if value < 1:
            raise ValueError(f"'size' must be >= 1 (got {value})")

    def __str__(self) -> str:
        return f"{self.collective.value}@{self.group}[{self.size}]"


def _identifier(instance: object, attribute: attrs.Attribute, value: str) -> None:
    if not isinstance(value, str) or not value.isidentifier() or keyword.iskeyword(value):
        raise ValueError(f"{attribute.name!r} must be a Python identifier (got {value!r})")


def _names(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@attrs.frozen
class Op:
    """One op of a layer graph.

    name:   unique in its graph.
    kind:   COMPUTE, COMM or HOST.
    reads:  names of the values it consumes, in the order its callable takes them.
    writes: names of the values it produces, in the order its callable returns them.
    comm:   the collective, required exactly when ``kind`` is COMM.
    cost:   formulas of its work as a function of the microbatch shape.
    role:   its place in the layer (see :class:`Role`); defaults to the name.
    fn:     the callable that runs it, or None in pure simulation. Not part of equality.
    """

    name: str = attrs.field(validator=_identifier)
    kind: OpKind = attrs.field(converter=OpKind)
    reads: tuple[str, ...] = attrs.field(default=(), converter=_names)
    writes: tuple[str, ...] = attrs.field(default=(), converter=_names)
    comm: Comm | None = None
    cost: OpCost = FREE
    role: str = attrs.field(default="")
    fn: Callable[..., Any] | None = attrs.field(default=None, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        for value in (*self.reads, *self.writes):
            if not value.isidentifier():
                raise ValueError(f"op {self.name!r}: value name {value!r} is not an identifier")
        if (self.kind is OpKind.COMM) != (self.comm is not None):
            need = "needs a 'comm' (collective and group)" if self.kind is OpKind.COMM else (
                f"is {self.kind.value} and must not have a 'comm'"
            )
            raise ValueError(f"op {self.name!r} {need}")
        if not self.role:
            object.__setattr__(self, "role", self.name)

    def with_fn(self, fn: Callable[..., Any] | None) -> Op:
        """This op bound to another callable."""
        return attrs.evolve(self, fn=fn)

    def describe(self) -> str:
        """``kind`` plus the collective, e.g. ``comm all_to_all@ep[16]``."""
        return f"{self.kind.value} {self.comm}" if self.comm else self.kind.value
