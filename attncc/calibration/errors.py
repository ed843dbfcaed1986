"""Per-head errors of every candidate variant at every site, measured where they enter the residual stream.

For one calibration batch, ``collect`` runs the model once (exact upstream of every site, so each figure is the
site's own error), and at each site runs every candidate of the menu on the same q, k, v and masks:

* ``errors[text]``: float64 ``[B, Hq]``, each head's squared error through the output projection (``Projection``)
  summed over real query rows (padding rows never count); on the op's output where no projection is proved;
* ``pairs[text]``: float64 ``[B, Hq]``, the (query, key) pairs the candidate scores, counting real queries and
  keys only: the variant's ``measured_pairs`` where it has one (data-dependent selections), otherwise its
  analytic cost scaled to the real tokens.

A candidate the site cannot run (``supports`` declines it, or the plan specializes it away) is recorded with the
reason and never offered for that site.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import sympy
import torch
from torch import Tensor

from attncc.calibration.interpreter import SiteVisit
from attncc.calibration.projection import plain_head_errors
from attncc.policy import Policy
from attncc.site import AttentionSite
from attncc.variants.parse import parse_variant


@dataclass
class SiteStats:
    """What calibration measured at one site (one module), accumulated over batches."""

    module: str
    site: AttentionSite
    heads: int
    projected: bool = False
    """True when the errors were measured through the output projection."""
    runs: dict[str, str] = field(default_factory=dict)
    """menu text -> the canonical text that runs at this site (the variant specialized to it)."""
    declined: dict[str, str] = field(default_factory=dict)
    """menu text -> why it does not apply here."""
    errors: dict[str, list[Tensor]] = field(default_factory=dict)
    """run text -> per batch, float64 ``[B, Hq]`` squared projected error."""
    pairs: dict[str, list[Tensor]] = field(default_factory=dict)
    """run text (and ``"exact"``) -> per batch, float64 ``[B, Hq]`` pairs scored over real tokens."""
    dims: tuple[int, int] = (0, 0)
    """(Dqk, Dv): FLOPs are ``2 * pairs * (Dqk + Dv)``."""

    def error_matrix(self, text: str) -> Tensor:
        """float64 ``[samples, Hq]`` of the calibration data."""
        return torch.cat(self.errors[text], dim=0)

    def pair_matrix(self, text: str) -> Tensor:
        return torch.cat(self.pairs[text], dim=0)

    def flops(self, text: str) -> Tensor:
        """float64 ``[Hq]``: attention FLOPs per head summed over the calibration samples."""
        return 2.0 * (self.dims[0] + self.dims[1]) * self.pair_matrix(text).sum(0)


class ErrorCollector:
    """The hook that fills one ``SiteStats`` per module with every candidate's errors and pairs."""

    def __init__(self, menu: Callable[[AttentionSite], list[str]]):
        self.menu = menu
        self.stats: dict[str, SiteStats] = {}

    def __call__(self, visit: SiteVisit) -> Optional[Tensor]:
        stats = self._stats_for(visit)
        if visit.exact.dim() != 4:
            heads_first = visit.exact.unsqueeze(1)
        else:
            heads_first = visit.exact
        rows = visit.query_rows()
        projection = visit.projection()
        stats.projected = projection is not None
        exact_pairs = real_pairs(visit)
        _append(stats.pairs, "exact", exact_pairs)
        for text in sorted(set(stats.runs.values())):
            out = visit.run(text)
            delta = (out.unsqueeze(1) if out.dim() != 4 else out).float() - heads_first.float()
            err = projection.head_errors(delta, rows) if projection is not None else plain_head_errors(delta, rows)
            _append(stats.errors, text, err)
            _append(stats.pairs, text, candidate_pairs(visit, text, exact_pairs))
        return None

    def _stats_for(self, visit: SiteVisit) -> SiteStats:
        stats = self.stats.get(visit.module)
        if stats is not None:
            return stats
        site = visit.site
        heads = visit.exact.shape[1] if visit.exact.dim() == 4 else 1
        call = visit.call()
        stats = SiteStats(visit.module, site, heads, dims=(int(call.q.shape[-1]), int(call.v.shape[-1])))
        for text in self.menu(site):
            runs, why = runnable(site, text)
            if runs is None:
                stats.declined[text] = why
            else:
                stats.runs[text] = runs
        self.stats[visit.module] = stats
        return stats


def runnable(site: AttentionSite, text: str) -> tuple[Optional[str], str]:
    """``(canonical text that runs at site, '')`` when the planner would apply ``text`` there, else
    ``(None, reason)``."""
    from attncc.passes.plan import plan_site

    try:
        plan = plan_site(site, Policy(text), [site.grid] if site.grid else [])
    except Exception as error:  # a candidate that cannot even be planned here is one the site cannot run
        return None, f"{type(error).__name__}: {error}"
    if plan.spec is None or plan.declined or (plan.variant == "exact" and text != "exact"):
        return None, plan.reason
    return plan.variant, ""


def real_pairs(visit: SiteVisit) -> Tensor:
    """float64 ``[B, Hq]``: the (query, key) pairs exact attention scores over real tokens (key-padding mask
    and causality counted)."""
    call = visit.call()
    b, nq, nk = call.q.shape[0], call.q.shape[-2], call.k.shape[-2]
    hq = visit.exact.shape[1] if visit.exact.dim() == 4 else 1
    mask = call.mask
    if mask is not None and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[0] == b:
        keys = mask[:, 0, 0, :].double()
    else:
        keys = torch.ones(b, nk, dtype=torch.float64, device=call.q.device)
    rows = visit.query_rows()
    queries = rows.double() if rows is not None else torch.ones(b, nq, dtype=torch.float64, device=call.q.device)
    if call.causal:
        offset = nk - nq if call.q.shape[-2] != nk else 0
        seen = keys.cumsum(-1)[:, offset:offset + nq] if nq <= nk else keys.cumsum(-1)
        per_row = (queries[:, : seen.shape[-1]] * seen).sum(-1)
    else:
        per_row = queries.sum(-1) * keys.sum(-1)
    return per_row[:, None].expand(b, hq).cpu()


def candidate_pairs(visit: SiteVisit, text: str, exact_pairs: Tensor) -> Tensor:
    """float64 ``[B, Hq]`` pairs ``text`` scores over real tokens: its ``measured_pairs`` where it has one, else
    its analytic pairs as a fraction of the dense ones, applied to the real-token count."""
    spec = parse_variant(text)
    measure = getattr(spec, "measured_pairs", None)
    if measure is not None:
        call = visit.call()
        q, k = call.q, call.k
        if q.dim() == 4:
            measured = measure(q, k, call.score_mods())
            if measured is not None:
                return measured.double().cpu().reshape(exact_pairs.shape)
    return exact_pairs * cost_fraction(spec, visit.site)


def cost_fraction(spec, site: AttentionSite) -> float:
    """The variant's attention FLOPs over exact's at the site's shapes (1.0 where it cannot be evaluated)."""
    from attncc.variants import exact_spec

    try:
        ours = sympy.nsimplify(spec.cost(site)["flops"])
        dense = sympy.nsimplify(exact_spec(site).cost(site)["flops"])
        if ours.is_number and dense.is_number and float(dense) > 0:
            return float(ours) / float(dense)
    except Exception:
        pass
    return 1.0


def _append(table: dict[str, list[Tensor]], key: str, value: Tensor) -> None:
    table.setdefault(key, []).append(value.detach().double().cpu())
