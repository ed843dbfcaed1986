"""The mask interpreter's rules (``attncc.passes.masks.MASK_RULES``), one test each on the smallest graph using it.

Each test traces a few tensor operations that build a mask the way a model does, reads the last one with a
``MaskInterpreter``, and checks which rule read it (``interp.fired``) and the abstract value it computed. Index
tensors are ``Affine`` (``const + sum(coef * index[dim])``, dims counted from the right); bool masks are ``Pred``
(an AND of ``affine <= 0`` atoms, document labels and residual nodes). ``test_every_rule_has_a_test`` fails when
a rule joins the table without a ``test_rule_<name>`` here.

The end-to-end forms these rules serve are in ``test_masks.py`` (HF-style index masks, padding, windows) and
``test_forms.py`` (buffer slices, ``where``/``masked_fill`` spellings).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from attncc.frontend import CallArgs, propagate_fake_values, try_symbolic_trace
from attncc.passes import canonicalize, detect_sites
from attncc.passes.effects import Aliases
from attncc.passes.masks import (
    MASK_RULES, Affine, Atom, Gathered, MaskInterpreter, Pred, site_findings, structure_of,
)
from attncc.site import MaskFacts

B, N = 2, 5


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, m):
        return self.fn(x, m)


def read(fn, x=None, m=None):
    """(interpreter, the value of fn's result node, that node): ``fn(x, m)`` traced with fake values."""
    x = torch.randn(B, N) if x is None else x
    m = torch.ones(B, N, dtype=torch.long) if m is None else m
    gm = fx.symbolic_trace(Fn(fn))
    propagate_fake_values(gm, CallArgs((x, m), {}))
    result = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    interp = MaskInterpreter(Aliases(gm.graph))
    return interp, interp.value(result), result


def placeholder(node: fx.Node, name: str) -> fx.Node:
    return next(n for n in node.graph.nodes if n.op == "placeholder" and n.target == name)


def index(dim: int, ndim: int, const: int = 0) -> Affine:
    """The index along ``dim`` (negative) of an ``ndim``-D tensor, plus ``const``."""
    return Affine(((dim, 1),), const, ndim)


def arange(x, dim=1):
    """``arange`` over a length read from the traced input (one with a constant length would be a constant)."""
    return torch.arange(x.size(dim))


def q_idx(x):   # [N, 1]: the query index (dim -2)
    return arange(x)[:, None]


def kv_idx(x):  # [1, N]: the key index (dim -1)
    return arange(x)[None, :]


# ----------------------------------------------------------------------------------------- one per rule
def test_rule_arange():
    interp, value, node = read(lambda x, m: arange(x))
    assert interp.fired[node] == "arange"
    assert value == index(-1, 1)
    _, offset, _ = read(lambda x, m: torch.arange(2, x.size(1)))
    assert offset == index(-1, 1, const=2)


def test_rule_add_sub():
    interp, value, node = read(lambda x, m: arange(x) - 3)
    assert interp.fired[node] == "add_sub"
    assert value == index(-1, 1, const=-3)
    _, added, _ = read(lambda x, m: arange(x) + arange(x))
    assert added == Affine(((-1, 2),), 0, 1)


def test_rule_index_view():
    interp, value, node = read(lambda x, m: arange(x)[None, :, None])
    assert interp.fired[node] == "index_view"
    assert value == index(-2, 3)
    _, ellipsis, _ = read(lambda x, m: arange(x)[..., None])
    assert ellipsis == index(-2, 2)


def test_rule_affine_gather():
    # position_ids[batch_idx, q_idx] with position_ids = arange expanded over the batch: the query index itself
    def position_of_query(x, m):
        positions = arange(x)[None, :].expand(B, N)
        return positions[arange(x, 0)[:, None, None], arange(x)[None, :, None]]

    interp, value, node = read(position_of_query)
    assert interp.fired[node] == "affine_gather"
    assert value == index(-2, 3)


def test_rule_tensor_gather():
    interp, value, node = read(lambda x, m: m[arange(x, 0)[:, None], arange(x)[None, :]])
    assert interp.fired[node] == "tensor_gather"
    assert value == Gathered(placeholder(node, "m"), (-2, -1))


def test_rule_tensor_gather_needs_plain_indices():
    interp, value, node = read(lambda x, m: m[arange(x, 0)[:, None], arange(x)[None, :] - 1])
    assert interp.fired[node] == "tensor_gather" and value is None


def test_rule_unsqueeze():
    interp, value, node = read(lambda x, m: arange(x).unsqueeze(0))
    assert interp.fired[node] == "unsqueeze"
    assert value == index(-1, 2)
    _, last, _ = read(lambda x, m: arange(x).unsqueeze(-1))
    assert last == index(-2, 2)


def test_rule_compare():
    interp, value, node = read(lambda x, m: kv_idx(x) <= q_idx(x))
    assert interp.fired[node] == "compare"
    assert value == Pred(atoms=(Atom(Affine(((-2, -1), (-1, 1)), 0, 2), node),))   # j - i <= 0
    assert structure_of(value).right == 0  # causal


def test_rule_compare_window():
    interp, value, node = read(lambda x, m: kv_idx(x) > q_idx(x) - 3)
    assert interp.fired[node] == "compare"
    structure = structure_of(value)
    assert (structure.left, structure.right) == (2, None)   # j >= i - 2: a window of 3 keys


def test_rule_same_document():
    def same_document(x, m):
        b = arange(x, 0)[:, None, None]
        return m[b, arange(x)[None, :, None]] == m[b, arange(x)[None, None, :]]

    interp, value, node = read(same_document)
    assert interp.fired[node] == "same_document"
    assert value == Pred(documents=(placeholder(node, "m"),))


def test_rule_and():
    interp, value, node = read(lambda x, m: (kv_idx(x) <= q_idx(x)) & (q_idx(x) >= 0))
    assert interp.fired[node] == "and"
    assert len(value.atoms) == 2 and not value.residuals
    structure = structure_of(value)
    assert structure.right == 0 and not structure.residuals   # q_idx >= 0 always holds: dropped


def test_rule_and_keeps_what_it_does_not_read():
    interp, value, node = read(lambda x, m: (kv_idx(x) <= q_idx(x)) & torch.isfinite(x[0]))
    assert interp.fired[node] == "and"
    assert len(value.atoms) == 1 and value.residuals == (node.args[1],)


def test_rule_pass_through():
    interp, value, node = read(lambda x, m: (kv_idx(x) <= q_idx(x)).to(torch.bool))
    assert interp.fired[node] == "pass_through"
    assert value == interp.value(node.args[0]) and len(value.atoms) == 1
    _, cast, _ = read(lambda x, m: arange(x).long())
    assert cast is None  # ``long`` is not one of the pass-through spellings
    _, expanded, _ = read(lambda x, m: arange(x)[None, :].expand(B, N))
    assert expanded == index(-1, 2)


def test_rule_all_true():
    interp, value, node = read(lambda x, m: m.new_ones((), dtype=torch.bool))
    assert interp.fired[node] == "all_true"
    assert value == Pred()
    _, ones, _ = read(lambda x, m: torch.ones_like(x, dtype=torch.bool))
    assert ones == Pred()


def test_every_rule_has_a_test():
    names = [rule.name for rule in MASK_RULES]
    assert len(names) == len(set(names))
    untested = [name for name in names if f"test_rule_{name}" not in globals()]
    assert not untested, f"mask rules without a test_rule_<name>: {untested}"


# --------------------------------------------------------------------------------- outside the table
def test_no_rule_no_value():
    interp, value, node = read(lambda x, m: torch.isfinite(x))
    assert value is None and node not in interp.fired
    assert interp.pred(node) == Pred(residuals=(node,))


def test_a_rule_that_matches_but_does_not_understand_gives_none():
    interp, value, node = read(lambda x, m: x > 0)   # a comparison, but of data: not an index
    assert interp.fired[node] == "compare" and value is None


def test_a_written_mask_is_not_read_from_its_definition():
    def written(x, m):
        keep = torch.ones_like(x, dtype=torch.bool)
        keep[:, 0].fill_(False)
        return keep

    interp, value, node = read(written)
    assert value is None and node not in interp.fired


# --------------------------------------------------------------------------------- the site's findings
class Masked(nn.Module):
    def __init__(self, keep: torch.Tensor):
        super().__init__()
        self.register_buffer("keep", keep)

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.keep)


def findings(keep: torch.Tensor):
    q = torch.randn(1, 2, N, 4)
    gm = canonicalize(try_symbolic_trace(Masked(keep), CallArgs((q, q, q), {})))
    sites, _ = detect_sites(gm)
    return site_findings(gm, sites[0], MaskInterpreter(Aliases(gm.graph)))


def test_findings_of_a_constant_causal_window():
    band = torch.ones(N, N, dtype=torch.bool).tril() & ~torch.ones(N, N, dtype=torch.bool).tril(-3)
    found = findings(band)
    assert isinstance(found, MaskFacts)
    assert found.causal and found.band == (2, 0) and found.sdpa_mask is None and not found.keep_nodes


def test_findings_give_up_with_one_reason():
    assert findings(torch.eye(N, dtype=torch.bool) | torch.eye(N, dtype=torch.bool).flip(0)) \
        == "a constant mask that is not a band"
    assert findings(torch.ones(N, N, dtype=torch.bool).tril(1)) == "a band not anchored at the diagonal"
