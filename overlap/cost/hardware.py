"""Hardware presets: the figures the cost model turns op costs into time with.

A plan is only as good as the clock it is simulated on, so every figure here is a named field with
a public source (see ``docs/hardware.md``); where no source exists the figure is an estimate and
the document says how it was reached. Peaks are vendor "dense" numbers; the ``*_efficiency``
fields say what fraction of them real kernels reach, and are what calibration
(:mod:`overlap.cost.calibrate`) adjusts. Presets are immutable values: derive a variant with
:meth:`Hardware.evolve` rather than editing one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import attrs

from overlap.errors import ConfigError, suggest

VENDORS = ("ascend", "nvidia")


def _positive(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{attribute.name!r} must be > 0 (got {value!r})")


def _non_negative(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ConfigError(f"{attribute.name!r} must be >= 0 (got {value!r})")


def _fraction(instance: object, attribute: attrs.Attribute, value: float) -> None:
    """A share of a peak: in (0, 1]."""
    if not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise ConfigError(f"{attribute.name!r} must be in (0, 1] (got {value!r})")


def _share(instance: object, attribute: attrs.Attribute, value: float) -> None:
    """A share that may be zero: in [0, 1]."""
    if not (isinstance(value, (int, float)) and 0 <= value <= 1):
        raise ConfigError(f"{attribute.name!r} must be in [0, 1] (got {value!r})")


def _count(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{attribute.name!r} must be an integer >= 1 (got {value!r})")


def _vendor(instance: object, attribute: attrs.Attribute, value: str) -> None:
    if value not in VENDORS:
        raise ConfigError(f"'vendor' must be one of {', '.join(VENDORS)} (got {value!r})")


def _name(instance: object, attribute: attrs.Attribute, value: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"'name' must be a non-empty string (got {value!r})")


@attrs.frozen
class Hardware:
    """One device (a rank) and the links around it.

    Units are the ones datasheets use: TFLOP/s (TOP/s for int8), GB/s = 1e9 bytes/s, seconds.
    Link bandwidths are per device and *unidirectional* (a datasheet's "900 GB/s NVLink" is
    bidirectional: 450 here). ``devices_per_node`` is the size of the scale-up domain: the
    devices one device reaches over ``intra_link_gbps`` (NVLink / HCCS / UB); beyond it traffic
    takes the ``inter_link_gbps`` RDMA NIC.
    """

    name: str = attrs.field(validator=_name)
    vendor: str = attrs.field(validator=_vendor)
    # Matrix-unit peaks, dense (no structured sparsity). 0 means the dtype has no matrix path.
    bf16_tflops: float = attrs.field(validator=_positive)
    int8_tops: float = attrs.field(validator=_non_negative)
    fp8_tflops: float = attrs.field(validator=_non_negative)
    # Vector-unit (non-matrix) peak in TFLOP/s, counted like CostFigures.vector_flops.
    vector_tflops: float = attrs.field(validator=_positive)
    hbm_gbps: float = attrs.field(validator=_positive)
    intra_link_gbps: float = attrs.field(validator=_positive)
    inter_link_gbps: float = attrs.field(validator=_positive)
    devices_per_node: int = attrs.field(validator=_count)
    # Fixed cost of one collective (its alpha), inside the scale-up domain and across it.
    intra_latency_s: float = attrs.field(validator=_positive)
    inter_latency_s: float = attrs.field(validator=_positive)
    # DeepEP-style low-latency all-to-all: its alpha, and its bandwidth as a share of normal mode.
    low_latency_s: float = attrs.field(validator=_positive)
    low_latency_bw_factor: float = attrs.field(validator=_fraction)
    launch_overhead_s: float = attrs.field(validator=_non_negative)
    compute_units: int = attrs.field(validator=_count)
    # True where matrix (cube/AIC) and vector (AIV) units are separate cores that run at once.
    separate_vector_units: bool = attrs.field(validator=attrs.validators.instance_of(bool))
    # Fraction of compute units a running communication kernel occupies (0: DMA/RDMA engines).
    comm_compute_share: float = attrs.field(validator=_share)
    matrix_efficiency: float = attrs.field(validator=_fraction)
    vector_efficiency: float = attrs.field(validator=_fraction)
    memory_efficiency: float = attrs.field(validator=_fraction)
    intra_link_efficiency: float = attrs.field(validator=_fraction)
    inter_link_efficiency: float = attrs.field(validator=_fraction)
    # Achieved GEMM efficiency falls for small GEMMs (tile quantisation, wave tails, the fixed
    # launch prologue): a matmul of F FLOPs reaches matrix_efficiency * F / (F + this).
    # 0 keeps one flat fraction (presets without kernel-level measurements).
    matrix_half_flops: float = attrs.field(default=0.0, validator=_non_negative)
    # ... and for a short reduction: every output tile pays a fixed epilogue, so a GEMM of depth
    # K reaches matrix_efficiency * K / (K + this) (priced through CostFigures.matrix_outputs).
    matrix_half_k: float = attrs.field(default=0.0, validator=_non_negative)
    # A correction of the collective bytes model (1: bytes as the op's cost counts them). Below
    # 1 where the real kernels move less than the model counts (an all-to-all priced without
    # all_to_all_forwarding that really deduplicates per node, say); calibration sets it when a
    # measured comm factor below 1 cannot be folded into the link efficiencies (they would
    # exceed 1).
    comm_bytes_factor: float = attrs.field(default=1.0, validator=_positive)
    # Normal-mode expert all-to-all as DeepEP runs it: a token crosses RDMA once per remote
    # destination node and is forwarded over the scale-up link to each destination rank there
    # (overlap.cost.collectives). False: every (token, expert) copy is sent on its own.
    all_to_all_forwarding: bool = attrs.field(default=False,
                                              validator=attrs.validators.instance_of(bool))
    notes: str = ""

    def matrix_efficiency_at(self, flops: float, outputs: float = 0.0) -> float:
        """The fraction of the matrix peak a GEMM of ``flops`` FLOPs and ``outputs`` output
        elements (M x N) reaches."""
        if not flops:
            return self.matrix_efficiency
        overhead = self.matrix_half_flops + 2.0 * self.matrix_half_k * outputs
        return self.matrix_efficiency * flops / (flops + overhead)

    @property
    def matrix_tflops(self) -> Mapping[str, float]:
        """Matrix peak per supported dtype (``bf16``, ``int8``, ``fp8``), TFLOP/s or TOP/s."""
        rates = {"bf16": self.bf16_tflops, "int8": self.int8_tops, "fp8": self.fp8_tflops}
        return MappingProxyType({k: v for k, v in rates.items() if v > 0})

    def matrix_peak_tflops(self, dtype: str) -> float:
        """The matrix peak for ``dtype``; a :class:`ConfigError` names the supported ones."""
        rates = self.matrix_tflops
        if dtype not in rates:
            raise ConfigError(
                f"hardware {self.name!r} has no {dtype!r} matrix rate; supported: {', '.join(rates)}"
            )
        return rates[dtype]

    def evolve(self, **overrides: Any) -> Hardware:
        """A copy with ``overrides`` applied; every field is validated again."""
        return self.with_overrides(overrides)

    def with_overrides(self, overrides: Mapping[str, Any]) -> Hardware:
        """Like :meth:`evolve`, from a mapping (for example a config file's ``hardware:`` table)."""
        fields = attrs.fields_dict(Hardware)
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise ConfigError(
                f"unknown hardware field(s) {', '.join(map(repr, unknown))}; valid: {', '.join(fields)}"
            )
        return attrs.evolve(self, **overrides)


def _ascend_910b(name: str, cubes: int, notes: str) -> Hardware:
    """The 910B family differs by enabled AI-core count; every per-core figure is the same."""
    # CloudMatrix384 paper: 376 TFLOPS per 910C die; we assume that die has the 910B2's 24 cores.
    per_cube_tflops = 376.0 / 24
    return Hardware(
        name=name,
        vendor="ascend",
        bf16_tflops=round(per_cube_tflops * cubes, 1),
        int8_tops=round(2 * per_cube_tflops * cubes, 1),
        fp8_tflops=0.0,
        vector_tflops=round(2 * cubes * 128 * 2 * 1.9e9 / 1e12, 1),
        hbm_gbps=1600.0,
        intra_link_gbps=196.0,
        inter_link_gbps=25.0,
        devices_per_node=8,
        intra_latency_s=15e-6,
        inter_latency_s=30e-6,
        low_latency_s=20e-6,
        low_latency_bw_factor=0.5,
        launch_overhead_s=5e-6,
        compute_units=cubes,
        separate_vector_units=True,
        comm_compute_share=0.0,
        matrix_efficiency=0.7,
        vector_efficiency=0.5,
        memory_efficiency=0.8,
        intra_link_efficiency=0.75,
        inter_link_efficiency=0.85,
        notes=notes,
    )


def _nvidia_hopper(name: str, **figures: Any) -> Hardware:
    """Hopper SXM parts share the SM design, NCCL/DeepEP behaviour and efficiency estimates."""
    base: dict[str, Any] = dict(
        vendor="nvidia",
        bf16_tflops=989.4,
        int8_tops=1978.9,
        fp8_tflops=1978.9,
        vector_tflops=133.8,
        hbm_gbps=3350.0,
        intra_link_gbps=450.0,
        inter_link_gbps=50.0,
        devices_per_node=8,
        intra_latency_s=8e-6,
        inter_latency_s=15e-6,
        low_latency_s=10e-6,
        low_latency_bw_factor=0.8,
        launch_overhead_s=2e-6,
        compute_units=132,
        separate_vector_units=False,
        comm_compute_share=20 / 132,
        all_to_all_forwarding=True,
        matrix_efficiency=0.68,
        matrix_half_flops=5e9,
        matrix_half_k=540.0,
        vector_efficiency=0.6,
        memory_efficiency=0.85,
        intra_link_efficiency=0.8,
        inter_link_efficiency=0.9,
    )
    base.update(figures)
    return Hardware(name=name, **base)


def _presets() -> dict[str, Hardware]:
    presets = [
        _ascend_910b("910b2", 24, "Ascend 910B2 chip; Atlas 800T/800I A2 node of 8"),
        _ascend_910b("910b3", 20, "Ascend 910B3 chip; Atlas 800T/800I A2 node of 8"),
        _ascend_910b("910c", 24, "").evolve(
            devices_per_node=768,
            notes="Ascend 910C, one die (one rank); CloudMatrix384 UB domain of 384 chips x 2 "
            "dies. For a standalone Atlas 800 A3 server use evolve(devices_per_node=16).",
        ),
        _nvidia_hopper("h100", notes="H100 SXM5, 8-GPU HGX node, one 400 Gb/s NIC per GPU"),
        _nvidia_hopper(
            "h800",
            intra_link_gbps=200.0,
            notes="H800 SXM5: H100 silicon with NVLink cut to 400 GB/s bidirectional",
        ),
        _nvidia_hopper(
            "h20",
            bf16_tflops=148.0,
            int8_tops=296.0,
            fp8_tflops=296.0,
            vector_tflops=79.0,
            hbm_gbps=4000.0,
            compute_units=78,
            comm_compute_share=20 / 78,
            notes="H20 (96 GB HBM3), 8-GPU HGX node; SM count and vector peak are estimates",
        ),
    ]
    return {hw.name: hw for hw in presets}


HARDWARE: Mapping[str, Hardware] = MappingProxyType(_presets())
"""Every preset by its canonical name."""

# "910b" alone is ambiguous across the family; the generic huawei.com/Ascend910B resource in
# HAMi's device config (and npu-smi on most A2 inference servers) is the 910B3.
_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "910b": "910b3",
        "a2": "910b3",
        "a3": "910c",
        "cloudmatrix384": "910c",
        "h100sxm": "h100",
        "h100sxm5": "h100",
        "h800sxm": "h800",
        "h800sxm5": "h800",
    }
)


def _normalise(name: str) -> str:
    key = name.strip().lower()
    for prefix in ("huawei", "ascend", "nvidia", "atlas"):
        key = key.removeprefix(prefix).lstrip(" -_")
    return key.replace("-", "").replace("_", "").replace(" ", "")


def get_hardware(name: str | Hardware) -> Hardware:
    """The preset called ``name`` (case-insensitive; "Ascend-910B2", "NVIDIA H800" and the
    aliases 910b -> 910b3, a2 -> 910b3, a3 -> 910c work); a :class:`Hardware` is returned as is."""
    if isinstance(name, Hardware):
        return name
    key = _normalise(str(name))
    key = _ALIASES.get(key, key)
    if key not in HARDWARE:
        raise ConfigError(f"unknown hardware {name!r}{suggest(name, HARDWARE)}; valid: {', '.join(HARDWARE)}")
    return HARDWARE[key]
