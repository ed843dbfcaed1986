"""One call of the attncc op: its fields, defined once.

``AttentionCall`` is the op's argument list as a dataclass: the custom op's signature (hence its schema),
the autograd glue (what to save, which inputs get gradients, the gradient tuple in schema order) and the
rewrite pass (the keyword arguments a graph node needs) all derive from these fields, so adding an argument
to the op is one line here.

The op's schema is stored in graphs and exported programs, so field names, order, types and defaults must not
change; append new fields at the end with a default (a call that omits them then means what it meant before).
"""

import dataclasses
import inspect
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from torch import Tensor

from attncc.variants.base import ScoreMods

GRAD = {"grad": True}
"""Field metadata of the inputs autograd differentiates (floating tensors: q, k, v, bias, sinks)."""


@dataclass(frozen=True, eq=False)
class AttentionCall:
    """The arguments of ``torch.ops.attncc.attention``, in schema order.

    Tensor fields hold tensors when the op runs and ``fx.Node`` values when the rewrite pass builds the call.
    Shapes: q ``[*batch, Nq, Dqk]``, k ``[*batch_kv, Nk, Dqk]``, v ``[*batch_kv, Nk, Dv]``; bias (float) and mask
    (bool, True = attend) broadcast to ``[*batch, Nq, Nk]``; ``segments`` int64 ``[nW, N]``; ``sinks`` float
    ``[Hq]`` or ``[1]``; ``dropout_seed`` an int64 scalar tensor.
    """

    q: Tensor = field(metadata=GRAD)
    k: Tensor = field(metadata=GRAD)
    v: Tensor = field(metadata=GRAD)
    bias: Optional[Tensor] = field(default=None, metadata=GRAD)
    mask: Optional[Tensor] = None
    scale: float = 1.0
    causal: bool = False
    softcap: float = 0.0
    dropout_p: float = 0.0
    dropout_seed: Optional[Tensor] = None
    variant: str = "exact"
    """The variant's canonical text (``"exact"``, ``"local(window=256)"``)."""
    fallback: str = "exact"
    """The variant run while the key length is below ``min_len`` (and for several documents in a row)."""
    min_len: int = 0
    segments: Optional[Tensor] = None
    """Region or document labels; row r of q uses row ``r % nW``."""
    segment_fill: float = 0.0
    """What is added to the scores between tokens of different regions (``-inf``: documents)."""
    sinks: Optional[Tensor] = field(default=None, metadata=GRAD)

    # -- the custom op's side ----------------------------------------------------------------------------------

    @classmethod
    def op_signature(cls) -> inspect.Signature:
        """The op function's signature: one parameter per field with its type and default, returning a Tensor
        (``torch.library.custom_op`` infers the schema from it)."""
        hints = typing.get_type_hints(cls)
        params = [
            inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hints[f.name],
                              default=inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default)
            for f in fields(cls)
        ]
        return inspect.Signature(params, return_annotation=Tensor)

    def tensors(self) -> tuple[Optional[Tensor], ...]:
        """The tensor fields in schema order (what backward saves); ``from_saved`` inverts it."""
        return tuple(getattr(self, name) for name in _TENSOR_FIELDS)

    def options(self) -> tuple[Any, ...]:
        """The other fields in schema order (plain Python values, kept on the autograd context)."""
        return tuple(getattr(self, name) for name in _OPTION_FIELDS)

    @classmethod
    def from_saved(cls, tensors: tuple, options: tuple) -> "AttentionCall":
        """The call ``tensors()`` and ``options()`` were taken from."""
        return cls(**dict(zip(_TENSOR_FIELDS, tensors)), **dict(zip(_OPTION_FIELDS, options)))

    def differentiable(self) -> dict[str, Optional[Tensor]]:
        """``{name: tensor}`` of the inputs autograd may differentiate, in schema order."""
        return {name: getattr(self, name) for name in DIFFERENTIABLE}

    @staticmethod
    def grads(by_name: dict[str, Optional[Tensor]]) -> tuple[Optional[Tensor], ...]:
        """One gradient per op input in schema order (None for the ones not in ``by_name``)."""
        return tuple(by_name.get(f.name) for f in fields(AttentionCall))

    def replace(self, **changes) -> "AttentionCall":
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def score_mods(self) -> ScoreMods:
        """What this call does to the scores, as the variants take it (``sinks`` as given: dispatch reshapes)."""
        return ScoreMods(scale=self.scale, causal=self.causal, softcap=self.softcap, bias=self.bias, mask=self.mask,
                         sinks=self.sinks, dropout_p=self.dropout_p, dropout_seed=self.dropout_seed)

    # -- the rewrite pass's side -------------------------------------------------------------------------------

    def op_arguments(self) -> tuple[tuple, dict[str, Any]]:
        """``(args, kwargs)`` for a graph node calling the op: the required fields (q, k, v) positionally, the
        others by keyword and only where they differ from the default (graphs stay short and readable)."""
        args = tuple(getattr(self, f.name) for f in fields(self) if f.default is dataclasses.MISSING)
        kwargs = {}
        for f in fields(self):
            if f.default is dataclasses.MISSING:
                continue
            value = getattr(self, f.name)
            if (value is not None) if f.default is None else (value != f.default):
                kwargs[f.name] = value
        return args, kwargs


FIELD_NAMES = tuple(f.name for f in fields(AttentionCall))
"""The op's argument names in schema order."""
DIFFERENTIABLE = tuple(f.name for f in fields(AttentionCall) if f.metadata.get("grad"))
_TENSOR_FIELDS = tuple(name for name, hint in typing.get_type_hints(AttentionCall).items()
                       if hint in (Tensor, Optional[Tensor]))
_OPTION_FIELDS = tuple(name for name in FIELD_NAMES if name not in _TENSOR_FIELDS)
