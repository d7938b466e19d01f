"""Collective alpha-beta times: known values by hand, topology, modes, and the DeepEP check."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlap.cost import COLLECTIVES, HARDWARE, collective_time
from overlap.errors import ConfigError
from overlap.ops_graph import Collective

# Round numbers: 100 GB/s inside a node of 8, 10 GB/s per NIC, links at full efficiency.
HW = HARDWARE["h800"].evolve(
    intra_link_gbps=100.0,
    inter_link_gbps=10.0,
    intra_link_efficiency=1.0,
    inter_link_efficiency=1.0,
    devices_per_node=8,
    intra_latency_s=1e-5,
    inter_latency_s=2e-5,
    low_latency_s=5e-6,
    low_latency_bw_factor=0.5,
)


@pytest.mark.parametrize(
    ("collective", "comm_bytes", "n", "expected"),
    [
        ("all_reduce", 1e9, 8, 1e-5 + 2 * 7 / 8 * 1e9 / 100e9),
        ("reduce_scatter", 8e8, 8, 1e-5 + 7 / 8 * 8e8 / 100e9),
        ("all_gather", 1e8, 4, 1e-5 + 3 * 1e8 / 100e9),
        ("all_to_all", 8e8, 8, 1e-5 + 7 / 8 * 8e8 / 100e9),
    ],
)
def test_single_node_known_values(collective, comm_bytes, n, expected):
    """Inside one node each collective moves its ring/pairwise share over the scale-up link."""
    assert collective_time(collective, comm_bytes, n, HW) == pytest.approx(expected)


def test_all_to_all_across_nodes_is_bound_by_the_nic():
    """With 16 ranks on 2 nodes, half the send buffer leaves the node over a 10 GB/s NIC."""
    # intra: 7/16 * 1.6e9 / 100e9 = 0.007 s; inter: 8/16 * 1.6e9 / 10e9 = 0.08 s
    assert collective_time("all_to_all", 1.6e9, 16, HW) == pytest.approx(2e-5 + 0.08)


def test_ring_across_nodes_uses_all_nics_of_a_node():
    """A 2-node all-reduce runs at min(intra, 8 NICs * 10 GB/s) = 80 GB/s per rank."""
    expected = 2e-5 + 2 * 15 / 16 * 1e9 / 80e9
    assert collective_time("all_reduce", 1e9, 16, HW) == pytest.approx(expected)


def test_low_latency_mode_trades_bandwidth_for_latency():
    """Low-latency all-to-all has its own alpha and scaled-down bandwidth."""
    assert collective_time("all_to_all", 1.6e9, 16, HW, mode="low_latency") == pytest.approx(
        5e-6 + 0.08 / 0.5
    )
    small = 1e4
    assert collective_time("all_to_all", small, 16, HW, mode="low_latency") < collective_time(
        "all_to_all", small, 16, HW
    )


def test_group_of_one_is_free():
    """A single-rank group moves nothing and waits for nobody."""
    assert collective_time("all_reduce", 1e9, 1, HW) == 0.0


def test_enum_and_string_are_the_same_collective():
    """The ops_graph Collective enum is accepted as well as its string value."""
    assert collective_time(Collective.ALL_GATHER, 1e6, 8, HW) == collective_time("all_gather", 1e6, 8, HW)


def test_unknown_collective_lists_valid_ones():
    """A misspelt collective names every valid one."""
    message = "unknown collective 'alltoall'; valid: all_to_all, all_gather, reduce_scatter, all_reduce"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        collective_time("alltoall", 1.0, 8, HW)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"group_size": 0}, "'group_size' must be >= 1 (got 0)"),
        ({"comm_bytes": -1.0}, "'comm_bytes' must be >= 0 (got -1.0)"),
        ({"mode": "fast"}, "unknown mode 'fast'; valid: normal, low_latency"),
        (
            {"collective": "all_reduce", "mode": "low_latency"},
            "mode 'low_latency' applies only to all_to_all (got 'all_reduce')",
        ),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    """Each bad argument is reported by name with the value given."""
    args = {"collective": "all_to_all", "comm_bytes": 1.0, "group_size": 8, **kwargs}
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        collective_time(args.pop("collective"), args.pop("comm_bytes"), args.pop("group_size"), HW, **args)


presets = st.sampled_from(sorted(HARDWARE))
collectives = st.sampled_from(COLLECTIVES)


@given(
    name=presets,
    collective=collectives,
    size=st.floats(0, 1e10),
    extra=st.floats(0, 1e10),
    n=st.integers(1, 1024),
)
def test_more_bytes_is_never_faster(name, collective, size, extra, n):
    """Adding bytes to a collective never shortens it."""
    hw = HARDWARE[name]
    assert collective_time(collective, size + extra, n, hw) >= collective_time(collective, size, n, hw)


@given(name=presets, collective=collectives, size=st.floats(1, 1e10), n=st.integers(2, 1024))
def test_time_beyond_latency_is_linear_in_bytes(name, collective, size, n):
    """Doubling the bytes doubles the bandwidth term: the model is alpha + bytes / bandwidth."""
    hw = HARDWARE[name]
    alpha = collective_time(collective, 0.0, n, hw)
    once, twice = collective_time(collective, size, n, hw), collective_time(collective, 2 * size, n, hw)
    assert twice - alpha == pytest.approx(2 * (once - alpha), rel=1e-9)


@given(name=presets, collective=collectives, size=st.floats(1, 1e10), data=st.data())
def test_larger_group_is_never_cheaper(name, collective, size, data):
    """Within a node, and across whole nodes, adding ranks never makes a collective cheaper."""
    hw = HARDWARE[name].evolve(devices_per_node=8)
    sizes = [*range(1, 9), *range(16, 129, 8)]
    small = data.draw(st.sampled_from(sizes[:-1]))
    large = data.draw(st.sampled_from([s for s in sizes if s > small]))
    assert collective_time(collective, size, large, hw) >= collective_time(collective, size, small, hw)


def _deepep_normal_bandwidth(ep: int) -> float:
    """DeepEP's normal-mode 'bottleneck bandwidth' predicted on the h800 preset, in GB/s."""
    tokens, hidden, topk, experts = 4096, 7168, 8, 256
    per_rank = experts // ep  # a token goes once to each rank holding one of its experts
    ranks_hit = ep * (1 - math.comb(experts - per_rank, topk) / math.comb(experts, topk))
    send = tokens * ranks_hit * hidden * (1 + 4 / 128)  # FP8 payload plus per-128 scales
    seconds = collective_time("all_to_all", send, ep, HARDWARE["h800"])
    on_bottleneck = send * (7 / 8 if ep == 8 else (ep - 8) / ep)
    return on_bottleneck / seconds / 1e9


@pytest.mark.parametrize(("ep", "published"), [(8, 153), (16, 43), (32, 58), (64, 51)])
def test_h800_normal_mode_matches_deepep_within_25_percent(ep, published):
    """The h800 preset predicts DeepEP's published normal-mode dispatch bandwidths."""
    assert _deepep_normal_bandwidth(ep) == pytest.approx(published, rel=0.25)


@pytest.mark.parametrize(("ep", "published_us"), [(8, 77), (16, 118), (32, 155), (128, 192)])
def test_h800_low_latency_dispatch_matches_deepep_within_25_percent(ep, published_us):
    """The h800 preset predicts DeepEP's published low-latency dispatch latencies."""
    send = 128 * 8 * (7168 + 7168 // 128 * 4 + 16)  # every (token, expert) pair, FP8 + scales
    seconds = collective_time("all_to_all", send, ep, HARDWARE["h800"], mode="low_latency")
    assert seconds * 1e6 == pytest.approx(published_us, rel=0.25)
