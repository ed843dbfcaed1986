"""The in-place writes check: a site is refused when a write could make the rewritten op read other values
than the model did."""

from __future__ import annotations

import torch.fx as fx

from attncc.passes.detect.decline import Decline, op_name
from attncc.passes.effects import Aliases, written_nodes, writes
from attncc.site import AttentionSite


class WritesCheck:
    """Refuses a site when an in-place write could make the rewritten op read different values.

    The op is inserted at the site's output and reads q, k, v, the masks and biases there; the model read each
    of them earlier, where the site first consumed it (the score product, a mask step, the projection of q
    ...). A write into the memory of one of those tensors between that first use and the output would be seen
    by the op and not by the model. Writes before the first use (keys assembled by slice assignment, a cache
    updated in place) are seen by both and are fine.
    """

    def __init__(self, graph: fx.Graph):
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self.writers = [n for n in graph.nodes if writes(n)]
        self.aliases = Aliases(graph) if self.writers else None

    def check(self, site: AttentionSite, anchor: fx.Node) -> None:
        if not self.writers:
            return
        reads = _values_read(site)
        first = min(self.order[r] for r in reads)
        end = self.order[site.output]
        between = [w for w in self.writers if first < self.order[w] < end]
        if not between:
            return
        consumers = self._consumers_before(site.output, first)
        for r in reads:
            uses = [self.order[u] for u in r.users if u in consumers or _folded_write(u, r, consumers)]
            start = min(uses) if uses else self.order[r]
            for w in between:
                if self.order[w] <= start:
                    continue
                written = written_nodes(w)
                if written is None or any(self.aliases.overlap(t, r) for t in written):
                    raise Decline(f"in-place {op_name(w)} may change {r.name} after the attention read it and "
                                  "before its output (the rewritten op would read the changed value)", anchor)

    def _consumers_before(self, output: fx.Node, first: int) -> set[fx.Node]:
        """The output and the nodes it is computed from, back to position ``first``."""
        seen = {output}
        stack = [output]
        while stack:
            for n in stack.pop().all_input_nodes:
                if n not in seen and self.order[n] >= first:
                    seen.add(n)
                    stack.append(n)
        return seen


def _folded_write(node: fx.Node, value: fx.Node, consumers: set[fx.Node]) -> bool:
    """Whether ``node`` reads ``value`` as an unused in-place write of a tensor the output is computed from:
    a score step the detector read off a write nobody uses (``s.masked_fill_(m, v)`` reads m where it runs)."""
    written = written_nodes(node) or ()
    return not node.users and value not in written and any(t in consumers for t in written)


def _values_read(site: AttentionSite) -> list[fx.Node]:
    """Every node whose value the rewritten op reads or may read: q, k, v, multipliers, the mask and bias
    nodes, and what those are computed from (mask analysis may hand the op a part of a mask instead)."""
    direct = [site.q, site.k, site.v, *(f for _, f in site.q_multipliers), site.sdpa_mask,
              *(s.node for s in site.steps)]
    reads = [n for n in direct if isinstance(n, fx.Node)]
    masks = [n for n in (site.sdpa_mask, *(s.node for s in site.steps if s.kind != "reshape"))
             if isinstance(n, fx.Node)]
    seen = set(reads)
    while masks:
        for n in masks.pop().all_input_nodes:
            if n not in seen:
                seen.add(n)
                reads.append(n)
                masks.append(n)
    return reads
