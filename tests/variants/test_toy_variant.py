"""A variant family defined in a test and added through the registry alone: ``strided(step=k)``, where query i
attends the keys j with ``(i - j) % k == 0``. Nothing else in attncc knows it; registered, it parses, meets
the variant contract, is planned onto a real model's sites and runs there on the torch path (it has no
kernel). Unregistered, it is gone again.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import sympy
import torch
from torch import Tensor

import attncc
import test_contract as contract
from attncc.errors import AttnccError
from attncc.variants import VariantSpec, registered_variant, variant_classes
from attncc.variants.base import (
    ScoreMods, attention_cost, check_int, check_self_attention, site_sizes, unapplied_site_features,
)
from attncc.variants.exact import masked_reference
from attncc.variants.parse import UnknownName, parse_variant

sys.path.insert(0, str(Path(__file__).parent.parent / "models"))  # the suite's tiny transformers models
from test_variants_on_models import hf_model  # noqa: E402


@dataclass(frozen=True)
class StridedSpec(VariantSpec):
    """Strided attention: query i sees keys i, i - step, i + step, ... (and the site's score mods on top)."""

    step: int  # no default: the text always shows it, strided(step=2)

    name: ClassVar[str] = "strided"

    def __post_init__(self):
        check_int(self, "step", self.step, minimum=1)

    @classmethod
    def examples(cls) -> tuple[VariantSpec, ...]:
        return cls(step=2), cls(step=3)

    @classmethod
    def exact_limit(cls, n: int) -> VariantSpec:
        return cls(step=1)

    def keep(self, n: int, device=None) -> Tensor:
        """The pattern as a dense ``[N, N]`` bool mask."""
        i = torch.arange(n, device=device)
        return (i[:, None] - i[None, :]) % self.step == 0

    def supports(self, site) -> tuple[bool, str]:
        if site.kind != "self" or site.q_len != site.kv_len:
            return False, "strided attention needs self-attention with as many queries as keys"
        reason = unapplied_site_features(self, site, band=True)
        return (False, reason) if reason else (True, f"every {self.step}th key")

    def cost(self, site) -> dict[str, sympy.Expr]:
        s = site_sizes(site)
        return attention_cost(site, s["Nq"] * sympy.ceiling(s["Nk"] / self.step))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
        return self.reference(q, k, v, mods)  # a toy: its torch path is its oracle

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
        n = check_self_attention(self, q, k, v)
        return masked_reference(q, k, v, mods, self.keep(n, q.device))


@pytest.fixture
def strided():
    with registered_variant(StridedSpec) as cls:
        yield cls
    assert "strided" not in variant_classes()


def test_strided_is_registered_only_inside_the_block():
    assert "strided" not in variant_classes()
    with registered_variant(StridedSpec):
        assert variant_classes()["strided"] is StridedSpec
        assert parse_variant("strided(step=3)") == StridedSpec(step=3)
        assert list(variant_classes())[-1] == "strided"  # listed after the built-in families
    assert "strided" not in variant_classes()
    with pytest.raises(UnknownName):
        parse_variant("strided(step=3)")  # parsed before, but the cache forgot it with the family
    with pytest.raises(AttnccError, match="unknown variant 'strided'"):
        attncc.Policy("strided(step=2)")


@pytest.mark.parametrize("check", [
    contract.test_forward_equals_reference, contract.test_gradients_through_forward_equal_the_reference,
    contract.test_canonical_text_parses_back,
])
def test_strided_meets_the_contract(strided, check):
    for spec in strided.examples():
        check(spec)
    contract.test_supports_declines_dropout_with_a_reason(strided)
    contract.test_degenerate_limit_is_exact(strided)


def test_strided_runs_end_to_end_on_llama(strided):
    torch._dynamo.reset()
    model = hf_model("llama", num_key_value_heads=2)
    n, step = 24, 2
    ids = torch.randint(0, 100, (2, n), generator=torch.Generator().manual_seed(1))
    padding = torch.ones(2, n, dtype=torch.long)
    padding[1, -5:] = 0
    inputs = {"input_ids": ids, "attention_mask": padding}
    cm = attncc.compile(model, f"strided(step={step})", inputs, strict=True)
    sites = cm.report().sites
    assert len(sites) == 2 and all(site.variant == f"strided(step={step})" for site in sites)
    assert all(site.flops_after < site.flops_before for site in sites)
    # the same model, given the strided pattern (with causality and padding) as its attention mask
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    mask4d = ((j <= i) & ((i - j) % step == 0))[None, None] & padding.bool()[:, None, None, :]
    with torch.no_grad():
        have = cm(**inputs).last_hidden_state
        want = model(input_ids=ids, attention_mask=mask4d).last_hidden_state
    real = padding.bool()
    torch.testing.assert_close(have[real], want[real], rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_a_taken_name_is_refused():
    class Impostor(StridedSpec):
        name: ClassVar[str] = "local"

    with pytest.raises(AttnccError, match="'local' is registered already"):
        with registered_variant(Impostor):
            pass
    assert variant_classes()["local"].__module__ == "attncc.variants.local"
