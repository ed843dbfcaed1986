"""Variant families. Each module holds a spec, a plain reference, an efficient torch path, a cost, supports()
and specialize(); its spec class registers itself with ``@register_variant`` (see ``registry``).

``VARIANTS`` maps the name used in policies (``"local(window=256)"``) to the spec class. The families are
imported on first use of the registry (every module of this package), so importing one variant module does
not import the others.
"""

from __future__ import annotations

from attncc.variants.base import ScoreMods, VariantSpec
from attncc.variants.exact import exact_spec
from attncc.variants.registry import (
    register_variant, registered_variant, unregister_variant, variant_class, variant_classes,
)


def __getattr__(name: str):
    if name == "VARIANTS":
        return variant_classes()
    raise AttributeError(f"module 'attncc.variants' has no attribute {name!r}")


__all__ = ["VARIANTS", "ScoreMods", "VariantSpec", "exact_spec", "register_variant", "registered_variant",
           "unregister_variant", "variant_class", "variant_classes"]
