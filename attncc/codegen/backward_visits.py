"""Which variants have backward kernels, and the visit (key blocks per query block) their backward walks.

The backward kernels (:mod:`attncc.codegen.softmax_backward`) visit exactly the (query block, key block)
pairs the forward kernel visits, so each family here rebuilds the forward's visit from the same public
builders the forward launchers use: ``exact`` a :class:`DenseVisit`, ``local`` a :class:`BandVisit`,
``block_sparse`` its named or ``mask_mod`` layout, ``topk`` the layout its device selection picks (the
selection is recomputed from the saved q and k: it is deterministic, and gradients do not flow through it),
``neighborhood`` its tiled layout with token map and predicate.
"""

from __future__ import annotations

from typing import Union

from torch import Tensor

from attncc.codegen.visits import BandVisit, DenseVisit, LayoutVisit
from attncc.errors import AttnccError
from attncc.variants.base import ScoreMods, VariantSpec

Visit = Union[DenseVisit, BandVisit, LayoutVisit]
FAMILIES = ("exact", "local", "block_sparse", "topk", "neighborhood")
"""Variant families with backward kernels; every other variant recomputes its backward on the torch path."""


def backward_declines(spec: VariantSpec, mods: ScoreMods) -> str:
    """Why the backward kernels do not run ``spec`` with ``mods`` ('' when they do), from the spec and options
    alone. The caller has already checked that the forward kernel covers the call (ranks, dtypes, heads,
    the family's own ``covers``)."""
    if spec.name not in FAMILIES:
        return f"no backward kernel for {spec.name}"
    if mods.dropout_p > 0:
        return "attention dropout"
    if getattr(spec, "remainder", False):
        return "remainder=True (pooled entries) has no backward kernel"
    return ""


def backward_visit(spec: VariantSpec, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Visit:
    """The visit of the forward kernel of ``spec`` for this call (one :func:`backward_declines` accepts).

    q ``[B, Hq, Nq, Dqk]``, k ``[B, Hkv, Nk, Dqk]``, v ``[B, Hkv, Nk, Dv]``."""
    if spec.name == "exact":
        return DenseVisit()
    if spec.name == "local":
        left, right = spec.bounds(mods.causal)
        return BandVisit(left, right, spec.sinks, spec.globals)
    if spec.name == "block_sparse":
        return _block_sparse_visit(spec, q, k, mods)
    if spec.name == "topk":
        from attncc.codegen.topk import topk_layout

        layout = topk_layout(spec, q, k, mods)
        return LayoutVisit(layout_for=lambda bm, bn: layout, descriptor={"variant": str(spec)},
                           block_sizes=(spec.block, spec.block))
    if spec.name == "neighborhood":
        from attncc.codegen.neighborhood import neighborhood_visit

        return neighborhood_visit(spec, q.shape[-2], q.device)
    raise AttnccError(f"backward kernels: no visit for {spec.name} (backward_declines says why)")


def _block_sparse_visit(spec, q: Tensor, k: Tensor, mods: ScoreMods) -> LayoutVisit:
    """The visit :func:`attncc.codegen.block_sparse.block_sparse_attention` runs, for the same call."""
    from attncc.codegen.block_sparse import block_sparse_visit

    return block_sparse_visit(spec, q, k, mods)


__all__ = ["FAMILIES", "backward_declines", "backward_visit"]
