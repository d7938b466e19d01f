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

With ``hw.all_to_all_forwarding`` (DeepEP's normal kernels) and the op's
:class:`~overlap.ops_graph.op.Routing`, an expert all_to_all is priced as DeepEP moves it
(:func:`all_to_all_bytes`): a token crosses RDMA once per *remote destination node* (to the GPU
with the sender's local index there), which forwards it over NVLink once per destination *rank*
of that node (a rank holding several of its experts gets one copy). Both stages run at once, so
time is alpha + the longer one; combine is the mirror image (partial sums reduced per rank, then
per node) and moves the same bytes. Without routing, or with the switch off, every (token,
expert) copy travels on its own as above.

Bandwidths are the achievable ones (peak times ``*_link_efficiency``); alpha is
``intra_latency_s`` inside one node and ``inter_latency_s`` across nodes. ``mode="low_latency"``
models DeepEP's low-latency all-to-all (decode): alpha ``low_latency_s`` and bandwidth scaled by
``low_latency_bw_factor``.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

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


@attrs.frozen
class LinkBytes:
    """Bytes one rank moves in an all_to_all, per link class: ``intra`` over the scale-up link
    (NVLink / HCCS / UB), ``inter`` through its RDMA NIC."""

    intra: float
    inter: float


def _miss(pool: float, block: float, draws: int) -> float:
    """Probability that ``draws`` picks without replacement from ``pool`` items all avoid a
    given ``block`` of them (real-valued sizes: an uneven split is priced by its averages)."""
    p = 1.0
    for i in range(draws):
        if pool - i <= 0:
            return 0.0
        p *= max(pool - block - i, 0.0) / (pool - i)
    return p


def fanout(routing: Any, group_size: int, devices_per_node: int) -> tuple[float, float]:
    """Expected distinct destination (nodes, ranks) of one token under ``routing``.

    Experts sit in contiguous blocks of ``experts / group_size`` per rank, ranks in contiguous
    blocks per node. Without a group limit a token's ``topk`` experts are uniform over all of
    them. With one (``max_groups < groups``), they lie in ``max_groups`` groups chosen uniformly,
    each chosen group holding at least one of them (DeepSeek ranks groups by their best
    experts' scores, so a chosen group is almost never left empty: a simulation of DeepEP's own
    test routing at EP64 gives 3.98 nodes of 4), and are uniform inside the chosen groups.
    """
    k, experts = routing.topk, routing.experts
    n = group_size
    nodes = math.ceil(n / devices_per_node)
    per_rank, per_node = experts / n, experts / nodes
    limited = routing.max_groups < routing.groups
    pool = experts * routing.max_groups / routing.groups if limited else experts
    ranks_hit = pool / per_rank * (1.0 - _miss(pool, per_rank, k))
    if not limited:
        nodes_hit = nodes * (1.0 - _miss(experts, per_node, k))
    elif routing.groups % nodes == 0:  # each node holds whole groups
        g = routing.groups
        nodes_hit = nodes * (1.0 - _miss(g, g / nodes, routing.max_groups))
    else:  # groups span several nodes: uniform over the chosen groups' nodes
        nodes_hit = pool / per_node * (1.0 - _miss(pool, per_node, k))
    return min(nodes_hit, nodes, k), min(ranks_hit, n, k)


def all_to_all_bytes(comm_bytes: float, group_size: int, hw: Hardware,
                     routing: Any = None) -> LinkBytes:
    """Per link class, the bytes one rank moves in an all_to_all whose send buffer counts
    ``comm_bytes`` (see the module doc): plain pairwise exchange, or with ``routing`` and
    ``hw.all_to_all_forwarding`` DeepEP's once-per-node RDMA send plus NVLink forwarding."""
    n = group_size
    nodes = math.ceil(n / hw.devices_per_node)
    per_node = n // nodes
    if routing is None or not hw.all_to_all_forwarding:
        return LinkBytes(comm_bytes * (per_node - 1) / n, comm_bytes * (n - per_node) / n)
    token = comm_bytes / routing.topk  # one copy of each token's payload
    nodes_hit, ranks_hit = fanout(routing, n, hw.devices_per_node)
    # The sender's own node is one of the token's nodes with probability nodes_hit / nodes
    # (routing is symmetric over nodes); the forwarder is the destination itself for 1 in
    # per_node of the (token, rank) copies, which then never touch NVLink.
    return LinkBytes(token * ranks_hit * (per_node - 1) / per_node,
                     token * nodes_hit * (nodes - 1) / nodes)


def collective_time(
    collective: Any,
    comm_bytes: float,
    group_size: int,
    hw: Hardware,
    *,
    mode: str = "normal",
    routing: Any = None,
) -> float:
    """Seconds one rank spends in ``collective`` putting ``comm_bytes`` into a group of
    ``group_size`` ranks on ``hw`` (0 for a group of one: nothing moves). ``routing`` (an
    :class:`~overlap.ops_graph.op.Routing`) prices a normal-mode expert all_to_all with node
    deduplication where ``hw.all_to_all_forwarding`` is on."""
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
        # Low-latency kernels send every (token, expert) copy straight over RDMA: no forwarding.
        moved = all_to_all_bytes(comm_bytes, n, hw, routing if mode == "normal" else None)
        return alpha + max(moved.intra / intra_bw, moved.inter / inter_bw)

    wire_bytes = {
        "all_reduce": 2 * (n - 1) / n * comm_bytes,
        "reduce_scatter": (n - 1) / n * comm_bytes,
        "all_gather": (n - 1) * comm_bytes,
    }[name]
    bandwidth = intra_bw if nodes == 1 else min(intra_bw, per_node * inter_bw)
    return alpha + wire_bytes / bandwidth
