"""Variant text <-> spec: ``"local(window=256, sinks=4)"`` becomes ``LocalSpec(window=256, sinks=4)``.

The text is a Python call expression with keyword arguments whose values are literals (numbers, strings,
tuples, None, True/False) or, for ``block_sparse``'s ``pattern``, a nested call of a pattern name. Nothing is
evaluated: the text is parsed with ``ast`` and only these forms are accepted, so a policy file cannot run code.
``str(spec)`` is the canonical text and parses back to an equal spec.
"""

from __future__ import annotations

import ast
from dataclasses import fields
from functools import lru_cache
from typing import Any

from attncc.errors import AttnccError


class UnknownName(AttnccError):
    """A variant or pattern name that is not registered; ``what`` ("variant" or "pattern") says which, so a
    caller that accepts more names (a policy also takes ``none``) can name its own choices."""

    def __init__(self, what: str, name: str, valid) -> None:
        self.what, self.name, self.valid = what, name, tuple(valid)
        super().__init__(f"unknown {what} {name!r}: valid {what}s are {', '.join(self.valid)}")


def _registry() -> dict[str, type]:
    from attncc.variants import variant_classes

    return variant_classes()


def _patterns() -> dict[str, type]:
    from attncc.variants.block_sparse import PATTERNS

    return PATTERNS


@lru_cache(maxsize=512)
def parse_variant(text: str):
    """The spec a variant text names.

    Example::

        parse_variant("local(window=256, sinks=4)")   # LocalSpec(window=256, left=None, ..., sinks=4)
        parse_variant("exact")                         # ExactSpec()

    Raises AttnccError naming the variant, the parameter and the valid choices when the text is wrong.
    """
    if not isinstance(text, str) or not text.strip():
        raise AttnccError(f"a variant must be a non-empty string such as 'local(window=256)', got {text!r}")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise AttnccError(f"cannot parse variant {text!r}: expected a call such as 'local(window=256, sinks=4)'") from None
    return _build(tree, _registry(), "variant", text)


def _build(node: ast.AST, registry: dict[str, type], what: str, text: str):
    if isinstance(node, ast.Name):
        name, keywords = node.id, []
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name, keywords = node.func.id, node.keywords
        if node.args:
            raise AttnccError(
                f"{name}: give parameters by name, e.g. {name}({_example(registry.get(name))}), in {text!r}"
            )
    else:
        raise AttnccError(f"cannot parse {what} {text!r}: expected a name or a call such as 'local(window=256)'")
    if name not in registry:
        raise UnknownName(what, name, registry)
    cls = registry[name]
    valid = [f.name for f in fields(cls) if f.init]
    kwargs: dict[str, Any] = {}
    for kw in keywords:
        if kw.arg is None:
            raise AttnccError(f"{name}: '**' is not allowed in {text!r}")
        if kw.arg not in valid:
            raise AttnccError(f"{name}: unknown parameter {kw.arg!r}; " + (
                f"valid parameters are {', '.join(valid)}" if valid else f"{name} takes no parameters"))
        kwargs[kw.arg] = _value(kw.value, name, kw.arg, text)
    return cls(**kwargs)


def _value(node: ast.AST, owner: str, field_name: str, text: str):
    if isinstance(node, (ast.Call, ast.Name)) and not (isinstance(node, ast.Name) and node.id in ("None", "True", "False")):
        if owner == "block_sparse" and field_name == "pattern":
            return _build(node, _patterns(), "pattern", text)
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise AttnccError(
            f"{owner}: {field_name} must be a literal (number, string, tuple, None), got {ast.unparse(node)!r}"
        ) from None


def _example(cls) -> str:
    if cls is None:
        return "..."
    names = [f.name for f in fields(cls) if f.init]
    return f"{names[0]}=..." if names else ""
