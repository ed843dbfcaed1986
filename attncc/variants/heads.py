"""Per-head variants: the query heads of one site run different variants, in one op call.

``heads(groups=(('exact', (0, 1)), ('topk(block=16, density=0.25)', (2, 3))))`` runs query heads 0 and 1
exactly and heads 2 and 3 under top-k; heads no group lists run ``exact``. Each group is one variant text and
the query heads it runs; a head is in at most one group. ``HeadsSpec.of(["exact", "exact", "topk(...)", ...])``
builds the spec from one text per query head (the plain spec where every head agrees), which is what per-head
policy rules and calibrated plans produce.

How a call runs (``run_groups``): each group's spec runs on that group's query heads and the results are put
back in head order, ``[B, Hq, Nq, Dv]``. GQA (``Hq = g * Hkv``, query head ``h`` reads kv head ``h // g``):

* a group whose query heads are exactly the ``g`` query heads of some kv heads (every head sharing those kv
  heads, nothing else) gets just those kv heads, sliced from k and v (a view where they are contiguous); its
  spec sees ordinary GQA with the same ``g``, so a kernel reads each kv head once for its ``g`` query heads;
* any other group gets one kv head per query head (``index_select`` of the kv head each query head reads: a
  copy of ``len(group)`` kv heads), so its spec sees plain multi-head attention.

Per-head inputs in the ScoreMods follow the heads: a bias or mask with a head dim above 1 is sliced to the
group's heads, learned ``sinks`` ``[Hq]`` likewise; broadcast ones are shared.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, ClassVar, Optional, Sequence, Union

import sympy
import torch
from torch import Tensor

from attncc.errors import AttnccError
from attncc.variants.base import ScoreMods, VariantSpec
from attncc.variants.registry import register_variant

Group = tuple[str, tuple[int, ...]]
"""One group: a canonical variant text and the ascending query heads that run it."""

Runner = Callable[[VariantSpec, Tensor, Tensor, Tensor, ScoreMods], Tensor]
"""How one group's spec is run on its slices: ``(spec, q, k, v, mods) -> out`` (the spec's forward, its
reference, or the dispatch's kernel-or-torch choice)."""


@register_variant
@dataclass(frozen=True)
class HeadsSpec(VariantSpec):
    """Per-head variants: ``groups`` is a tuple of ``(variant text, tuple of query heads)``; the heads no group
    lists run exact. Texts are stored canonical, heads ascending, groups ordered by their first head, and
    groups with the same text merged, so equal plans give equal specs and equal texts."""

    name: ClassVar[str] = "heads"
    listed: ClassVar[int] = 90
    groups: tuple = ()

    @classmethod
    def examples(cls) -> tuple[VariantSpec, ...]:
        # The contract tests use 4 query heads over 2 kv heads: whole kv groups, split kv groups, unlisted heads.
        return (
            cls(groups=(("local(window=3)", (0, 1)), ("topk(block=4, density=0.5)", (2, 3)))),
            cls(groups=(("local(window=2, sinks=1)", (1, 2)),)),
            cls(groups=(("topk(block=2, k=2, sinks=0)", (3,)), ("local(left=2, right=1)", (0,)))),
        )

    @classmethod
    def exact_limit(cls, n: int) -> VariantSpec:
        return cls(groups=((f"local(window={n})", (0, 2)), ("topk(block=4, density=1.0)", (1,))))

    @staticmethod
    def of(per_head: Sequence[str]) -> VariantSpec:
        """The spec that runs variant ``per_head[h]`` on query head ``h``: the plain spec when every head runs
        the same variant (``exact`` when all are exact), else a ``HeadsSpec`` grouping the heads by variant.

        Example::

            HeadsSpec.of(["exact", "exact", "local(window=8)", "local(window=8)"])
            # heads(groups=(('exact', (0, 1)), ('local(window=8)', (2, 3))))
        """
        from attncc.variants.parse import parse_variant

        if isinstance(per_head, str) or not per_head:
            raise AttnccError(f"HeadsSpec.of: expected one variant text per query head, got {per_head!r}")
        specs = [parse_variant(text) for text in per_head]
        if any(isinstance(spec, HeadsSpec) for spec in specs):
            raise AttnccError("HeadsSpec.of: a head's variant cannot itself be per-head (heads(...))")
        texts = [str(spec) for spec in specs]
        if len(set(texts)) == 1:
            return specs[0]
        heads: dict[str, list[int]] = {}
        for head, text in enumerate(texts):
            heads.setdefault(text, []).append(head)
        return HeadsSpec(groups=tuple((text, tuple(found)) for text, found in heads.items()))

    def __post_init__(self):
        object.__setattr__(self, "groups", _canonical_groups(self))

    # ------------------------------------------------------------------------------------------- groups

    def specs(self) -> tuple[tuple[VariantSpec, tuple[int, ...]], ...]:
        """``(spec, heads)`` of each listed group (the unlisted heads are not included: ``run_groups`` adds
        them as an exact group once it knows the head count)."""
        from attncc.variants.parse import parse_variant

        return tuple((parse_variant(text), heads) for text, heads in self.groups)

    def listed_heads(self) -> tuple[int, ...]:
        return tuple(sorted(h for _, heads in self.groups for h in heads))

    def all_groups(self, q_heads: int) -> tuple[tuple[VariantSpec, tuple[int, ...]], ...]:
        """Every group over ``q_heads`` query heads, the unlisted heads as one more ``exact`` group; an error
        naming the head count where a listed head does not exist."""
        from attncc.variants.exact import ExactSpec

        listed = self.listed_heads()
        if listed and listed[-1] >= q_heads:
            raise AttnccError(f"heads: head {listed[-1]} does not exist: this call has {q_heads} query heads "
                              f"(0-{q_heads - 1}) in {self}")
        rest = tuple(sorted(set(range(q_heads)) - set(listed)))
        return self.specs() + (((ExactSpec(), rest),) if rest else ())

    def compact(self) -> str:
        """A short rendering for tables: ``heads: 0-1 exact, 2-3 topk(block=16, density=0.25)`` (the canonical
        text stays ``str(spec)``)."""
        return "heads: " + ", ".join(f"{head_ranges(heads)} {text}" for text, heads in self.groups)

    # ------------------------------------------------------------------------------------------- contract

    def aligns_last_queries(self) -> bool:
        """True when any group places fewer queries than keys at the last positions: the dispatch then runs a
        causal such call (top-left ``is_causal``) on the fallback for every head, which is right for all of
        them, where running only the other groups' variants would misplace that group's queries."""
        return any(spec.aligns_last_queries() for spec, _ in self.specs())

    def supports(self, site) -> tuple[bool, str]:
        """Every group's spec must support the site as that group's heads see it (``q_heads=len(group)``, the
        kv heads it reads); the reason names the group that declines. Dropout is declined (each group would
        draw its own mask), and so is a layout without a head dim."""
        if site.dropout_p > 0:
            return False, f"heads does not apply dropout (p={site.dropout_p})"
        if site.layout != "bhnd":
            return False, f"per-head variants need a [B, H, N, D] layout, this site's is {site.layout}"
        if not isinstance(site.q_heads, int):
            return False, f"per-head variants need a static head count, this site has q_heads={site.q_heads}"
        missing = self._missing_head(site)
        if missing:
            return False, missing
        said = []
        for spec, heads in self._site_groups(site):
            supported, why = spec.supports(group_site(site, heads))
            if not supported:
                return False, f"{heads_label(heads)} ({spec}): {why}"
            said.append(f"{heads_label(heads)}: {why}")
        return True, "; ".join(said)

    def specialize(self, site) -> Union[VariantSpec, str]:
        """Each group's spec specialized to its heads' view of the site (the unlisted heads as the site's exact
        form, e.g. the model's own band); the plain spec where all heads end up running the same one, or the
        first group's reason where a group's variant cannot run here (the planner then keeps the whole site
        exact and says why)."""
        missing = self._missing_head(site)
        if missing:
            return missing
        if not isinstance(site.q_heads, int):
            return f"per-head variants need a static head count, this site has q_heads={site.q_heads}"
        per_head = [""] * site.q_heads
        for spec, heads in self._site_groups(site):
            done = spec.specialize(group_site(site, heads))
            if isinstance(done, str):
                return f"{heads_label(heads)} ({spec}): {done}"
            for head in heads:
                per_head[head] = str(done)
        return HeadsSpec.of(per_head)

    def cost(self, site) -> dict[str, sympy.Expr]:
        """The sum of each group's cost on its heads' view of the site (``q_heads=len(group)``, kv heads as
        ``group_site`` says); needs a static head count."""
        total = {"flops": sympy.Integer(0), "bytes": sympy.Integer(0)}
        for spec, heads in self._site_groups(site):
            part = spec.cost(group_site(site, heads))
            total = {key: total[key] + part[key] for key in total}
        return total

    def measured_pairs(self, q: Tensor, k: Tensor, mods: ScoreMods) -> Optional[Tensor]:
        """Float ``[B, Hq]``: each head's (query, key) pairs as its group's spec measures them
        (``measured_pairs``); exact groups count the visible pairs of real queries and keys. None where a group's
        spec measures nothing (its cost stands) or the mask is not a key-padding mask."""
        out = q.new_zeros(q.shape[0], q.shape[1], dtype=torch.float32)
        for spec, heads, q_g, k_g, v_g, mods_g in self._group_inputs(q, k, v=k, mods=mods):
            measure = getattr(spec, "measured_pairs", None)
            pairs = measure(q_g, k_g, mods_g) if measure is not None else None
            if pairs is None and spec.exact:
                pairs = exact_pairs(q_g, k_g, mods_g)
            if pairs is None:
                return None
            out[:, list(heads)] = pairs.float().expand(q.shape[0], len(heads))
        return out

    # -------------------------------------------------------------------------------------------- running

    def run_groups(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods, run: Runner) -> Tensor:
        """``run(spec, q_g, k_g, v_g, mods_g)`` for each group on its heads' slices, put back in head order.

        q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nk, D]``, v ``[B, Hkv, Nk, Dv]`` -> ``[B, Hq, Nq, Dv]`` (see the module
        docstring for which kv heads a group gets). Differentiable: the pieces are concatenated, not written
        in place.
        """
        outs, order = [], []
        for spec, heads, q_g, k_g, v_g, mods_g in self._group_inputs(q, k, v, mods):
            outs.append(run(spec, q_g, k_g, v_g, mods_g))
            order.extend(heads)
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        if order != list(range(len(order))):
            position = torch.empty(len(order), dtype=torch.long)
            position[torch.tensor(order)] = torch.arange(len(order))
            out = out.index_select(1, position.to(out.device))
        return out

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
        """Each group's torch path on its heads (``run_groups``)."""
        return self.run_groups(q, k, v, mods, lambda spec, *args: spec.forward(*args))

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
        """Each group's reference on its heads."""
        return self.run_groups(q, k, v, mods, lambda spec, *args: spec.reference(*args))

    # ------------------------------------------------------------------------------------------- helpers

    def _missing_head(self, site) -> str:
        """Why the site cannot run this spec because a listed head is past its query heads ('' otherwise)."""
        listed = self.listed_heads()
        if isinstance(site.q_heads, int) and listed and listed[-1] >= site.q_heads:
            return f"head {listed[-1]} does not exist: the site has {site.q_heads} query heads"
        return ""

    def _site_groups(self, site):
        if not isinstance(site.q_heads, int):
            raise AttnccError(f"heads: needs a static number of query heads, the site has q_heads={site.q_heads}")
        return self.all_groups(site.q_heads)

    def _group_inputs(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods):
        """``(spec, heads, q_g, k_g, v_g, mods_g)`` per group of a ``[B, H, N, D]`` call."""
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise AttnccError(f"heads: expects [B, H, N, D] tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}")
        hq, hkv = q.shape[1], k.shape[1]
        if hq % hkv:
            raise AttnccError(f"heads: query heads {hq} are not a multiple of kv heads {hkv}")
        for spec, heads in self.all_groups(hq):
            kv_heads = whole_kv_groups(heads, hq // hkv) or [h // (hq // hkv) for h in heads]
            yield (spec, heads, select_heads(q, heads), select_heads(k, kv_heads), select_heads(v, kv_heads),
                   head_mods(mods, heads, hq))


# ----------------------------------------------------------------------------------------------- validation

def _canonical_groups(spec: HeadsSpec) -> tuple[Group, ...]:
    """``spec.groups`` checked and made canonical (see ``HeadsSpec``); errors name the field and the group."""
    from attncc.variants.parse import parse_variant

    groups = spec.groups
    if isinstance(groups, (str, bytes)) or not isinstance(groups, (tuple, list)) or not groups:
        raise spec.invalid("groups", f"must be a non-empty tuple of (variant text, tuple of query heads), e.g. "
                                     f"(('exact', (0, 1)), ('local(window=8)', (2, 3))), got {groups!r}")
    merged: dict[str, list[int]] = {}
    seen: dict[int, str] = {}
    for number, group in enumerate(groups):
        where = f"[{number}] = {group!r}"
        if isinstance(group, (str, bytes)) or not isinstance(group, (tuple, list)) or len(group) != 2:
            raise AttnccError(f"heads: groups{where} must be a pair (variant text, tuple of query heads)")
        text, heads = group
        if not isinstance(text, str):
            raise AttnccError(f"heads: groups{where}: the variant must be a text such as 'local(window=8)'")
        try:
            parsed = parse_variant(text)
        except AttnccError as err:
            raise AttnccError(f"heads: groups{where}: {err}") from None
        if isinstance(parsed, HeadsSpec):
            raise AttnccError(f"heads: groups{where}: a group cannot be per-head itself (nested heads)")
        for head in _heads_of(spec, where, heads):
            if head in seen:
                raise AttnccError(f"heads: groups{where}: head {head} is listed twice (also for {seen[head]!r})")
            seen[head] = str(parsed)
            merged.setdefault(str(parsed), []).append(head)
    ordered = sorted(merged.items(), key=lambda item: min(item[1]))
    return tuple((text, tuple(sorted(heads))) for text, heads in ordered)


def _heads_of(spec: HeadsSpec, where: str, heads) -> tuple[int, ...]:
    if isinstance(heads, bool) or isinstance(heads, int):
        heads = (heads,)
    if isinstance(heads, (str, bytes)) or not isinstance(heads, (tuple, list)) or not heads:
        raise AttnccError(f"heads: groups{where}: the heads must be a non-empty tuple of query head indices")
    for head in heads:
        if isinstance(head, bool) or not isinstance(head, int) or head < 0:
            raise AttnccError(f"heads: groups{where}: head indices must be integers >= 0, got {head!r}")
    return tuple(heads)


# ------------------------------------------------------------------------------------------------- slicing

def whole_kv_groups(heads: Sequence[int], g: int) -> Optional[list[int]]:
    """The kv heads whose ``g`` query heads are exactly ``heads`` (ascending), None when ``heads`` splits a kv
    head's query heads or includes part of one."""
    kv = sorted({h // g for h in heads})
    return kv if list(heads) == [s * g + i for s in kv for i in range(g)] else None


def select_heads(t: Tensor, heads: Sequence[int]) -> Tensor:
    """``t[:, heads]`` of a ``[B, H, ...]`` tensor: a view where the heads are one ascending run, else a copy."""
    heads = list(heads)
    if heads == list(range(heads[0], heads[0] + len(heads))):
        return t.narrow(1, heads[0], len(heads))
    return t.index_select(1, torch.tensor(heads, device=t.device))


def head_mods(mods: ScoreMods, heads: Sequence[int], q_heads: int) -> ScoreMods:
    """``mods`` for the query heads ``heads`` of ``q_heads``: per-head bias, mask and sinks sliced, broadcast
    ones kept."""
    def per_head(t: Optional[Tensor], what: str) -> Optional[Tensor]:
        if t is None:
            return None
        t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t
        if t.shape[1] == 1:
            return t
        if t.shape[1] != q_heads:
            raise AttnccError(f"heads: the {what} has {t.shape[1]} heads, the call {q_heads} query heads")
        return select_heads(t, heads)

    sinks = mods.sinks
    if sinks is not None and sinks.numel() > 1:
        if sinks.numel() != q_heads:
            raise AttnccError(f"heads: sinks of shape {tuple(sinks.shape)} are not one logit per query head ({q_heads})")
        sinks = sinks.reshape(-1).index_select(0, torch.tensor(list(heads), device=sinks.device))
    return replace(mods, bias=per_head(mods.bias, "bias"), mask=per_head(mods.mask, "mask"), sinks=sinks)


def group_site(site, heads: Sequence[int]):
    """``site`` as the query heads ``heads`` see it: ``q_heads=len(heads)``, and the kv heads the group reads
    (whole kv groups: those kv heads; else one per query head)."""
    hq, hkv = site.q_heads, site.kv_heads
    if not isinstance(hkv, int) or hkv < 1 or hq % hkv:
        return site.replace(q_heads=len(heads), kv_heads=len(heads))
    kv = whole_kv_groups(heads, hq // hkv)
    return site.replace(q_heads=len(heads), kv_heads=len(kv) if kv is not None else len(heads))


def exact_pairs(q: Tensor, k: Tensor, mods: ScoreMods) -> Optional[Tensor]:
    """Float ``[B, 1]``: the (query, key) pairs exact attention scores per head, counting real queries and
    keys only (padding: a key mask ``[B, 1, 1, Nk]``; query ``i`` is token ``Nk - Nq + i``); causality is top-left.
    None for any other mask (which pairs are padding is then not known)."""
    batch, nq, nk = q.shape[0], q.shape[-2], k.shape[-2]
    mask = mods.mask
    if mask is not None and (mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1):
        return None
    real = torch.ones(batch, nk, device=q.device) if mask is None else mask.reshape(-1, nk).float().expand(batch, nk)
    if mods.causal:
        seen = real.cumsum(-1)[:, :nq]                           # top-left: query i sees keys 0..i
        if nq > nk:
            seen = torch.cat([seen, seen[:, -1:].expand(batch, nq - nk)], dim=-1)
    else:
        seen = real.sum(-1, keepdim=True).expand(batch, nq)
    rows = real[:, nk - nq:] if nq <= nk else torch.ones(batch, nq, device=q.device)
    return (seen * rows).sum(-1, keepdim=True)


def head_ranges(heads: Sequence[int]) -> str:
    """Ascending heads as runs: ``(0, 1, 2, 5)`` -> ``0-2,5``."""
    runs: list[list[int]] = []
    for head in heads:
        if runs and head == runs[-1][1] + 1:
            runs[-1][1] = head
        else:
            runs.append([head, head])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def heads_label(heads: Sequence[int]) -> str:
    """``head 3`` or ``heads 0-1,4``, for reasons."""
    return f"head {heads[0]}" if len(heads) == 1 else f"heads {head_ranges(heads)}"


def compact_variant_text(text: str) -> str:
    """``text`` for a table cell: a ``heads(...)`` text as ``heads: 0-1 exact, 2-3 topk(...)``, others as they
    are."""
    if not text.startswith("heads("):
        return text
    from attncc.variants.parse import parse_variant

    try:
        spec = parse_variant(text)
    except AttnccError:
        return text
    return spec.compact() if isinstance(spec, HeadsSpec) else text


__all__ = ["HeadsSpec", "compact_variant_text", "group_site", "head_mods", "head_ranges", "heads_label",
           "whole_kv_groups"]
