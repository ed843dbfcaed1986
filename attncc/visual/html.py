"""The HTML report (``attncc inspect MODEL --html report.html``): one self-contained page.

The site table, why each site got its variant, the near-misses left alone, then per site its facts, the matched
subgraph before and the attncc op after (inline SVG; hover a box for the node in full) and the op's arguments.
No scripts, fonts or style sheets are fetched: the page opens offline.
"""

from __future__ import annotations

import dataclasses
import datetime
from html import escape

import torch

from attncc.report import FLOPS_CAPTION, Report
from attncc.visual.subgraph import ROLES
from attncc.visual.svg import ROLE_STYLE, graph_svg
from attncc.visual.views import SiteView, error_cells, gflop, site_facts

STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', 'DejaVu Sans', sans-serif; margin: 24px; color: #111827;
       background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.meta { color: #4b5563; margin: 2px 0; }
table { border-collapse: collapse; margin: 6px 0; font-size: 13px; }
th, td { border: 1px solid #d1d5db; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f4f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { caption-side: bottom; text-align: left; color: #6b7280; font-size: 12px; padding-top: 4px; }
section.site { border-top: 2px solid #e5e7eb; margin-top: 24px; }
.graphs { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
figure { margin: 0; overflow-x: auto; max-width: 100%; }
figcaption { font-weight: 600; margin-bottom: 4px; font-size: 13px; }
.legend span { display: inline-block; margin: 2px 10px 2px 0; font-size: 12px; }
.legend i { display: inline-block; width: 14px; height: 12px; border: 1px solid; vertical-align: middle;
            margin-right: 4px; border-radius: 3px; }
code, pre { font-family: ui-monospace, Menlo, Consolas, 'DejaVu Sans Mono', monospace; font-size: 12px; }
pre { white-space: pre-wrap; word-break: break-all; margin: 0; }
.note { color: #6b7280; }
"""

SITE_COLUMNS = ("#", "module", "kind", "mask", "heads q/kv", "len q/kv", "variant", "attn GFLOP", "attn FLOPs ratio",
                "rel. error", "cosine")
"""The columns of ``Report.table()``, in its order."""


def render_html(report: Report, views: list[SiteView], title: str, subtitle: str = "") -> str:
    """The report as one self-contained HTML page (``title``: the model, ``subtitle``: how it was built)."""
    body = [f"<header><h1>attncc report: {escape(title)}</h1>",
            f'<p class="meta">{escape(_summary(report))}</p>']
    if subtitle:
        body.append(f'<p class="meta">{escape(subtitle)}</p>')
    body.append("</header>")
    body.append(_sites_table(report))
    body.append(_reasons(report))
    body.append(_rejected(report))
    if views:
        body.append(_legend())
    body.extend(_site_section(view) for view in views)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>attncc report: {escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _summary(report: Report) -> str:
    from attncc import __version__

    rewritten = sum(1 for s in report.sites if s.variant != "none")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"policy {report.policy!r} · {report.frontend}, {report.graphs} graph(s) · {len(report.sites)} site(s), "
            f"{rewritten} rewritten · {len(report.rejected)} near-miss(es) · attncc {__version__}, "
            f"torch {torch.__version__} · {now}")


def _sites_table(report: Report) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in SITE_COLUMNS)
    rows = []
    for s in report.sites:
        variant = s.variant + (f" from {s.min_len} keys" if s.min_len else "")
        cells = [f'<a href="#site-{s.index}">{s.index}</a>', escape(s.module or "<root>"), escape(s.kind),
                 escape(s.mask), f"{s.q_heads}/{s.kv_heads}", f"{s.q_len}/{s.kv_len}", escape(variant)]
        numbers = [f"{gflop(s.flops_before)} -> {gflop(s.flops_after)}",
                   f"{s.saving:.1f}x" if s.saving is not None else "-", *error_cells(s)]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells)
                    + "".join(f'<td class="num">{escape(c)}</td>' for c in numbers) + "</tr>")
    if not rows:
        rows.append(f'<tr><td colspan="{len(SITE_COLUMNS)}">no attention found: nothing was rewritten</td></tr>')
    return (f'<section><h2>Attention sites</h2><table id="sites"><caption>{escape(FLOPS_CAPTION)}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></section>")


def _reasons(report: Report) -> str:
    """Why each site got its variant, shown where it says more than the policy's name (as ``Report.render``)."""
    if not any(s.reason and s.reason != f"policy: {report.policy}" for s in report.sites):
        return ""
    rows = "".join(f'<tr><td><a href="#site-{s.index}">{s.index}</a></td><td>{escape(s.reason)}</td></tr>'
                   for s in report.sites)
    return f'<section><h2>Why</h2><table id="reasons"><tr><th>#</th><th>reason</th></tr>{rows}</table></section>'


def _rejected(report: Report) -> str:
    if not report.rejected:
        return ('<section><h2>Not rewritten (near-misses)</h2><p class="note" id="rejected">none: every '
                'attention-like computation found was matched</p></section>')
    rows = "".join(f"<tr><td>{escape(r.module or '<root>')}</td><td>{escape(r.reason)}</td></tr>"
                   for r in report.rejected)
    return ('<section><h2>Not rewritten (near-misses)</h2><table id="rejected"><tr><th>module</th><th>reason</th>'
            f"</tr>{rows}</table></section>")


def _legend() -> str:
    items = []
    for role, meaning in ROLES.items():
        fill, stroke, dashed = ROLE_STYLE[role]
        border = "dashed" if dashed else "solid"
        items.append(f'<span><i style="background:{fill};border-color:{stroke};border-style:{border}"></i>'
                     f"<b>{role}</b>: {escape(meaning)}</span>")
    return ('<section class="legend"><h2>Reading the graphs</h2><p class="note">Each box is one node of the '
            "captured graph: its op and output shape; hover it for the node in full and the model's source line. "
            "Data flows top to bottom. 'Before' is the captured graph as attncc matched it, after canonicalization "
            "(nn.MultiheadAttention appears as its SDPA decomposition, einsum as matmul).</p>"
            f"{''.join(items)}</section>")


def _site_section(view: SiteView) -> str:
    s = view.site
    prefix = f"site{s.index}"
    before = graph_svg(view.before, f"{prefix}-before", f"site {s.index} before the rewrite")
    parts = [f'<section class="site" id="site-{s.index}">',
             f"<h2>#{s.index} {escape(s.module or '<root>')}: {escape(s.variant)}</h2>",
             _facts(view), '<div class="graphs">',
             f"<figure><figcaption>before: the subgraph matched in graph {s.graph} "
             f"({view.before.number_of_nodes()} nodes)</figcaption>{before.svg}</figure>"]
    if view.after is not None:
        after = graph_svg(view.after, f"{prefix}-after", f"site {s.index} after the rewrite")
        parts.append(f"<figure><figcaption>after: the attncc op</figcaption>{after.svg}</figure>")
    else:
        parts.append(f'<figure><figcaption>after</figcaption><p class="note">left as it was: '
                     f"{escape(s.reason)}</p></figure>")
    parts.append("</div>")
    if view.arguments:
        rows = "".join(f"<tr><td><code>{escape(name)}</code></td><td><code>{escape(value)}</code></td></tr>"
                       for name, value in view.arguments)
        parts.append(f'<table class="arguments"><tr><th>op argument</th><th>value</th></tr>{rows}</table>')
    parts.append(_node_details(view))
    parts.append("</section>")
    return "".join(parts)


def _facts(view: SiteView) -> str:
    """Every field of the site's report row, as ``cm.report().sites[i]`` holds it."""
    s = view.site
    rel_l2, cosine = error_cells(s)
    cells = [("attn GFLOP", f"{gflop(s.flops_before)} -> {gflop(s.flops_after)}"),
             ("attn FLOPs ratio", f"{s.saving:.1f}x" if s.saving is not None else "-"),
             ("measured", f"rel. error {rel_l2}, cosine {cosine}")]
    cells += [(f.name, str(getattr(s, f.name))) for f in dataclasses.fields(s) if f.name != "index"]
    rows = "".join(f"<tr><th>{escape(name)}</th><td>{escape(value)}</td></tr>" for name, value in cells)
    return (f'<p class="facts">{escape(site_facts(s))}</p><p class="meta">{escape(s.reason)}</p>'
            f"<details><summary>every field of the report row</summary><table>{rows}</table></details>")


def _node_details(view: SiteView) -> str:
    rows = []
    for label, graph in (("before", view.before), ("after", view.after)):
        if graph is None:
            continue
        for node, data in graph.nodes(data=True):
            rows.append(f"<tr><td>{label}</td><td><code>{escape(node)}</code></td><td>{data['role']}</td>"
                        f"<td><code>{escape(data['label'])}</code></td><td>{escape(data['shape'])}</td>"
                        f"<td><pre>{escape(data['detail'])}</pre></td></tr>")
    return (f"<details><summary>nodes in full ({len(rows)})</summary><table class=\"nodes\"><tr><th></th><th>name"
            f"</th><th>role</th><th>op</th><th>shape</th><th>node</th></tr>{''.join(rows)}</table></details>")
