"""The visual report: each site's matched subgraph before the rewrite and the attncc op after, with the facts of
``cm.report()``, as a self-contained HTML page, an SVG document or DOT text.

    from attncc.visual import render
    page = render(cm, "html", title="my model")          # or "svg", "dot"

Modules: ``subgraph`` (the graphs, as networkx DiGraphs), ``views`` (a site's report row with its graphs),
``layout`` (layered layout), ``svg``, ``dot``, ``html`` (the three renderings).
"""

from __future__ import annotations

from attncc.visual.dot import report_dot
from attncc.visual.html import render_html
from attncc.visual.svg import report_svg
from attncc.visual.views import SiteView, site_views

FORMATS = ("html", "svg", "dot")


def render(cm, fmt: str, title: str, subtitle: str = "") -> str:
    """The visual report of the compiled model ``cm`` as text in format ``fmt`` (one of ``FORMATS``)."""
    report, views = site_views(cm)
    if fmt == "html":
        return render_html(report, views, title, subtitle)
    if fmt == "svg":
        return report_svg(report, views, title)
    if fmt == "dot":
        return report_dot(report, views, title)
    raise ValueError(f"unknown format {fmt!r}: valid formats are {', '.join(FORMATS)}")


__all__ = ["FORMATS", "SiteView", "render", "render_html", "report_dot", "report_svg", "site_views"]
