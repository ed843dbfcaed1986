"""A bounded KV cache for generating under ``local(window=W, sinks=S)``: StreamingLLM eviction.

``SinkWindowCache(window=W, sinks=S)`` is a transformers ``Cache`` whose layers keep the first ``S`` keys and
values (the attention sinks) and the last ``W``, and drop the ones in between, so memory stays constant however
many tokens are generated::

    cm = attncc.compile(model, "local(window=256, sinks=4)")
    out = cm.generate(ids, max_new_tokens=8192, cache=SinkWindowCache(window=256, sinks=4))

Why this is exact for that policy: a decode query at position ``p`` attends keys ``p - W .. p`` and ``0 .. S-1``
(``attncc.variants.local``). After each step a layer holds the sinks and the ``W`` keys before the next query,
and ``update`` returns them with the new keys: the query is the last of those (bottom-right alignment), so its
window is the returned tail and its sinks the returned head, exactly the keys it would see in the full cache.
Positions keep counting (``get_seq_length`` is the number of tokens seen, which transformers turns into
``cache_position`` and the rotary positions), and rotary embeddings are applied to keys before they are cached,
so an evicted cache changes no retained key. Under any other policy (``exact`` included) the evicted keys are
simply gone: the model then sees only the sinks and the window, which is StreamingLLM's approximation, not
the original model.

A prefill longer than ``S + W`` attends the whole prompt (``update`` returns every key of the call) and keeps
only the sinks and the window afterwards.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

from attncc.errors import AttnccError


class SinkWindowLayer(DynamicLayer):
    """One layer's keys and values ``[B, Hkv, n, D]``, at most ``sinks + window`` long after each update."""

    is_sliding = False

    def __init__(self, window: int, sinks: int = 0):
        super().__init__()
        self.window = window
        self.sinks = sinks
        self.cumulative_length = 0
        """Tokens seen so far (the positions keep counting after eviction)."""

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append ``key_states``/``value_states`` ``[B, Hkv, Nq, D]``; return every key and value this call's
        queries may see (the kept ones, then the new ones), and keep only the sinks and the last ``window``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.keys, self.values = self._evicted(keys), self._evicted(values)
        return keys, values

    def _evicted(self, x: Tensor) -> Tensor:
        """The first ``sinks`` and the last ``window`` rows of ``x [..., n, D]`` (all of them when n is at most
        ``sinks + window``). Written without a branch on n, so a graph captured with a dynamic length stays valid
        before and after eviction starts."""
        n = x.shape[-2]
        start = torch.sym_max(self.sinks, n - self.window)
        return torch.cat([x[..., : self.sinks, :], x[..., start:, :]], dim=-2)

    def get_seq_length(self) -> int:
        """Tokens seen so far (not the number kept): transformers derives positions from it."""
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for the mask: the kept keys plus the new ones, placed so that the kept ones
        end right before the queries (every kept key is in the past of every query)."""
        kept = self.keys.shape[-2] if self.is_initialized else 0
        return kept + query_length, self.cumulative_length - kept

    def get_max_length(self) -> int:
        return self.sinks + self.window

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise AttnccError("SinkWindowCache cannot be cropped (evicted tokens cannot be restored): assisted and "
                          "speculative decoding need a full cache")


class SinkWindowCache(Cache):
    """A transformers ``Cache`` keeping, per layer, the first ``sinks`` and the last ``window`` keys/values
    (StreamingLLM); for ``local(window=window, sinks=sinks)`` generation gives the tokens of the full cache.

    Args:
        window: keys kept before the newest query (the ``window`` of the ``local`` policy), >= 1.
        sinks: leading keys kept for ever (the ``sinks`` of the policy), >= 0.

    Example::

        cache = attncc.kv_cache.SinkWindowCache(window=256, sinks=4)
        cm.generate(ids, max_new_tokens=4096, cache=cache)  # (past_key_values=cache also works; transformers 5.24 deprecates it)
    """

    def __init__(self, window: int, sinks: int = 0):
        for name, value, minimum in (("window", window, 1), ("sinks", sinks, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise AttnccError(f"SinkWindowCache: {name} must be an integer >= {minimum}, got {value!r}")
        self.window = window
        self.sinks = sinks
        super().__init__(layer_class_to_replicate=self._new_layer)

    def _new_layer(self) -> SinkWindowLayer:
        return SinkWindowLayer(self.window, self.sinks)

    def __repr__(self) -> str:
        return f"SinkWindowCache(window={self.window}, sinks={self.sinks}, layers={len(self.layers)})"


__all__ = ["SinkWindowCache", "SinkWindowLayer"]
