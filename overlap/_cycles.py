"""Finding a cycle in a directed graph, for the checks that must name one (a graph's data
dependencies, a plan's waits, the waits of several ranks' plans together).

Iterative depth-first search: a cycle through thousands of nodes must not hit Python's recursion
limit.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

Node = TypeVar("Node", bound=Hashable)


def find_cycle(nodes: Iterable[Node], edges: Callable[[Node], Iterable[Node]]) -> list[Node] | None:
    """A cycle ``[a, b, ..., a]`` following ``edges`` (each step from a node to one of its
    edges), the first the search meets from ``nodes`` in order; None if there is none."""
    state: dict[Node, int] = {}  # 1 = on the path, 2 = done
    for root in nodes:
        if root in state:
            continue
        state[root] = 1
        stack = [(root, iter(edges(root)))]
        while stack:
            node, out = stack[-1]
            nxt = next(out, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                path = [n for n, _ in stack]
                return [*path[path.index(nxt):], nxt]
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(edges(nxt))))
    return None
