"""Device-kernel traces as calibration input: kernels -> (layer, op) -> measured durations.

A PyTorch-profiler trace of a real model holds thousands of CPU ops, runtime calls and flow
arrows beside the few hundred device kernels whose durations are what the simulator predicts.
This module keeps the kernels only (``cat == "kernel"``), streamed (:mod:`overlap.cost.trace_json`),
and turns them into per-op measurements in three steps:

1. **Segment.** Each kernel gets the innermost user annotation (``record_function``) around the
   runtime call that launched it (joined by the profiler's ``correlation`` id), or the GPU-side
   annotation around the kernel itself; the k-th occurrence of an annotation name is layer k.
   Without annotations (CUDA-graph replays) the kernel sequence of the compute stream is cut
   into ``layers`` periods at the kernel that repeats exactly once (or n times) per layer.
2. **Map.** A :class:`KernelTable` of regex rules (optionally restricted to a segment and to the
   n-th match inside one) names each kernel's op, its reporting role and its kind (``compute``,
   ``comm``, or ``notify`` for the small barrier/notify kernels of DeepEP). The table shipped for
   DeepSeek on H800 (DeepGEMM, FlashAttention, DeepEP) is :data:`DEEPSEEK_H800`; a user JSON file
   adds rules in front of it. Kernels no rule names are kept as *unmodelled* time, not dropped.
3. **Classify streams.** A stream whose kernel time is mostly comm/notify is a comm stream.

The result, :class:`KernelProfile`, gives :class:`~overlap.cost.calibrate.Measurement` rows for
``fit``; :func:`overlap.backends.timeline.kernel_timeline` turns it into a measured Timeline for
reports. No torch.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from overlap.errors import ConfigError

RULE_KINDS = ("compute", "comm", "notify")
RUNTIME_CATS = ("cuda_runtime", "cuda_driver", "runtime", "cuda_launch")
MAX_ANCHORS = 32  # kernel names tried as the layer boundary of an un-annotated trace


class NoKernelsError(ConfigError):
    """The trace has no device-kernel events."""


@attrs.frozen
class Kernel:
    """One device kernel: name, stream (trace ``tid``), start and duration (µs), launch time."""

    name: str
    stream: int | str
    start_us: float
    dur_us: float
    correlation: Any = None

    @property
    def end_us(self) -> float:
        return self.start_us + self.dur_us


@attrs.frozen
class Annotation:
    """A user annotation (``record_function``) from ``start_us`` to ``end_us``; ``gpu``: on the
    device timeline (``gpu_user_annotation``), else on the host's."""

    name: str
    start_us: float
    end_us: float
    gpu: bool = False


@attrs.frozen
class KernelTrace:
    """The kernels (by start time), annotations and launch times of one trace."""

    kernels: tuple[Kernel, ...]
    annotations: tuple[Annotation, ...] = ()
    launches: Mapping[Any, float] = attrs.field(factory=dict, repr=False)
    device: str = ""


def _number(event: Mapping[str, Any], key: str, index: int, path: Any) -> float:
    value = event.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"'{path}' event #{index} ({str(event.get('name', ''))[:60]!r}): {key!r} "
                          f"must be a finite number (got {value!r})")
    if key == "dur" and value < 0:
        raise ConfigError(f"'{path}' event #{index} ({str(event.get('name', ''))[:60]!r}): 'dur' "
                          f"must be >= 0 (got {value!r})")
    return float(value)


def read_kernel_trace(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> KernelTrace:
    """The device kernels of the trace at ``path`` (plain or gzip JSON), parsed as a stream.

    Raises :class:`ConfigError` when the file has no kernel events (``cat == "kernel"``).
    """
    from overlap.cost.trace_json import MAX_BYTES, iter_events

    kernels: list[Kernel] = []
    annotations: list[Annotation] = []
    launches: dict[Any, float] = {}
    names: dict[str, str] = {}  # one string object per distinct kernel name
    device = ""
    for i, event in enumerate(iter_events(path, max_bytes=max_bytes or MAX_BYTES)):
        if not isinstance(event, dict):
            continue
        cat, ph = event.get("cat"), event.get("ph")
        if ph != "X":
            if ph == "M" and event.get("name") == "process_labels" and not device:
                args = event.get("args")
                label = args.get("labels") if isinstance(args, dict) else None
                device = label if isinstance(label, str) and label.startswith("GPU") else ""
            continue
        args = event.get("args") if isinstance(event.get("args"), dict) else {}
        if cat == "kernel":
            name = str(event.get("name", ""))
            name = names.setdefault(name, name)
            stream = event.get("tid", args.get("stream", 0))
            if not isinstance(stream, (int, str)) or isinstance(stream, bool):
                stream = str(stream)
            kernels.append(Kernel(name, stream, _number(event, "ts", i, path),
                                  _number(event, "dur", i, path), args.get("correlation")))
        elif cat in ("user_annotation", "gpu_user_annotation"):
            start = _number(event, "ts", i, path)
            annotations.append(Annotation(str(event.get("name", "")), start,
                                          start + _number(event, "dur", i, path),
                                          gpu=cat == "gpu_user_annotation"))
        elif cat in RUNTIME_CATS and "correlation" in args:
            corr = args["correlation"]
            if isinstance(corr, (int, str)) and not isinstance(corr, bool):
                launches[corr] = _number(event, "ts", i, path)
    if not kernels:
        raise NoKernelsError(f"no device kernels (events with cat 'kernel') in '{path}'")
    kernels.sort(key=lambda k: (k.start_us, str(k.stream)))
    annotations.sort(key=lambda a: (a.start_us, -a.end_us))
    return KernelTrace(tuple(kernels), tuple(annotations), launches, device)


# -- the kernel table -----------------------------------------------------------------------------


@attrs.frozen
class KernelRule:
    """Kernels whose name matches ``match`` (a regex, searched) are ``op`` with ``role``.

    op:      the graph op the kernel's time belongs to; None: known but not in the graph (for
             example training's backward pass), reported as unmodelled under ``role``.
    kind:    compute | comm | notify (DeepEP's notify/barrier kernels: comm-stream time that is
             latency, not bytes).
    segment: a regex the kernel's segment (annotation) name must match; None: any.
    nth:     only the n-th kernel (from 0) matching ``match`` inside one segment occurrence.
    """

    match: str
    op: str | None
    role: str
    kind: str = attrs.field(default="compute", validator=attrs.validators.in_(RULE_KINDS))
    segment: str | None = None
    nth: int | None = None
    pattern: re.Pattern[str] = attrs.field(init=False, repr=False, eq=False)
    segment_pattern: re.Pattern[str] | None = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        try:
            object.__setattr__(self, "pattern", re.compile(self.match))
            object.__setattr__(self, "segment_pattern",
                               re.compile(self.segment) if self.segment is not None else None)
        except re.error as exc:
            raise ConfigError(f"kernel rule {self.match!r}: bad regex: {exc}") from None


@attrs.frozen
class KernelTable:
    """Ordered rules; the first rule that matches a kernel names it."""

    name: str
    rules: tuple[KernelRule, ...] = attrs.field(converter=tuple)
    source: str = ""

    def extended(self, other: KernelTable) -> KernelTable:
        """``other``'s rules in front of these (a user file overrides the shipped table)."""
        return KernelTable(f"{other.name}+{self.name}", (*other.rules, *self.rules), self.source)


RULE_KEYS = ("match", "op", "role", "kind", "segment", "nth")


def table_from_dict(data: Any, where: str = "kernel table") -> KernelTable:
    """A :class:`KernelTable` from ``{"name": ..., "rules": [{"match": ..., "op": ..., ...}]}``."""
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
        raise ConfigError(f"{where}: expected an object with a 'rules' list")
    rules = []
    for k, rule in enumerate(data["rules"]):
        if not isinstance(rule, dict) or not isinstance(rule.get("match"), str):
            raise ConfigError(f"{where}: rule #{k} must be an object with a 'match' regex")
        unknown = sorted(set(rule) - set(RULE_KEYS))
        if unknown:
            raise ConfigError(f"{where}: rule #{k} has unknown key(s) {unknown}; valid: "
                              f"{', '.join(RULE_KEYS)}")
        op, nth = rule.get("op"), rule.get("nth")
        if op is not None and not isinstance(op, str):
            raise ConfigError(f"{where}: rule #{k}: 'op' must be a string or null (got {op!r})")
        if nth is not None and (isinstance(nth, bool) or not isinstance(nth, int) or nth < 0):
            raise ConfigError(f"{where}: rule #{k}: 'nth' must be an integer >= 0 (got {nth!r})")
        kind = rule.get("kind", "compute")
        if kind not in RULE_KINDS:
            raise ConfigError(f"{where}: rule #{k}: 'kind' must be one of {', '.join(RULE_KINDS)} "
                              f"(got {kind!r})")
        segment = rule.get("segment")
        if segment is not None and not isinstance(segment, str):
            raise ConfigError(f"{where}: rule #{k}: 'segment' must be a regex string")
        rules.append(KernelRule(rule["match"], op, str(rule.get("role", op or "unmodelled")), kind,
                                segment, nth))
    return KernelTable(str(data.get("name", where)), rules, str(data.get("source", "")))


def load_kernel_table(path: str | os.PathLike[str]) -> KernelTable:
    """A user kernel table (JSON, the schema of :func:`table_from_dict`)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read kernel table '{path}': {exc.strerror}") from None
    except (json.JSONDecodeError, RecursionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"kernel table '{path}' is not valid JSON: {exc}") from None
    return table_from_dict(data, f"kernel table '{path}'")


def _deepseek_rules() -> list[dict[str, Any]]:
    fwd_attn, fwd_mlp, layer = r"^attn\(F\)$", r"^mlp\(F\)$", r"^layer$"
    gemm = r"cuda::fp8_ptp128c::GemmKernel"  # dense DeepGEMM (not m_grouped_fp8_ptp128c)
    transpose = r"grouped_gemm::cuda::utils::transpose"  # its scale transposes
    cast = r"per_token_cast_to_fp8_with_channels"
    rules: list[dict[str, Any]] = [
        # Training's backward (B) and weight-gradient (W) chunks have no inference op.
        {"match": ".", "segment": r"\((B|W)\)$", "op": None, "role": "backward"},
        # DeepEP normal kernels (internode: RDMA + NVLink forwarding), on the comm stream.
        {"match": r"ep::internode::dispatch<|ep::intranode::dispatch<", "op": "dispatch",
         "role": "dispatch", "kind": "comm"},
        {"match": r"ep::internode::combine<|ep::intranode::combine<", "op": "combine",
         "role": "combine", "kind": "comm"},
        {"match": r"notify_dispatch|get_dispatch_layout", "op": "dispatch", "role": "notify",
         "kind": "notify"},
        {"match": r"cached_notify|notify_combine", "op": "combine", "role": "notify", "kind": "notify"},
        # DeepEP low-latency kernels (decode).
        {"match": r"ep::internode_ll::dispatch|low_latency_dispatch", "op": "dispatch",
         "role": "dispatch", "kind": "comm"},
        {"match": r"ep::internode_ll::combine|low_latency_combine", "op": "combine",
         "role": "combine", "kind": "comm"},
        {"match": r"barrier|clean_low_latency", "op": None, "role": "notify", "kind": "notify"},
        # Attention: FlashAttention-3 forward (prefill / training), FlashMLA (decode).
        {"match": r"flash::compute_attn|flash_fwd|FlashAttnFwd|flash_mla|flashmla", "op": "core_attn",
         "role": "core_attn"},
        # MoE permute (index building, rows into expert order, their scales' transpose) and
        # unpermute (the weighted sum back) around the grouped GEMMs.
        {"match": r"expand_to_fused|get_fused_mapping|clean_and_count_expert|moe_permute",
         "op": "permute", "role": "permute"},
        {"match": r"reduce_fused|moe_unpermute", "op": "unpermute", "role": "permute"},
        {"match": r"m_grouped_fp8|m_grouped_gemm|grouped_gemm.*masked", "op": "experts",
         "role": "gemm"},
        # SwiGLU with the down projection's FP8 cast fused in: the FFN's own activation kernel.
        {"match": r"swiglu_forward_with_weight_and_per_token_cast_to_fp8_with_channels_impl"
                  r"<__nv_bfloat16, true", "op": "experts", "role": "activation"},
        {"match": r"swiglu_forward_with_weight_and_per_token_cast", "op": "shared",
         "role": "activation"},
        *({"match": r"batched_transpose", "segment": fwd_mlp, "nth": n, "op": op, "role": role}
          for n, (op, role) in enumerate((("permute", "permute"), ("experts", "fp8_cast")))),
        *({"match": r"direct_copy_kernel", "segment": fwd_mlp, "nth": n, "op": op,
           "role": "elementwise"} for n, op in enumerate(("permute", "experts"))),
        {"match": r"fill_tensormaps", "segment": fwd_mlp, "op": "experts", "role": "gemm"},
        # The dense fp8 GEMMs of a forward attention block, in launch order.
        *({"match": gemm, "segment": fwd_attn, "nth": n, "op": op, "role": "gemm"}
          for n, op in enumerate(("q_a", "kv_a", "q_b", "kv_b", "o_proj"))),
        *({"match": gemm, "segment": fwd_mlp, "nth": n, "op": op, "role": "gemm"}
          for n, op in enumerate(("shared", "shared"))),
        # Without annotations: the same GEMMs in one layer's order (attention, then shared).
        *({"match": gemm, "segment": layer, "nth": n, "op": op, "role": "gemm"}
          for n, op in enumerate(("q_a", "kv_a", "q_b", "kv_b", "o_proj", "shared", "shared"))),
        # FP8 activation casts (and DeepGEMM's transpose of their scales) before each GEMM, in
        # launch order; the last cast of attention quantises the FFN input (dispatch + shared).
        *({"match": cast, "segment": fwd_attn, "nth": n, "op": op, "role": "fp8_cast"}
          for n, op in enumerate(("q_a_quant", "kv_a_quant", "q_b_quant", "kv_b_quant",
                                  "o_proj_quant", "ffn_quant"))),
        *({"match": transpose, "segment": fwd_attn, "nth": n, "op": op, "role": "fp8_cast"}
          for n, op in enumerate(("q_a_quant", "kv_a_quant", "q_b_quant", "kv_b_quant",
                                  "o_proj_quant"))),
        {"match": transpose, "segment": fwd_mlp, "op": "shared", "role": "fp8_cast"},
        # Training only (DeepSeek-V3 report, 3.3.3): the attention output cached for the backward
        # pass in E5M6, and the SwiGLU inputs cached in FP8 (the casts after the shared experts'
        # down GEMM); inference has no such casts, so no op.
        {"match": r"per_token_cast_to_fp8_with_fp8_special_fmt", "op": None,
         "role": "fp8_cache"},
        {"match": cast, "segment": fwd_mlp, "op": None, "role": "fp8_cache"},
        {"match": r"cast_back|per_channel_cast|per_token_cast", "op": None, "role": "fp8_cast"},
        # Router: bf16 GEMM (cuBLAS sm90_xmma), sigmoid, top-k.
        {"match": r"sm90_xmma_gemm_bf16|cutlass.*bf16.*gemm|gemm_bf16", "segment": fwd_attn,
         "op": "gate", "role": "gemm"},
        {"match": r"topk|TopK|sigmoid|unique_group_indices|aux_fi|scatter_gather|masked_fill"
                  r"|DistributionNormal|reduce_kernel|FillFunctor|BUnaryFunctor|CUDAFunctorOnSelf"
                  r"|arange", "segment": fwd_attn, "op": "gate", "role": "routing"},
        # Norms, rotary embedding, copies (KV cache layout) and other elementwise kernels.
        {"match": r"layer_norm::ln_fwd|rms_?norm|RMSNorm", "segment": fwd_attn, "nth": 0,
         "op": "input_norm", "role": "norm"},
        {"match": r"layer_norm::ln_fwd|rms_?norm|RMSNorm", "segment": fwd_attn, "nth": 1,
         "op": "q_norm", "role": "norm"},
        {"match": r"layer_norm::ln_fwd|rms_?norm|RMSNorm", "segment": fwd_attn, "nth": 2,
         "op": "kv_prep", "role": "norm"},
        {"match": r"layer_norm::ln_fwd|rms_?norm|RMSNorm", "segment": fwd_attn, "nth": 3,
         "op": "gate", "role": "norm"},
        {"match": r"rotary", "nth": 0, "segment": fwd_attn, "op": "kv_prep", "role": "rope"},
        {"match": r"rotary", "segment": fwd_attn, "op": "q_rope", "role": "rope"},
        # The naive prefill form's per-head keys (nope | rope, one copy kernel) and values (made
        # contiguous: the 3rd copy of the block); the small copies lay out the latent cache.
        {"match": r"_copy_tensor_kernel", "segment": fwd_attn, "op": "kv_expand",
         "role": "elementwise"},
        {"match": r"direct_copy_kernel", "segment": fwd_attn, "nth": 2, "op": "kv_expand",
         "role": "elementwise"},
        {"match": r"direct_copy_kernel", "segment": fwd_attn, "op": "kv_prep",
         "role": "elementwise"},
        {"match": r"elementwise|vectorized|unrolled|CUDAFunctor", "segment": fwd_attn,
         "op": "o_proj", "role": "elementwise"},
        {"match": r"elementwise|vectorized|unrolled", "segment": fwd_mlp, "op": "experts",
         "role": "elementwise"},
    ]
    return rules


DEEPSEEK_H800 = table_from_dict({
    "name": "deepseek-h800",
    "source": "kernel names of deepseek-ai/profile-data train.json (H800, EP64, DeepGEMM FP8, "
              "FlashAttention-3, DeepEP normal kernels), plus DeepEP low-latency and FlashMLA names",
    "rules": _deepseek_rules(),
})


# -- segmenting and mapping -----------------------------------------------------------------------


def _annotation_segments(trace: KernelTrace) -> list[str | None] | None:
    """The innermost annotation name around each kernel's launch (or run, for GPU annotations);
    None when the trace has no annotation that contains any kernel."""
    host = [a for a in trace.annotations if not a.gpu]
    gpu = [a for a in trace.annotations if a.gpu]
    use_host = bool(host) and any(k.correlation in trace.launches for k in trace.kernels)
    chosen = host if use_host else gpu
    if not chosen:
        return None
    # Innermost containing annotation: among those starting before t, the latest-starting one
    # that still contains t (annotations nest, so a linear scan back is short in practice).
    starts = [a.start_us for a in chosen]
    out: list[str | None] = []
    for k in trace.kernels:
        t = trace.launches.get(k.correlation) if use_host else k.start_us
        name = None
        if t is not None:
            j = bisect.bisect_right(starts, t) - 1
            steps = 0
            while j >= 0 and steps < 64:
                a = chosen[j]
                if a.start_us <= t <= a.end_us and not _wrapper(a.name):
                    name = a.name
                    break
                j, steps = j - 1, steps + 1
        out.append(name)
    return out if any(n is not None for n in out) else None


def _wrapper(name: str) -> bool:
    """Annotations that wrap a whole step (the profiler's own), never a layer's op."""
    return name.startswith("ProfilerStep#") or name in ("1F1B", "forward", "backward", "step")


def _periodic_segments(trace: KernelTrace, layers: int, compute: set[Any]) -> list[int | None]:
    """Layer index of each kernel, cutting the compute stream at a kernel that repeats once (or
    n times) per layer, chosen so the periods are as alike as possible; kernels before the first
    cut (and comm kernels that start before it) are None."""
    seq = [k for k in trace.kernels if k.stream in compute]
    names = [k.name for k in seq]
    positions: dict[str, list[int]] = defaultdict(list)
    for p, name in enumerate(names):
        positions[name].append(p)
    # Candidates: names repeating a multiple of ``layers`` times, earliest first; a few suffice
    # (the first kernel of a layer is among the earliest), and each costs one pass.
    candidates = sorted((pos for pos in positions.values() if len(pos) % layers == 0),
                        key=lambda pos: pos[0])[:MAX_ANCHORS]
    best: tuple[float, int, list[int]] | None = None
    for pos in candidates:
        where = pos[::len(pos) // layers]
        periods = [tuple(names[a:b]) for a, b in zip(where, [*where[1:], len(names)])]
        alike = Counter(periods).most_common(1)[0][1] / layers
        score = (alike, -where[0])
        if best is None or score > best[:2]:
            best = (alike, -where[0], where)
    if best is None:
        raise ConfigError(f"cannot segment the trace into {layers} layers: no kernel on the compute "
                          f"stream repeats a multiple of {layers} times")
    cuts = [seq[p].start_us for p in best[2]]
    return [None if k.start_us < cuts[0] else bisect.bisect_right(cuts, k.start_us) - 1
            for k in trace.kernels]


@attrs.frozen
class MappedKernel:
    """A kernel with its segment, layer and what the table says it is (op None: unmodelled)."""

    kernel: Kernel
    segment: str | None
    layer: int | None
    op: str | None
    role: str
    kind: str


@attrs.frozen
class KernelProfile:
    """A trace's kernels mapped onto a layer's ops.

    kernels:        every kernel, in start order, with its mapping.
    compute_streams / comm_streams: stream ids by what mostly runs on them, busiest first.
    layers:         the layer indices found.
    """

    kernels: tuple[MappedKernel, ...]
    compute_streams: tuple[Any, ...]
    comm_streams: tuple[Any, ...]
    layers: tuple[int, ...]
    table: str = ""
    device: str = ""

    def op_seconds(self, layers: Iterable[int] | None = None,
                   groups: Mapping[str, str] | None = None) -> dict[tuple[int, str], float]:
        """Summed kernel seconds per (layer, op) for the mapped kernels (of ``layers``);
        ``groups`` renames ops first (MLA's fine ops -> the graph's ``attn``, say)."""
        keep = None if layers is None else set(layers)
        groups = groups or {}
        out: dict[tuple[int, str], float] = defaultdict(float)
        for m in self.kernels:
            if m.op is not None and m.layer is not None and (keep is None or m.layer in keep):
                out[(m.layer, groups.get(m.op, m.op))] += m.kernel.dur_us * 1e-6
        return dict(out)

    def role_seconds(self, layers: Iterable[int] | None = None, *, modelled: bool = True
                     ) -> dict[str, float]:
        """Summed kernel seconds per role, per layer on average (of ``layers``); ``modelled``:
        only kernels mapped to an op."""
        keep = set(self.layers if layers is None else layers)
        out: dict[str, float] = defaultdict(float)
        for m in self.kernels:
            if m.layer in keep and (m.op is not None or not modelled):
                out[m.role] += m.kernel.dur_us * 1e-6
        return {r: s / max(len(keep), 1) for r, s in out.items()}

    def unmodelled(self) -> dict[str, float]:
        """Seconds of kernels no rule maps to an op, by role ("unmapped" for no rule at all)."""
        out: dict[str, float] = defaultdict(float)
        for m in self.kernels:
            if m.op is None:
                out[m.role] += m.kernel.dur_us * 1e-6
        return dict(out)

    def unmapped_names(self, limit: int = 8) -> list[tuple[str, float]]:
        """The kernel names with the most time that no rule matched (name, seconds)."""
        out: dict[str, float] = defaultdict(float)
        for m in self.kernels:
            if m.role == "unmapped":
                out[m.kernel.name] += m.kernel.dur_us * 1e-6
        return sorted(out.items(), key=lambda kv: -kv[1])[:limit]

    def measurements(self, layers: Iterable[int] | None = None,
                     groups: Mapping[str, str] | None = None) -> list[Any]:
        """One :class:`~overlap.cost.calibrate.Measurement` per (layer, op): its summed time."""
        from overlap.cost.calibrate import Measurement

        groups = groups or {}
        kinds = {groups.get(m.op, m.op): ("compute" if m.kind == "compute" else "comm")
                 for m in self.kernels if m.op}
        return [Measurement(op, seconds, kinds[op])
                for (_, op), seconds in sorted(self.op_seconds(layers, groups).items())]


def profile(trace: KernelTrace, table: KernelTable = DEEPSEEK_H800, *,
            layers: int | None = None) -> KernelProfile:
    """Map ``trace``'s kernels with ``table``. Segments come from the annotations; with none,
    ``layers`` (the number of layers the trace covers) is needed to cut the kernel sequence."""
    rules = table.rules
    by_name: dict[str, tuple[KernelRule, ...]] = {}  # regex results once per distinct name
    for k in trace.kernels:
        if k.name not in by_name:
            by_name[k.name] = tuple(r for r in rules if r.pattern.search(k.name))
    comm_time: dict[Any, float] = defaultdict(float)
    total: dict[Any, float] = defaultdict(float)
    for k in trace.kernels:  # streams by the segment-free rules' kinds
        total[k.stream] += k.dur_us
        plain = next((r for r in by_name[k.name] if r.segment is None and r.nth is None), None)
        if plain is not None and plain.kind != "compute":
            comm_time[k.stream] += k.dur_us
    # Busiest first: the main compute stream leads (its lanes come first in reports).
    comm = tuple(sorted((s for s in total if comm_time[s] > 0.5 * total[s]),
                        key=lambda s: (-total[s], str(s))))
    compute = tuple(sorted((s for s in total if s not in comm), key=lambda s: (-total[s], str(s))))

    segments: Sequence[str | None]
    layer_of: list[int | None]
    by_annotation = _annotation_segments(trace)
    if by_annotation is not None:
        # The k-th instance of an annotation name is layer k.
        host = any(not a.gpu for a in trace.annotations) and any(
            k.correlation in trace.launches for k in trace.kernels)
        starts: dict[str, list[float]] = defaultdict(list)
        for a in trace.annotations:
            if a.gpu != host:
                starts[a.name].append(a.start_us)
        layer_of = []
        for k, name in zip(trace.kernels, by_annotation):
            t = trace.launches.get(k.correlation) if host else k.start_us
            layer_of.append(None if name is None or t is None
                            else bisect.bisect_right(starts[name], t) - 1)
        segments = by_annotation
    else:
        if layers is None:
            raise ConfigError("the trace has no user annotations to find layers by; pass the "
                              "number of layers it covers (--layers N)")
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise ConfigError(f"'layers' must be an integer >= 1 (got {layers!r})")
        layer_of = _periodic_segments(trace, layers, set(compute))
        segments = ["layer" if lay is not None else None for lay in layer_of]

    counts: Counter[tuple[Any, ...]] = Counter()
    out = []
    for k, seg, lay in zip(trace.kernels, segments, layer_of):
        rule = None
        for r in by_name[k.name]:
            if r.segment_pattern is not None and (seg is None or not r.segment_pattern.search(seg)):
                continue
            if r.nth is not None and counts[(seg, lay, r.match, r.segment)] != r.nth:
                continue
            rule = r
            break
        _advance(counts, by_name[k.name], seg, lay)
        if rule is None:
            out.append(MappedKernel(k, seg, lay, None, "unmapped",
                                    "comm" if k.stream in comm else "compute"))
        else:
            out.append(MappedKernel(k, seg, lay, rule.op if lay is not None else None, rule.role,
                                    rule.kind))
    found = sorted({m.layer for m in out if m.layer is not None and m.op is not None})
    return KernelProfile(tuple(out), compute, comm, tuple(found), table.name, trace.device)


def _advance(counts: Counter, matching: Sequence[KernelRule], seg: str | None,
             lay: int | None) -> None:
    """Count a kernel once for every distinct (match, segment) of the nth-rules it matches."""
    done = set()
    for r in matching:
        key = (seg, lay, r.match, r.segment)
        if r.nth is None or key in done:
            continue
        if r.segment_pattern is not None and (seg is None or not r.segment_pattern.search(seg)):
            continue
        counts[key] += 1
        done.add(key)


def kernel_profile(path: str | os.PathLike[str], *, table: KernelTable | str | None = None,
                   layers: int | None = None) -> KernelProfile | None:
    """The :class:`KernelProfile` of the trace at ``path``; None when it has no kernels or none
    the table knows (an op-named trace)."""
    if isinstance(table, (str, os.PathLike)):
        table = DEEPSEEK_H800.extended(load_kernel_table(table))
    table = table or DEEPSEEK_H800
    try:
        trace = read_kernel_trace(path)
    except NoKernelsError:
        return None
    if not any(r.pattern.search(name) for name in {k.name for k in trace.kernels} for r in table.rules
               if r.match != "."):
        return None
    return profile(trace, table, layers=layers)


def describe(prof: KernelProfile) -> str:
    """Lines saying what the kernel trace held: streams, layers, and the unmodelled time."""
    total = sum(m.kernel.dur_us for m in prof.kernels) * 1e-6
    lines = [f"kernel trace ({prof.table}): {len(prof.kernels)} kernels, {total * 1e3:.2f} ms; "
             f"compute streams {', '.join(map(str, prof.compute_streams))}, comm streams "
             f"{', '.join(map(str, prof.comm_streams)) or 'none'}; layers {list(prof.layers)}"]
    unmodelled = prof.unmodelled()
    if unmodelled:
        parts = ", ".join(f"{role} {s * 1e3:.2f} ms" for role, s in
                          sorted(unmodelled.items(), key=lambda kv: -kv[1]))
        lines.append(f"unmodelled kernel time (no op in the graph): {parts}")
    for name, s in prof.unmapped_names(3):
        lines.append(f"  unmapped: {s * 1e3:.2f} ms {name[:100]}")
    return "\n".join(lines)


def profile_measurements(path: str | os.PathLike[str], *, table: KernelTable | str | None = None,
                         layers: int | None = None, groups: Mapping[str, str] | None = None
                         ) -> list[Any] | None:
    """Per-(layer, op) measurements of the kernel trace at ``path``; None when it has no
    kernels or none the table knows (then it is an op-named trace, read as such).

    table:  a :class:`KernelTable`, or the path of a user table whose rules go in front of the
            shipped DeepSeek/H800 one.
    groups: op renames applied before summing (e.g. MLA's fine ops -> ``attn``).
    """
    prof = kernel_profile(path, table=table, layers=layers)
    return None if prof is None else prof.measurements(groups=groups)

