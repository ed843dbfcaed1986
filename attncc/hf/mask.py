"""The mask side of the Hugging Face integration: transformers' mask functions read as structure.

transformers 5.x builds every attention mask through one call, ``ALL_MASK_ATTENTION_FUNCTIONS[impl](...)``, with
the pattern as a Python function of indices (``mask_function``: ``causal_mask_function``, an ``and_masks`` of a
sliding-window overlay and causality, ``bidirectional_mask_function``), the 2-D padding mask, and the positions of
the first query and key (``q_offset``, ``kv_offset``; decode with a KV cache has ``q_offset > 0``). The sdpa and
eager interfaces evaluate that function into a ``[B, 1, Nq, Nk]`` tensor. Registered for ``"attncc"``,
``structured_mask`` evaluates nothing: it reads the function it is given and returns a ``MaskStructure``
(causal, the sliding-window band, the ``[B, Nk]`` padding mask and the offsets), which the model hands unchanged
to the attention function. A mask function it cannot read (packed sequences, image-token overlays, chunked
attention) is evaluated as the sdpa interface would and carried as a dense bool mask, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor
from transformers import masking_utils as mu

from attncc.errors import AttnccError

Band = tuple[float, float]
"""``(left, right)``: query i (at position p) sees keys at positions ``p - left .. p + right``."""

# transformers builds these closures inside factory functions: a closure is recognized by its code object.
_AND_MASKS = mu.and_masks(mu.causal_mask_function).__code__
_SLIDING_OVERLAY = mu.sliding_window_overlay(1).__code__
_SLIDING_BIDIRECTIONAL_OVERLAY = mu.sliding_window_bidirectional_overlay(1).__code__


@dataclass(frozen=True, eq=False)
class MaskStructure:
    """One layer's attention mask as structure, what the ``"attncc"`` mask interface hands the attention function.

    Positions: query row i is at position ``q_offset + i``, key column j at ``kv_offset + j`` (a KV cache puts the
    new queries after the cached keys; a sliding-window cache drops keys before ``kv_offset``).

    Attributes:
        causal: key position <= query position only.
        band: ``(left, right)`` or None: key positions within ``[p - left, p + right]`` of the query's ``p``
            (``sliding_window=W`` on a causal model is ``(W - 1, 0)``).
        padding: bool ``[B, kv_length]`` (True = a real token) for the keys of this call, or None.
        q_length, kv_length: the sizes transformers expects q and k to have.
        q_offset, kv_offset: positions of the first query and the first key.
        dense: bool ``[B, 1, q_length, kv_length]`` (True = attend) where the mask function is not one this module
            reads as structure; it then holds the whole mask (padding and causality included).
        why_dense: what the mask function was, when ``dense`` is set.
    """

    causal: bool
    band: Optional[Band]
    padding: Optional[Tensor]
    q_length: int
    kv_length: int
    q_offset: int = 0
    kv_offset: int = 0
    dense: Optional[Tensor] = None
    why_dense: str = ""

    ndim = 4
    """Read by transformers: ``generate`` with a static cache builds the masks once and hands them back to the
    model as ``attention_mask``, where ``create_causal_mask`` asks ``attention_mask.ndim == 2`` (a 2-D padding
    mask?); 4 lets the structure through to ``structured_mask``, which returns it as it is."""

    def describe(self) -> str:
        """The structure in the report's words (``causal+window 4+padding``, ``dense (packed sequences)``)."""
        if self.dense is not None:
            return f"dense ({self.why_dense})"
        parts = ["causal"] if self.causal else []
        if self.band is not None:
            parts.append(f"window {int(self.band[0]) + 1}" if self.causal else f"band {self.band}")
        if self.padding is not None:
            parts.append("padding")
        return "+".join(parts) or "none"


def structured_mask(
    batch_size: int, q_length: int, kv_length: int, q_offset: Union[int, Tensor] = 0,
    kv_offset: Union[int, Tensor] = 0, mask_function: Callable = mu.causal_mask_function,
    attention_mask: Optional[Tensor] = None, **kwargs,
) -> MaskStructure:
    """transformers' mask interface for ``"attncc"`` (the signature of ``masking_utils.sdpa_mask``).

    Args:
        batch_size, q_length, kv_length: the sizes of the coming attention call.
        q_offset, kv_offset: positions of the first query and key (ints; a static cache passes 0-d tensors).
        mask_function: transformers' index function of the pattern.
        attention_mask: the 2-D padding mask ``[B, >= kv_offset + kv_length]`` (bool, True = a real token) or None.
        kwargs: the rest of transformers' arguments (``use_vmap``, ``device`` ... used only for a dense mask).

    Returns:
        a ``MaskStructure``; never an ``Nq x Nk`` tensor unless the pattern is not causal/window/bidirectional.
    """
    if isinstance(attention_mask, MaskStructure):  # built in advance (generate with a static cache)
        if (attention_mask.q_length, attention_mask.kv_length) != (q_length, kv_length):
            raise AttnccError(f"attncc.hf: a mask built in advance for {attention_mask.q_length} queries and "
                              f"{attention_mask.kv_length} keys was given for {q_length} and {kv_length}")
        return attention_mask
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    padding = None
    if attention_mask is not None:
        padded = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        padding = padded[:, kv_offset:kv_offset + kv_length].to(torch.bool)
    read = read_mask_function(mask_function)
    if read is None:
        dense = mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                             kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                             allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
                             use_vmap=kwargs.get("use_vmap", False), device=kwargs.get("device", "cpu"))
        name = getattr(mask_function, "__qualname__", type(mask_function).__name__)
        return MaskStructure(False, None, None, q_length, kv_length, q_offset, kv_offset, dense=dense,
                             why_dense=f"mask function {name} is not causal/sliding-window/bidirectional")
    causal, band = read
    return MaskStructure(causal, band, padding, q_length, kv_length, q_offset, kv_offset)


def read_mask_function(fn: Callable) -> Optional[tuple[bool, Optional[Band]]]:
    """``(causal, band)`` of one of transformers' own mask functions, None for any other function.

    Reads ``causal_mask_function``, ``bidirectional_mask_function``, ``sliding_window_overlay(W)`` (keys
    ``kv > q - W``: band left ``W - 1``), ``sliding_window_bidirectional_overlay(W)`` (``|q - kv| <= W``) and
    ``and_masks`` of those (how ``sliding_window_causal_mask_function`` is built); an ``or_masks``, a packed-sequence
    or chunked overlay, or a user's function is not structure.
    """
    if fn is mu.causal_mask_function:
        return True, None
    if fn is mu.bidirectional_mask_function:
        return False, None
    code = getattr(fn, "__code__", None)
    captured = _closure(fn)
    if code is _SLIDING_OVERLAY:
        return False, (captured["sliding_window"] - 1, float("inf"))
    if code is _SLIDING_BIDIRECTIONAL_OVERLAY:
        return False, (captured["sliding_window"], captured["sliding_window"])
    if code is not _AND_MASKS:
        return None
    causal, band = False, None
    for part in captured["mask_functions"]:
        read = read_mask_function(part)
        if read is None:
            return None
        causal = causal or read[0]
        band = read[1] if band is None else band if read[1] is None else \
            (min(band[0], read[1][0]), min(band[1], read[1][1]))
    if band is not None and causal:
        band = (band[0], 0)
    if band is not None and band[1] == float("inf"):
        return None  # a one-sided window without causality: not a band the op takes
    return causal, band


def _closure(fn: Callable) -> dict:
    """The variables a closure captured, by name ({} for a plain function)."""
    cells = getattr(fn, "__closure__", None) or ()
    names = getattr(getattr(fn, "__code__", None), "co_freevars", ())
    return {name: cell.cell_contents for name, cell in zip(names, cells)}


__all__ = ["MaskStructure", "read_mask_function", "structured_mask"]
