"""SVG drawings of site subgraphs, written as text (no renderer, no fonts or scripts to fetch).

A node is a box with its op name and shape; its full text (the fx node, the model's source line) is the box's
``<title>``, which browsers show as a tooltip. Colours say each node's role (``attncc.visual.subgraph.ROLES``).
"""

from __future__ import annotations

from html import escape
from typing import NamedTuple, Optional

import networkx as nx

from attncc.visual.layout import Layout, layered_layout

FONT = "ui-monospace, SFMono-Regular, Menlo, Consolas, 'DejaVu Sans Mono', monospace"
"""Generic local monospace fonts: box widths are computed from character counts."""
CHAR_WIDTH = 7.0
"""Width of one character of the 11 px label font, rounded up (px)."""
BOX_HEIGHT = 34
MAX_LABEL = 28
"""Longest label drawn in a box; the tooltip has the rest."""

ROLE_STYLE = {  # role: (fill, stroke, dashed)
    "q": ("#dbeafe", "#2563eb", False),
    "k": ("#dcfce7", "#16a34a", False),
    "v": ("#fef3c7", "#d97706", False),
    "mask": ("#f3e8ff", "#9333ea", False),
    "input": ("#f3f4f6", "#9ca3af", False),
    "removed": ("#fee2e2", "#dc2626", False),
    "kept": ("#e5e7eb", "#4b5563", False),
    "op": ("#86efac", "#15803d", False),
    "added": ("#ecfccb", "#65a30d", True),
    "user": ("#ffffff", "#9ca3af", True),
}


class Drawing(NamedTuple):
    """An ``<svg>`` element as text, and its size in px."""

    svg: str
    width: float
    height: float


def box_text(graph: nx.DiGraph, node) -> tuple[str, str]:
    """The two lines drawn in a node's box: ``q: transpose`` / ``1×4×64×16 f32``."""
    data = graph.nodes[node]
    label = data["label"]
    if data["role"] in ("q", "k", "v"):
        label = f"{data['role']}: {label}"
    return _clip(label), _clip(data["shape"])


def graph_svg(graph: nx.DiGraph, prefix: str, title: Optional[str] = None) -> Drawing:
    """One ``<svg>`` element drawing ``graph`` (a subgraph of ``attncc.visual.subgraph``); ``prefix`` keeps its
    element ids unique within a page."""
    layout = layered_layout(graph, lambda node: _box_size(graph, node))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="graph" width="{layout.width:.0f}" '
             f'height="{layout.height:.0f}" viewBox="0 0 {layout.width:.0f} {layout.height:.0f}" '
             f'font-family="{escape(FONT)}" font-size="11" role="img">']
    if title:
        parts.append(f"<title>{escape(title)}</title>")
    parts.append(f'<defs><marker id="{prefix}-arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
                 f'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#6b7280"/></marker></defs>')
    parts.extend(_edges(graph, layout, prefix))
    parts.extend(_node(graph, layout, node) for node in graph)
    parts.append("</svg>")
    return Drawing("".join(parts), layout.width, layout.height)


def stacked_svg(blocks: list[tuple[str, list[Drawing]]], gap: int = 24) -> str:
    """A standalone SVG document of ``blocks``: each a heading (lines of text) over drawings side by side."""
    body, y, width = [], 10.0, 200.0
    for heading, drawings in blocks:
        for line in heading.splitlines():
            y += 16
            body.append(f'<text x="10" y="{y:.0f}" font-size="13">{escape(line)}</text>')
        y += 8
        x, row_height = 10.0, 0.0
        for drawing in drawings:  # nested <svg> elements, placed by their x and y
            body.append(drawing.svg.replace("<svg ", f'<svg x="{x:.0f}" y="{y:.0f}" ', 1))
            x += drawing.width + gap
            row_height = max(row_height, drawing.height)
        width = max(width, x)
        y += row_height + gap
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" '
            f'height="{y:.0f}" viewBox="0 0 {width:.0f} {y:.0f}" font-family="{escape(FONT)}">'
            f'<rect width="100%" height="100%" fill="white"/>{"".join(body)}</svg>\n')


def _box_size(graph: nx.DiGraph, node) -> tuple[float, float]:
    label, shape = box_text(graph, node)
    return max(len(label), len(shape), 4) * CHAR_WIDTH + 16, BOX_HEIGHT


def _edges(graph: nx.DiGraph, layout: Layout, prefix: str) -> list[str]:
    paths = []
    for source, target in graph.edges:
        a, b = layout.boxes[source], layout.boxes[target]
        x1, y1, x2, y2 = a.x, a.y + a.height / 2, b.x, b.y - b.height / 2
        bend = max((y2 - y1) / 2, 10)
        paths.append(f'<path d="M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + bend:.1f} {x2:.1f},{y2 - bend:.1f} '
                     f'{x2:.1f},{y2:.1f}" fill="none" stroke="#6b7280" stroke-width="1.2" '
                     f'marker-end="url(#{prefix}-arrow)"/>')
    return paths


def _node(graph: nx.DiGraph, layout: Layout, node) -> str:
    data = graph.nodes[node]
    box = layout.boxes[node]
    fill, stroke, dashed = ROLE_STYLE[data["role"]]
    label, shape = box_text(graph, node)
    left, top = box.x - box.width / 2, box.y - box.height / 2
    weight = ' font-weight="bold"' if data["role"] == "op" else ""
    dash = ' stroke-dasharray="4 3"' if dashed else ""
    return (f'<g class="node" data-name="{escape(str(node))}" data-role="{data["role"]}">'
            f'<title>{escape(data["detail"])}</title>'
            f'<rect x="{left:.1f}" y="{top:.1f}" width="{box.width:.1f}" height="{box.height:.1f}" rx="5" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="{2 if data["role"] == "op" else 1.2}"{dash}/>'
            f'<text x="{box.x:.1f}" y="{top + 14:.1f}" text-anchor="middle" fill="#111827"{weight}>'
            f'{escape(label)}</text>'
            f'<text x="{box.x:.1f}" y="{top + 27:.1f}" text-anchor="middle" fill="#4b5563" font-size="10">'
            f'{escape(shape)}</text></g>')


def _clip(text: str) -> str:
    return text if len(text) <= MAX_LABEL else text[:MAX_LABEL - 1] + "…"


def report_svg(report, views, title: str) -> str:
    """The visual report as one SVG document: per site a heading with its facts, the matched subgraph before and
    the attncc op after, side by side; the near-misses listed at the top."""
    from attncc.visual.views import site_heading

    lines = [f"attncc report: {title}: {len(report.sites)} site(s), policy {report.policy!r}, {report.frontend}, "
             f"{report.graphs} graph(s)"]
    lines += [f"not rewritten: {r.module or '<root>'}: {r.reason}" for r in report.rejected]
    blocks: list[tuple[str, list[Drawing]]] = [("\n".join(lines), [])]
    for view in views:
        drawings = [graph_svg(view.before, f"site{view.site.index}-before", "before the rewrite")]
        if view.after is not None:
            drawings.append(graph_svg(view.after, f"site{view.site.index}-after", "after the rewrite"))
        heading = site_heading(view.site) + ("" if view.after is not None else f"\nleft as it was: {view.site.reason}")
        blocks.append((heading + "\nbefore (matched subgraph)" + ("  |  after (attncc op)" if view.after else ""),
                       drawings))
    return stacked_svg(blocks)
