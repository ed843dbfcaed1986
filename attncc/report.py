"""Report: what attncc found and did, per site; printable as a table and JSON-able."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import sympy

from attncc.measure import SiteError
from attncc.site import AttentionSite, RejectedSite
from attncc.variants.exact import dense_attention_cost
from attncc.variants.heads import compact_variant_text


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
    sinks: bool = False
    """True when the site has learned sink logits (gpt-oss), carried by the op."""
    dtype: str = ""
    graph: int = 0
    min_len: int = 0
    flops_before: Any = None
    """Attention FLOPs of the model's own computation (every query-key pair), at the captured shapes: an int,
    or the sympy expression as text where a size is dynamic."""
    flops_after: Any = None
    """Attention FLOPs of what attncc runs (the variant's cost; the exact spec's below ``min_len``)."""
    flops_before_real: Optional[int] = None
    """Measured on the first call: attention FLOPs of dense attention over the real tokens only (padding
    excluded, as a key-padding mask says); None: not measured."""
    flops_after_measured: Optional[int] = None
    """Measured on the first call: the attention FLOPs the variant actually ran on it (its measured pairs:
    the blocks a data-dependent selection kept, real tokens only; the pooled remainder one pair per entry);
    None where the variant does not measure them (its ``flops_after`` from shapes stands)."""
    rel_l2: Optional[float] = None
    """Measured on the first call: ``||out - exact|| / ||exact||`` of the site's output (None: not measured)."""
    cosine: Optional[float] = None

    @staticmethod
    def from_site(site: AttentionSite, index: int, error: Optional[SiteError] = None) -> "SiteReport":
        """The report row of ``site``, the ``index``-th site of the model in program order."""
        before, after = site_flops(site)
        return SiteReport(
            index=index, module=site.module, kind="channel" if site.axis == "channels" else site.kind,
            causal=site.causal, mask=site.mask_kind,
            q_heads=site.q_heads, kv_heads=site.kv_heads, q_len=site.q_len, kv_len=site.kv_len,
            head_dim=site.head_dim, value_dim=site.value_dim, variant=site.variant, reason=site.reason,
            source=site.source, layout=site.layout, batch=site.batch, scale=round(site.scale, 8),
            softcap=site.softcap, dropout_p=site.dropout_p, sinks=site.sink_logits is not None,
            dtype=str(site.dtype).replace("torch.", ""),
            graph=site.graph_index, min_len=site.min_len, flops_before=before, flops_after=after,
            rel_l2=None if error is None else error.rel_l2, cosine=None if error is None else error.cosine,
            flops_before_real=_whole(getattr(error, "flops_dense_real", None)),
            flops_after_measured=_whole(getattr(error, "flops_measured", None)),
        )

    @property
    def measured_saving(self) -> Optional[float]:
        """flops_before_real / flops_after_measured where both were measured."""
        if self.flops_before_real is not None and self.flops_after_measured:
            return self.flops_before_real / self.flops_after_measured
        return None

    @property
    def saving(self) -> Optional[float]:
        """flops_before / flops_after where both are numbers."""
        if isinstance(self.flops_before, int) and isinstance(self.flops_after, int) and self.flops_after > 0:
            return self.flops_before / self.flops_after
        return None


def site_flops(site: AttentionSite) -> tuple[Any, Any]:
    """(before, after) attention FLOPs of a site: ints at static shapes, expression text where dynamic."""
    before = _number(dense_attention_cost(site)["flops"])
    spec = site.spec
    if spec is None:
        return before, before
    if site.min_len and isinstance(site.kv_len, int) and site.kv_len < site.min_len:
        spec = site.fallback
    try:
        after = _number(spec.cost(site)["flops"])
    except Exception:  # a cost that cannot be evaluated at these sizes is left out, not guessed
        after = None
    return before, after


def _whole(value: Optional[float]) -> Optional[int]:
    return None if value is None else int(round(value))


def _number(expr) -> Any:
    try:
        expr = sympy.nsimplify(expr) if not isinstance(expr, sympy.Basic) else expr
        if expr.is_number:
            return int(sympy.ceiling(expr))
        return str(sympy.simplify(expr))
    except Exception:
        return str(expr)


@dataclass
class RejectedReport:
    """A near-miss: attention-like code attncc leaves as it is, and why."""

    module: str
    reason: str

    @staticmethod
    def from_rejected(r: RejectedSite) -> "RejectedReport":
        return RejectedReport(r.module, r.reason)


@dataclass
class PlanHeadReport:
    """One query head of a planned site: the variant it runs and the candidates weighed for it."""

    module: str
    head: int
    variant: str
    error: float
    """Predicted contribution to the end-to-end error (the plan's metric)."""
    time_s: float
    """Predicted time of this head's share of the site at the plan's target length."""
    flops: float
    considered: list[dict] = field(default_factory=list)
    """``{"variant", "error", "time_s", "flops", "why"}`` per candidate, as the plan recorded them."""


@dataclass
class PlanReport:
    """The calibration plan a model was compiled from: per site and head what runs and why, the predicted
    attention speedup, and the end-to-end errors the calibration measured (on its data and on held-out data)."""

    model: str
    fingerprint: str
    metric: str
    max_error: float
    target_len: Optional[int]
    heads: list[PlanHeadReport] = field(default_factory=list)
    measured: dict = field(default_factory=dict)
    """``{"calibration": {"mean", "worst", "texts"}, "held_out": {...}}`` (held_out absent when none was given)."""
    notes: list[str] = field(default_factory=list)
    predicted_speedup: Optional[float] = None
    """Predicted attention time of exact / of the plan over the planned heads (the time model's), None when a
    head recorded no exact candidate."""

    @staticmethod
    def from_plan(plan) -> "PlanReport":
        """The report section of an ``attncc.calibration.plan.Plan``."""
        heads = [PlanHeadReport(module, head, c.variant, c.error, c.time_s, c.flops, [dict(x) for x in c.considered])
                 for module, choices in plan.sites.items() for head, c in enumerate(choices)]
        return PlanReport(plan.model, plan.fingerprint, plan.metric, plan.max_error, plan.target_len, heads,
                          dict(plan.measured), list(plan.notes), plan.predicted_speedup())

    def heads_table(self):
        """Per site and head: the chosen variant, its predicted error and time, and every candidate considered."""
        from rich.table import Table

        length = f" at {self.target_len} tokens" if self.target_len else ""
        speedup = f", predicted attention speedup {self.predicted_speedup:.2f}x" if self.predicted_speedup else ""
        table = Table(title=f"plan for {self.model}: {self.metric} error <= {self.max_error}{length}{speedup}",
                      title_justify="left", caption=PLAN_CAPTION, caption_justify="left")
        for column in ("module", "head", "variant", "pred. error", "pred. time", "candidates (error, time, why)"):
            table.add_column(column, overflow="fold",
                             justify="right" if column in ("head", "pred. error", "pred. time") else "left")
        for h in self.heads:
            table.add_row(h.module or "<root>", str(h.head), h.variant, f"{h.error:.2e}", _seconds(h.time_s),
                          "; ".join(_candidate(c) for c in h.considered) or "-")
        return table

    def measured_table(self):
        """The end-to-end errors measured while calibrating: on the calibration data and on held-out data."""
        rows = []
        for name in ("calibration", "held_out"):
            found = self.measured.get(name)
            if isinstance(found, dict):
                rows.append((name.replace("_", "-"), _float_cell(found.get("mean")), _float_cell(found.get("worst")),
                             str(found.get("texts", "-"))))
            elif name == "held_out":
                rows.append(("held-out", "not measured (no held-out data given)", "-", "-"))
        return _text_table(f"measured end-to-end error ({self.metric}, budget {self.max_error})",
                           ("data", "mean", "worst", "texts"), rows)


PLAN_CAPTION = ("pred. error: the head's predicted share of the end-to-end error; pred. time: its share of the "
                "site's time at the target length, from the time model (measured micro-benchmarks, not this run).")


def plan_section(policy) -> Optional[PlanReport]:
    """The PlanReport of ``policy`` when it comes from a calibration plan (``policy.plan``), else None."""
    plan = getattr(policy, "plan", None)
    return PlanReport.from_plan(plan) if plan is not None else None


def _seconds(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    return f"{value * 1e3:.3g} ms"


def _float_cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _candidate(c: dict) -> str:
    """``topk(block=16, density=0.25): 2.1e-03, 0.41 ms, over budget``"""
    error = c.get("error")
    error_text = f"{error:.1e}" if isinstance(error, (int, float)) and not isinstance(error, bool) else "-"
    return f"{c.get('variant', '?')}: {error_text}, {_seconds(c.get('time_s'))}, {c.get('why', '')}".rstrip(", ")


@dataclass
class Report:
    """All sites and near-misses of a compiled model. ``print(report)`` shows a table."""

    sites: list[SiteReport] = field(default_factory=list)
    rejected: list[RejectedReport] = field(default_factory=list)
    frontend: str = ""
    graphs: int = 0
    policy: str = ""
    captured: bool = True
    plan: Optional[PlanReport] = None
    """The calibration plan the model was compiled from (``attncc.compile(model, plan)``), else None."""

    def to_dict(self) -> dict:
        """``{"sites": [...], "rejected": [...], "plan": {...} or None, ...}`` with plain JSON types."""
        return {
            "frontend": self.frontend, "graphs": self.graphs, "policy": self.policy,
            "sites": [asdict(s) for s in self.sites], "rejected": [asdict(r) for r in self.rejected],
            "plan": asdict(self.plan) if self.plan is not None else None,
        }

    def table(self, title: Optional[str] = None):
        """The site table as a rich Table."""
        from rich.table import Table

        table = Table(title=title or f"attention sites ({self.frontend}, {self.graphs} graph(s), policy "
                                     f"{self.policy!r})", title_justify="left", caption=FLOPS_CAPTION,
                      caption_justify="left")
        # FLOP columns are counted from shapes, not timed: their names say so, next to measured time elsewhere
        numbers = ("attn GFLOP", "attn FLOPs\nratio", "rel. error", "cosine")
        for col in ("#", "module", "kind", "mask", "heads q/kv", "len q/kv", "variant", *numbers):
            table.add_column(col, overflow="fold", justify="right" if col in numbers else "left")
        for s in self.sites:
            table.add_row(str(s.index), s.module or "<root>", s.kind, s.mask,
                          f"{s.q_heads}/{s.kv_heads}", f"{s.q_len}/{s.kv_len}",
                          compact_variant_text(s.variant) + (f" from {s.min_len} keys" if s.min_len else ""),
                          f"{_gflop(s.flops_before)} -> {_gflop(s.flops_after)}",
                          f"{s.saving:.1f}x" if s.saving is not None else "-", *_error_cells(s))
        return table

    def measured_table(self):
        """The attention FLOPs measured on the first call, for the sites whose variant measures what it ran
        (``flops_after_measured``): dense attention over the real tokens -> what the variant ran; None when no
        site has them."""
        rows = [s for s in self.sites if s.flops_after_measured is not None]
        if not rows:
            return None
        from rich.table import Table

        table = Table(title="measured attention FLOPs (first call, padding excluded)", title_justify="left",
                      caption=MEASURED_CAPTION, caption_justify="left")
        for col in ("#", "variant", "measured GFLOP", "measured ratio"):
            table.add_column(col, overflow="fold", justify="left" if col == "variant" else "right")
        for s in rows:
            table.add_row(str(s.index), s.variant, f"{_gflop(s.flops_before_real)} -> {_gflop(s.flops_after_measured)}",
                          f"{s.measured_saving:.1f}x" if s.measured_saving is not None else "-")
        return table

    def reasons_table(self):
        """Why each site got its variant (the policy rule, or why a variant did not apply)."""
        return _text_table("why", ("#", "reason"), [(str(s.index), s.reason) for s in self.sites])

    def rejected_table(self):
        """The near-misses: attention-like code left as it is, and why."""
        return _text_table("not rewritten (near-misses)", ("module", "reason"),
                           [(r.module or "<root>", r.reason) for r in self.rejected])

    def render(self, width: int = 150, model: Optional[str] = None) -> str:
        """The report as text: the site table, why each site got its variant, the near-misses; a capture that
        found no attention says ``no attention found in <model>`` instead of showing an empty table."""
        from rich.console import Console

        buffer = io.StringIO()
        console = Console(file=buffer, width=width, force_terminal=False, color_system=None)
        if not self.captured:
            console.print("nothing captured yet: call the compiled model once (or pass example_inputs)")
        elif not self.sites:
            console.print(f"no attention found in {model or 'the model'}: nothing was rewritten ({self.frontend}, "
                          f"{self.graphs} graph(s), policy {self.policy!r})", markup=False, highlight=False)
            if self.rejected:
                console.print(self.rejected_table())
        else:
            console.print(self.table())
            measured = self.measured_table()
            if measured is not None:
                console.print(measured)
            if any(s.reason and s.reason != f"policy: {self.policy}" for s in self.sites):
                console.print(self.reasons_table())
            if self.rejected:
                console.print(self.rejected_table())
        if self.plan is not None:
            console.print(self.plan.heads_table())
            console.print(self.plan.measured_table())
            for note in self.plan.notes:
                console.print(f"plan note: {note}", markup=False, highlight=False)
        return buffer.getvalue()

    def __str__(self) -> str:
        return self.render()


FLOPS_CAPTION = ("attn GFLOP: attention FLOPs, model -> attncc, counted from shapes; attn FLOPs ratio: model / attncc, "
                 "an estimate, not a measured speedup. rel. error, cosine: measured on the first call.")
MEASURED_CAPTION = ("measured GFLOP: dense attention over the real (non-padding) tokens -> the attention FLOPs the "
                    "variant ran on the first call (its selection counted; a pooled remainder entry one pair).")


def _text_table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]):
    """A rich Table of plain text cells with its title on the left."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    return table


def _gflop(value: Any) -> str:
    if isinstance(value, int):
        return f"{value / 1e9:.3g}"
    return "-" if value is None else str(value)


def _error_cells(s: SiteReport) -> tuple[str, str]:
    if s.variant in ("none",):
        return "-", "-"
    if s.rel_l2 is None:
        return "not run", "-"
    if s.rel_l2 == 0.0 and s.cosine == 1.0:
        return "exact", "exact"
    return f"{s.rel_l2:.2e}", f"{s.cosine:.5f}"
