"""Roofline op times: known values by hand, the two unit models, and argument checks."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlap.cost import HARDWARE, op_time
from overlap.errors import ConfigError
from overlap.ops_graph.cost import CostFigures

# Round numbers so every expected time below can be checked on paper.
GPU = HARDWARE["h100"].evolve(
    bf16_tflops=100.0,
    fp8_tflops=200.0,
    vector_tflops=10.0,
    hbm_gbps=1000.0,
    matrix_efficiency=0.5,
    vector_efficiency=0.5,
    memory_efficiency=0.5,
    launch_overhead_s=1e-6,
    matrix_half_flops=0.0,  # a flat efficiency; the size curves have their own tests
    matrix_half_k=0.0,
)
NPU = GPU.evolve(vendor="ascend", separate_vector_units=True, fp8_tflops=0.0)

# 1e12 matrix FLOPs at 100 TFLOP/s * 0.5 = 0.02 s; 1e11 vector FLOPs at 10 * 0.5 = 0.02 s;
# 1e9 bytes at 1000 GB/s * 0.5 = 0.002 s.
MIXED = CostFigures(flops=1e12, vector_flops=1e11, hbm_bytes=1e9)


def test_gpu_adds_matrix_and_vector_time():
    """On a GPU the matrix and vector work share the SMs, so their times add."""
    t = op_time(MIXED, GPU)
    assert (t.matrix_s, t.vector_s, t.memory_s) == pytest.approx((0.02, 0.02, 0.002))
    assert t.launch_s == 1e-6
    assert t.total_s == pytest.approx(1e-6 + 0.04)


def test_small_gemms_reach_less_of_the_peak():
    """With matrix_half_flops = 1e11, a 1e11-FLOP GEMM reaches half of matrix_efficiency (0.25:
    1e11 / (100e12 * 0.25) = 4 ms), a 9e11 one 0.9 of it (0.45: 9e11 / 45e12 = 20 ms)."""
    hw = GPU.evolve(matrix_half_flops=1e11)
    assert op_time(CostFigures(flops=1e11), hw).matrix_s == pytest.approx(0.004)
    assert op_time(CostFigures(flops=9e11), hw).matrix_s == pytest.approx(0.02)
    assert hw.matrix_efficiency_at(9e11) == pytest.approx(0.45)


def test_short_reductions_reach_less_of_the_peak():
    """With matrix_half_k = 512, a GEMM of depth 512 (1e11 FLOPs = 2 * outputs * 512) reaches half
    of matrix_efficiency: 1e11 / (100e12 * 0.25) = 4 ms; at depth 1536, three quarters."""
    hw = GPU.evolve(matrix_half_k=512.0)
    outputs = 1e11 / (2 * 512)
    assert op_time(CostFigures(flops=1e11, matrix_outputs=outputs), hw).matrix_s == pytest.approx(0.004)
    assert hw.matrix_efficiency_at(3e11, outputs) == pytest.approx(0.375)


# DeepGEMM's published H800 FP8 table (README of its first release; docs/hardware.md
# [DeepGEMM]): (groups, M per group, N, K, TFLOPS) for normal, contiguous and masked GEMMs.
DEEPGEMM = [
    *((1, m, n, k, tf) for m, n, k, tf in [
        (64, 2112, 7168, 206), (64, 24576, 1536, 289), (64, 32768, 512, 219),
        (64, 7168, 16384, 336), (64, 4096, 7168, 287), (64, 7168, 2048, 295),
        (128, 2112, 7168, 352), (128, 24576, 1536, 535), (128, 32768, 512, 358),
        (128, 7168, 16384, 645), (128, 4096, 7168, 533), (128, 7168, 2048, 510),
        (4096, 2112, 7168, 1058), (4096, 24576, 1536, 990), (4096, 32768, 512, 590),
        (4096, 7168, 16384, 1358), (4096, 4096, 7168, 1304), (4096, 7168, 2048, 1025)]),
    (4, 8192, 4096, 7168, 1297), (4, 8192, 7168, 2048, 1099), (8, 4096, 4096, 7168, 1288),
    (8, 4096, 7168, 2048, 1093), (1, 1024, 4096, 7168, 1233), (1, 1024, 7168, 2048, 925),
    (2, 512, 4096, 7168, 1040), (2, 512, 7168, 2048, 916), (4, 256, 4096, 7168, 932),
    (4, 256, 7168, 2048, 815),
]


@pytest.mark.parametrize(("groups", "m", "n", "k", "tflops"), DEEPGEMM)
def test_h800_gemm_curve_matches_deepgemms_published_table(groups, m, n, k, tflops):
    """The h800 preset prices every published DeepGEMM shape within 0.78-1.30 of its time
    (0.85-1.12 with >= 1024 rows per group), with FP8 inputs, bf16 output and each group's weights read."""
    rows = groups * m
    fig = CostFigures(flops=2.0 * rows * n * k, hbm_bytes=rows * k + groups * k * n + 2 * rows * n,
                      matrix_outputs=rows * n, dtype="fp8")
    ratio = op_time(fig, HARDWARE["h800"]).total_s / (fig.flops / (tflops * 1e12))
    low, high = (0.85, 1.12) if m >= 1024 else (0.78, 1.30)
    assert low <= ratio <= high, f"{groups}x{m}x{n}x{k}: model/published {ratio:.2f}"


def test_ascend_overlaps_matrix_and_vector_time():
    """On Ascend the cube and vector cores run at once, so the longer of the two counts."""
    assert op_time(MIXED, NPU).total_s == pytest.approx(1e-6 + 0.02)


def test_memory_bound_op_takes_its_memory_time():
    """An op that reads more bytes than it computes on is priced by HBM bandwidth."""
    t = op_time(CostFigures(flops=1e10, hbm_bytes=1e11), GPU)
    assert t.memory_s == pytest.approx(0.2)
    assert t.total_s == pytest.approx(1e-6 + 0.2)
    assert t.bound == "memory"


def test_dtype_picks_the_matrix_peak():
    """fp8 work runs at the fp8 peak (twice bf16 here)."""
    t = op_time(CostFigures(flops=1e12, dtype="fp8"), GPU)
    assert t.matrix_s == pytest.approx(0.01)
    assert t.bound == "matrix"


def test_compute_share_slows_the_op_proportionally():
    """Half the device makes every component twice as long; launch cost is unchanged."""
    full, half = op_time(MIXED, GPU), op_time(MIXED, GPU, compute_share=0.5)
    assert half.matrix_s == pytest.approx(2 * full.matrix_s)
    assert half.memory_s == pytest.approx(2 * full.memory_s)
    assert half.total_s == pytest.approx(1e-6 + 0.08)


def test_empty_op_costs_its_launch():
    """An op with no work still pays the kernel launch overhead."""
    t = op_time(CostFigures(), GPU)
    assert t.total_s == 1e-6
    assert t.bound == "launch"


def test_unsupported_dtype_is_an_error():
    """fp8 matrix work on a device without an fp8 path is refused, naming what it has."""
    with pytest.raises(ConfigError, match="has no 'fp8' matrix rate; supported: bf16, int8$"):
        op_time(CostFigures(flops=1.0, dtype="fp8"), NPU)


def test_unsupported_dtype_without_matrix_work_is_fine():
    """A vector-only op tagged fp8 needs no fp8 matrix rate."""
    assert op_time(CostFigures(vector_flops=1e11, dtype="fp8"), NPU).total_s > 0


@pytest.mark.parametrize("share", [0, -0.5, 1.5])
def test_compute_share_must_be_a_fraction(share):
    """compute_share outside (0, 1] is rejected with its value."""
    message = f"'compute_share' must be in (0, 1] (got {share!r})"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        op_time(MIXED, GPU, compute_share=share)


def test_negative_figures_are_rejected():
    """A negative cost figure is a bug upstream and is reported by name."""
    with pytest.raises(ConfigError, match=re.escape("'hbm_bytes' must be >= 0 (got -1.0)")):
        op_time(CostFigures(hbm_bytes=-1.0), GPU)


figures = st.builds(
    CostFigures,
    flops=st.floats(0, 1e15),
    vector_flops=st.floats(0, 1e13),
    hbm_bytes=st.floats(0, 1e12),
    dtype=st.sampled_from(["bf16", "int8"]),
)


@given(fig=figures, name=st.sampled_from(sorted(HARDWARE)), share=st.floats(0.01, 1.0))
def test_total_is_at_least_every_component(fig, name, share):
    """The total never undercuts the launch cost or any single unit's time."""
    t = op_time(fig, HARDWARE[name], compute_share=share)
    for part in (t.matrix_s, t.vector_s, t.memory_s):
        assert t.total_s >= t.launch_s + part * (1 - 1e-12)


@given(fig=figures, extra=st.floats(0, 1e12), name=st.sampled_from(sorted(HARDWARE)))
def test_more_bytes_is_never_faster(fig, extra, name):
    """Adding device-memory traffic never shortens an op."""
    more = CostFigures(fig.flops, fig.vector_flops, fig.hbm_bytes + extra, fig.comm_bytes, fig.dtype)
    assert op_time(more, HARDWARE[name]).total_s >= op_time(fig, HARDWARE[name]).total_s


@given(fig=figures, low=st.floats(0.01, 1.0), high=st.floats(0.01, 1.0))
def test_less_share_is_never_faster(fig, low, high):
    """A smaller share of the device never makes an op quicker."""
    low, high = sorted((low, high))
    hw = HARDWARE["h800"]
    assert op_time(fig, hw, compute_share=low).total_s >= op_time(fig, hw, compute_share=high).total_s
