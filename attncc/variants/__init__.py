"""Variant families. Each module holds a spec, a plain reference, an efficient torch path, a cost and supports().

``VARIANTS`` maps the name used in policies (``"local(window=256)"``) to the spec class. The families are
imported on first use, so importing one variant module does not import the others.
"""

from __future__ import annotations

from functools import lru_cache

from attncc.variants.base import ScoreMods, VariantSpec


@lru_cache(maxsize=1)
def variant_classes() -> dict[str, type[VariantSpec]]:
    """Name -> spec class of every variant family."""
    from attncc.variants.block_sparse import BlockSparseSpec
    from attncc.variants.exact import ExactSpec
    from attncc.variants.linear import LinearSpec
    from attncc.variants.local import LocalSpec
    from attncc.variants.neighborhood import NeighborhoodSpec
    from attncc.variants.topk import TopKSpec

    families = (ExactSpec, LocalSpec, NeighborhoodSpec, BlockSparseSpec, TopKSpec, LinearSpec)
    return {spec.name: spec for spec in families}


def __getattr__(name: str):
    if name == "VARIANTS":
        return variant_classes()
    raise AttributeError(f"module 'attncc.variants' has no attribute {name!r}")


__all__ = ["VARIANTS", "ScoreMods", "VariantSpec", "variant_classes"]
