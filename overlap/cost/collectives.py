"""Alpha-beta time of a collective: a fixed latency plus bytes over the bottleneck link.

Communication is what microbatch overlap hides, so its duration decides which schedule wins.
Each collective costs ``alpha + bytes_on_bottleneck / achievable_bandwidth``, where the bytes
follow the classic ring / pairwise algorithms (``S`` is the op's ``comm_bytes`` as defined on
:class:`~overlap.ops_graph.cost.CostFigures`, ``n`` the group size):

    all_reduce       2(n-1)/n * S      (S: the buffer)
    reduce_scatter    (n-1)/n * S      (S: the full input)
    all_gather        (n-1)   * S      (S: the local shard; the output is n*S)
    all_to_all        (n-1)/n * S      (S: the send buffer; 1/n of it stays on the rank)

Topology: ranks spread evenly over ``k = ceil(n / devices_per_node)`` nodes, so a node holds
``m = n // k`` of them (the least-populated node, whose ranks have the most off-node traffic).

* all_to_all: ``(m-1)/n * S`` goes over the scale-up link and ``(n-m)/n * S`` over the rank's
  own RDMA NIC; the two run at once, so time is the larger of the two transfers.
* ring collectives spanning nodes: every ring crosses each node boundary once and the node's
  ``m`` NICs carry the rings in parallel, so the bottleneck bandwidth is
  ``min(intra, m * inter)`` per rank.

Bandwidths are the achievable ones (peak times ``*_link_efficiency``); alpha is
``intra_latency_s`` inside one node and ``inter_latency_s`` across nodes. ``mode="low_latency"``
models DeepEP's low-latency all-to-all (decode): alpha ``low_latency_s`` and bandwidth scaled by
``low_latency_bw_factor``.
"""

from __future__ import annotations

import math
from typing import Any

from overlap.cost.hardware import Hardware
from overlap.errors import ConfigError

COLLECTIVES = ("all_to_all", "all_gather", "reduce_scatter", "all_reduce")
MODES = ("normal", "low_latency")


def collective_name(collective: Any) -> str:
    """The collective's string name; accepts ``overlap.ops_graph.Collective`` or a string."""
    name = str(getattr(collective, "value", collective)).lower()
    if name not in COLLECTIVES:
        raise ConfigError(f"unknown collective {name!r}; valid: {', '.join(COLLECTIVES)}")
    return name


def collective_time(
    collective: Any,
    comm_bytes: float,
    group_size: int,
    hw: Hardware,
    *,
    mode: str = "normal",
) -> float:
    """Seconds one rank spends in ``collective`` putting ``comm_bytes`` into a group of
    ``group_size`` ranks on ``hw`` (0 for a group of one: nothing moves)."""
    name = collective_name(collective)
    if not (isinstance(comm_bytes, (int, float)) and math.isfinite(comm_bytes) and comm_bytes >= 0):
        raise ConfigError(f"'comm_bytes' must be >= 0 (got {comm_bytes!r})")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ConfigError(f"'group_size' must be >= 1 (got {group_size!r})")
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    if mode == "low_latency" and name != "all_to_all":
        raise ConfigError(f"mode 'low_latency' applies only to all_to_all (got {name!r})")
    n = group_size
    if n == 1:
        return 0.0
    comm_bytes *= hw.comm_bytes_factor  # calibration's correction of the bytes model (default 1)

    nodes = math.ceil(n / hw.devices_per_node)
    per_node = n // nodes
    intra_bw = hw.intra_link_gbps * 1e9 * hw.intra_link_efficiency
    inter_bw = hw.inter_link_gbps * 1e9 * hw.inter_link_efficiency
    if mode == "low_latency":
        alpha = hw.low_latency_s
        intra_bw *= hw.low_latency_bw_factor
        inter_bw *= hw.low_latency_bw_factor
    else:
        alpha = hw.inter_latency_s if nodes > 1 else hw.intra_latency_s

    if name == "all_to_all":
        intra_s = comm_bytes * (per_node - 1) / n / intra_bw
        inter_s = comm_bytes * (n - per_node) / n / inter_bw
        return alpha + max(intra_s, inter_s)

    wire_bytes = {
        "all_reduce": 2 * (n - 1) / n * comm_bytes,
        "reduce_scatter": (n - 1) / n * comm_bytes,
        "all_gather": (n - 1) * comm_bytes,
    }[name]
    bandwidth = intra_bw if nodes == 1 else min(intra_bw, per_node * inter_bw)
    return alpha + wire_bytes / bandwidth
