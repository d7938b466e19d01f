"""Roofline time of one compute op: how long its FLOPs and bytes take on a device.

The simulator needs a duration for every (microbatch, op) before any hardware is touched. A
roofline is the simplest model that gets the two regimes of MoE inference right: prefill GEMMs
are bound by the matrix units, decode (few tokens, all weights read) by device memory. The model:

    matrix_s = flops        / (peak[dtype] * matrix_efficiency(flops) * share)
    vector_s = vector_flops / (vector peak * vector_efficiency * share)
    memory_s = hbm_bytes    / (HBM bandwidth * memory_efficiency * share)
    compute  = max(matrix_s, vector_s)   where cube and vector cores run at once (Ascend)
             = matrix_s + vector_s       where both share the SMs (GPUs)
    total_s  = launch_overhead + max(compute, memory_s)

``matrix_efficiency(flops)`` is the preset's ``matrix_efficiency`` times ``flops / (flops +
matrix_half_flops + 2 * matrix_half_k * matrix_outputs)``: small GEMMs reach less of the peak
(wave tails, launch prologue), and so do GEMMs with a short reduction, because every output
tile pays a fixed epilogue (a single GEMM of depth K reaches ``K / (K + matrix_half_k)`` of
it). A flat fraction where the preset has neither figure. ``share`` is the fraction of the
device the op gets. The simulator lowers it when a collective kernel occupies compute units or
when two compute streams run at once; memory bandwidth is scaled too, because concurrent
kernels split it as well.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import attrs

from overlap.cost.hardware import Hardware
from overlap.errors import ConfigError

if TYPE_CHECKING:  # the cost model reads figures; it does not depend on how they were built
    from overlap.ops_graph.cost import CostFigures


@attrs.frozen
class OpTime:
    """Where an op's time goes, in seconds; ``total_s`` is what the simulator schedules."""

    matrix_s: float
    vector_s: float
    memory_s: float
    launch_s: float
    total_s: float

    @property
    def bound(self) -> str:
        """The component that sets ``total_s``: "matrix", "vector", "memory" or "launch"."""
        parts = {"matrix": self.matrix_s, "vector": self.vector_s, "memory": self.memory_s}
        name, value = max(parts.items(), key=lambda item: item[1])
        return name if value > 0 else "launch"


def op_time(fig: CostFigures, hw: Hardware, *, compute_share: float = 1.0) -> OpTime:
    """Roofline time of an op with cost ``fig`` on ``hw`` given ``compute_share`` of the device."""
    if not (isinstance(compute_share, (int, float)) and 0 < compute_share <= 1):
        raise ConfigError(f"'compute_share' must be in (0, 1] (got {compute_share!r})")
    for field in ("flops", "vector_flops", "hbm_bytes", "matrix_outputs"):
        value = getattr(fig, field)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{field!r} must be >= 0 (got {value!r})")

    matrix_s = 0.0
    if fig.flops:
        peak = hw.matrix_peak_tflops(fig.dtype) * 1e12
        # = flops / (peak * matrix_efficiency_at(...) * share), without underflow for tiny ops
        overhead = hw.matrix_half_flops + 2.0 * hw.matrix_half_k * fig.matrix_outputs
        matrix_s = (fig.flops + overhead) / (peak * hw.matrix_efficiency * compute_share)
    vector_s = fig.vector_flops / (hw.vector_tflops * 1e12 * hw.vector_efficiency * compute_share)
    memory_s = fig.hbm_bytes / (hw.hbm_gbps * 1e9 * hw.memory_efficiency * compute_share)

    # Ascend's cube (AIC) and vector (AIV) cores run at once; a GPU's SMs do one or the other.
    compute_s = max(matrix_s, vector_s) if hw.separate_vector_units else matrix_s + vector_s
    launch_s = hw.launch_overhead_s
    return OpTime(
        matrix_s=matrix_s,
        vector_s=vector_s,
        memory_s=memory_s,
        launch_s=launch_s,
        total_s=launch_s + max(compute_s, memory_s),
    )
