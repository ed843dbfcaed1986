"""The variant registry: variant name -> spec class, filled by ``@register_variant`` on each family's spec.

A variant family is one module of the ``attncc.variants`` package whose spec class is decorated::

    @register_variant
    @dataclass(frozen=True)
    class LocalSpec(VariantSpec):
        name: ClassVar[str] = "local"
        ...

Discovery imports every module of the package (``pkgutil``) the first time the registry is read, so a new
family file is found without editing a list. A test (or a user's plugin) can add a family for a while with
``registered_variant(cls)``, a context manager that removes it again. The text parser, policies and the
planner all read this registry, so a registered family is usable everywhere a variant name is.
"""

from __future__ import annotations

import importlib
import pkgutil
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator, Optional

from attncc.errors import AttnccError
from attncc.variants.base import VariantSpec

_FAMILIES: dict[str, type[VariantSpec]] = {}
"""Registered families by name, in registration order (``variant_classes`` sorts them by ``listed``)."""


def register_variant(cls: type[VariantSpec]) -> type[VariantSpec]:
    """Class decorator: make ``cls`` (a :class:`VariantSpec` subclass with a ``name``) the family of
    ``cls.name``. Registering the same class again is a no-op (a module reload); another class under a taken
    name is an error."""
    if not (isinstance(cls, type) and issubclass(cls, VariantSpec)) or not cls.name:
        raise AttnccError(f"register_variant: {cls!r} is not a VariantSpec subclass with a name")
    taken = _FAMILIES.get(cls.name)
    if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
        raise AttnccError(
            f"register_variant: the name {cls.name!r} is taken by {taken.__module__}.{taken.__qualname__}")
    _FAMILIES[cls.name] = cls
    _forget_parsed_texts()
    return cls


def unregister_variant(name: str) -> None:
    """Remove the family ``name`` (nothing happens when it is not registered)."""
    _FAMILIES.pop(name, None)
    _forget_parsed_texts()


@contextmanager
def registered_variant(cls: type[VariantSpec]) -> Iterator[type[VariantSpec]]:
    """Register ``cls`` for the ``with`` block and remove it afterwards (tests, experiments)::

        with registered_variant(StridedSpec):
            attncc.compile(model, "strided(step=2)", inputs)
    """
    discover()  # the built-in families first, so that leaving the block cannot drop one of them
    if cls.name in _FAMILIES:
        raise AttnccError(
            f"registered_variant: {cls.name!r} is registered already (by {_FAMILIES[cls.name].__module__})")
    register_variant(cls)
    try:
        yield cls
    finally:
        unregister_variant(cls.name)


def variant_classes() -> dict[str, type[VariantSpec]]:
    """Name -> spec class of every registered family, ordered by ``VariantSpec.listed`` (then registration)."""
    discover()
    ordered = sorted(enumerate(_FAMILIES.values()), key=lambda item: (item[1].listed, item[0]))
    return {cls.name: cls for _, cls in ordered}


def variant_class(name: str) -> Optional[type[VariantSpec]]:
    """The spec class registered as ``name``, None when there is none."""
    discover()
    return _FAMILIES.get(name)


def discover() -> None:
    """Import every module of the ``attncc.variants`` package once, so each family's decorator has run."""
    import_modules_of("attncc.variants")


@lru_cache(maxsize=None)
def import_modules_of(package: str) -> None:
    """Import every module of the package named ``package``, once per process (what a registry's discovery
    does: the registering decorators run on import)."""
    path = importlib.import_module(package).__path__
    for module in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{module.name}")


def _forget_parsed_texts() -> None:
    """Drop ``parse_variant``'s cache: a text it parsed (or refused) may name a family that came or went."""
    from attncc.variants.parse import parse_variant

    parse_variant.cache_clear()


__all__ = ["discover", "import_modules_of", "register_variant", "registered_variant", "unregister_variant",
           "variant_class", "variant_classes"]
