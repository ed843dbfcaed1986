"""Report: what attncc found and did, per site; printable as a table and JSON-able."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from attncc.site import AttentionSite, RejectedSite


@dataclass
class SiteReport:
    """One attention site as the user sees it."""

    index: int
    module: str
    kind: str
    causal: bool
    mask: str
    q_heads: Any
    kv_heads: Any
    q_len: Any
    kv_len: Any
    head_dim: Any
    value_dim: Any
    variant: str
    reason: str
    source: str = ""
    layout: str = ""
    batch: Any = 1
    scale: float = 1.0
    softcap: float = 0.0
    dropout_p: float = 0.0
    dtype: str = ""
    graph: int = 0

    @staticmethod
    def from_site(site: AttentionSite) -> "SiteReport":
        return SiteReport(
            index=site.index, module=site.module, kind=site.kind, causal=site.causal, mask=site.mask_kind,
            q_heads=site.q_heads, kv_heads=site.kv_heads, q_len=site.q_len, kv_len=site.kv_len,
            head_dim=site.head_dim, value_dim=site.value_dim, variant=site.variant, reason=site.reason,
            source=site.source, layout=site.layout, batch=site.batch, scale=round(site.scale, 8),
            softcap=site.softcap, dropout_p=site.dropout_p, dtype=str(site.dtype).replace("torch.", ""),
            graph=site.graph_index,
        )


@dataclass
class RejectedReport:
    """A near-miss: attention-like code attncc leaves as it is, and why."""

    module: str
    reason: str

    @staticmethod
    def from_rejected(r: RejectedSite) -> "RejectedReport":
        return RejectedReport(r.module, r.reason)


@dataclass
class Report:
    """All sites and near-misses of a compiled model. ``print(report)`` shows a table."""

    sites: list[SiteReport] = field(default_factory=list)
    rejected: list[RejectedReport] = field(default_factory=list)
    frontend: str = ""
    graphs: int = 0
    policy: str = ""
    captured: bool = True

    def to_dict(self) -> dict:
        """``{"sites": [...], "rejected": [...], ...}`` with plain JSON types."""
        return {
            "frontend": self.frontend, "graphs": self.graphs, "policy": self.policy,
            "sites": [asdict(s) for s in self.sites], "rejected": [asdict(r) for r in self.rejected],
        }

    def table(self, title: Optional[str] = None):
        """The site table as a rich Table."""
        from rich.table import Table

        table = Table(title=title or f"attention sites ({self.frontend}, {self.graphs} graph(s), policy "
                                     f"{self.policy!r})", title_justify="left")
        for col in ("#", "module", "kind", "causal", "mask", "heads q/kv", "len q/kv", "dim qk/v", "variant"):
            table.add_column(col, no_wrap=col not in ("module",))
        for s in self.sites:
            table.add_row(str(s.index), s.module or "<root>", s.kind, "yes" if s.causal else "no", s.mask,
                          f"{s.q_heads}/{s.kv_heads}", f"{s.q_len}/{s.kv_len}", f"{s.head_dim}/{s.value_dim}",
                          s.variant)
        return table

    def rejected_table(self):
        from rich.table import Table

        table = Table(title="not rewritten (near-misses)", title_justify="left")
        table.add_column("module")
        table.add_column("reason")
        for r in self.rejected:
            table.add_row(r.module or "<root>", r.reason)
        return table

    def render(self, width: int = 120) -> str:
        from rich.console import Console

        buffer = io.StringIO()
        console = Console(file=buffer, width=width, force_terminal=False, color_system=None)
        if not self.captured:
            console.print("nothing captured yet: call the compiled model once (or pass example_inputs)")
        else:
            console.print(self.table())
            if self.rejected:
                console.print(self.rejected_table())
        return buffer.getvalue()

    def __str__(self) -> str:
        return self.render()
