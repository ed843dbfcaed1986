"""Variant families. Each module holds a spec, a plain reference, an efficient torch path, a cost and supports()."""

from attncc.variants.exact import ExactSpec

VARIANTS = {"exact": ExactSpec}

__all__ = ["ExactSpec", "VARIANTS"]
