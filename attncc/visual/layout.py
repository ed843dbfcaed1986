"""Layered layout of a small DAG (a site's subgraph): data flows top to bottom, one row per step.

Each node goes as low as its users allow (the row above its first user, counted with networkx's topological sort
from the bottom), so a value sits next to where it is used: v's reshapes beside the softmax, just above the
product with v, not beside q. Within a row, nodes are ordered by the mean position of their
neighbours in the row above and below (the barycenter heuristic), which removes most edge crossings of graphs this
size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable

import networkx as nx

ROW_GAP = 34
"""Vertical space between rows (px), where the edges run."""
NODE_GAP = 14
"""Horizontal space between two boxes of a row (px)."""
MARGIN = 10
SWEEPS = 4


@dataclass(frozen=True)
class Box:
    """A node's box: center ``(x, y)`` and size, in px."""

    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Layout:
    """Where each node's box goes, and the size of the whole drawing (px)."""

    boxes: dict[Hashable, Box]
    width: float
    height: float


def layered_layout(graph: nx.DiGraph, size: Callable[[Hashable], tuple[float, float]]) -> Layout:
    """Boxes for the nodes of the DAG ``graph``; ``size(node) -> (width, height)`` of each node's box."""
    if graph.number_of_nodes() == 0:
        return Layout({}, 2 * MARGIN, 2 * MARGIN)
    rows = _ordered_rows(graph, _rows(graph))
    sizes = {node: size(node) for node in graph}
    row_widths = [sum(sizes[n][0] for n in row) + NODE_GAP * (len(row) - 1) for row in rows]
    width = max(row_widths) + 2 * MARGIN
    boxes: dict[Hashable, Box] = {}
    y = MARGIN
    for row, row_width in zip(rows, row_widths):
        height = max(sizes[n][1] for n in row)
        x = (width - row_width) / 2
        for node in row:
            w, h = sizes[node]
            boxes[node] = Box(x + w / 2, y + height / 2, w, h)
            x += w + NODE_GAP
        y += height + ROW_GAP
    return Layout(boxes, width, y - ROW_GAP + MARGIN)


def _rows(graph: nx.DiGraph) -> dict[Hashable, int]:
    """Row of each node, as late as possible: the longest path from it to a node without users sets its height,
    and row = (greatest height) - height."""
    height: dict[Hashable, int] = {}
    for node in reversed(list(nx.topological_sort(graph))):
        height[node] = 1 + max((height[user] for user in graph.successors(node)), default=-1)
    top = max(height.values())
    return {node: top - h for node, h in height.items()}


def _ordered_rows(graph: nx.DiGraph, row: dict[Hashable, int]) -> list[list[Hashable]]:
    """The rows as lists, ordered by barycenter sweeps (down using predecessors, up using successors)."""
    rows: list[list[Hashable]] = [[] for _ in range(max(row.values()) + 1)]
    for node in graph:  # insertion order: program order
        rows[row[node]].append(node)
    rows = [r for r in rows if r]
    for sweep in range(SWEEPS):
        downward = sweep % 2 == 0
        order = range(1, len(rows)) if downward else range(len(rows) - 2, -1, -1)
        for i in order:
            neighbour_row = rows[i - 1] if downward else rows[i + 1]
            place = {node: p for p, node in enumerate(neighbour_row)}
            neighbours = graph.predecessors if downward else graph.successors

            def barycenter(node, place=place, neighbours=neighbours):
                found = [place[n] for n in neighbours(node) if n in place]
                return sum(found) / len(found) if found else rows[i].index(node)

            rows[i] = sorted(rows[i], key=barycenter)
    return rows
