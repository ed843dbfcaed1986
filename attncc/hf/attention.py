"""The attention side of the Hugging Face integration: one transformers attention call as one attncc op call.

transformers calls ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, query, key, value,
attention_mask, dropout=, scaling=, **kwargs)`` from every attention module and expects ``(output, weights)`` with
the output ``[B, Nq, Hq, Dv]`` (``transformers.integrations.sdpa_attention.sdpa_attention_forward`` is the model).
``attncc_attention`` is that function for ``"attncc"``:

1. the module's record names it (``records``); the policy's plan for it comes from the same code the capture path
   runs (``attncc.passes.plan.plan_site`` on an ``AttentionSite`` of the call's facts), cached per set of facts;
2. the mask arrives as structure (``mask.MaskStructure``): causality and the model's own sliding window become op
   arguments, padding a ``[B, 1, 1, Nk]`` bool mask;
3. queries fewer than keys (decode with a KV cache, chunked prefill) are aligned explicitly, from the positions the
   mask interface was given: keys no query may see under causality are dropped, after which the last query is at
   the last key (bottom-right). One query inside the model's window then sees every key (``causal=False``);
   otherwise (several queries, or a window that hides keys) the visible pairs go to the op as a ``[Nq, Nk]`` bool
   mask. The op's ``causal`` flag is only passed when ``Nq == Nk`` at the same positions, where top-left and
   bottom-right alignment agree;
4. every argument is carried (``softcap``, ``s_aux`` as ``sinks``, ``position_bias`` as ``bias``, a caller's 4-D
   mask as ``mask``/``bias``, ``dropout`` as ``dropout_p``) or recorded and warned where it is not.

The plan is made with a symbolic length (``AttentionSite.q_len = kv_len = "N"`` for self-attention), so one
module runs the same variant in prefill and decode: the op is called the same way for every policy.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from attncc.errors import AttnccError
from attncc.hf.mask import MaskStructure
from attncc.hf.records import ModuleRecord, record_for
from attncc.passes.plan import plan_site
from attncc.policy import Policy
from attncc.runtime.call import AttentionCall
from attncc.runtime.ops import attention_op
from attncc.site import AttentionSite, SitePlan
from attncc.variants.exact import reference

TAKEN = frozenset({"dropout", "scaling", "is_causal", "softcap", "s_aux", "position_bias", "sliding_window"})
"""Keyword arguments of the attention interface that become op arguments (``sliding_window``: the mask structure
holds it, built from the same config value; without a mask it becomes the band)."""
NOT_ATTENTION = frozenset({"position_ids", "cache_position", "use_cache", "past_key_values", "past_key_value",
                           "layer_idx", "output_hidden_states", "return_dict", "token_type_ids",
                           "output_router_logits"})
"""Keyword arguments transformers forwards to every attention function that do not change attention (sdpa
ignores them too)."""


class _State:
    """The policy the registered function applies (set by ``attncc.hf.register``)."""

    policy: Optional[Policy] = None


STATE = _State()


def attncc_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float = 0.0,
    scaling: Optional[float] = None, **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention interface for ``attn_implementation="attncc"``.

    Args:
        module: the attention module (its name selects the policy's rule; ``is_causal`` when no mask is given).
        query: ``[B, Hq, Nq, D]``.
        key: ``[B, Hkv, Nk, D]`` with ``Hq % Hkv == 0`` (GQA stays grouped; no ``repeat_kv``).
        value: ``[B, Hkv, Nk, Dv]``.
        attention_mask: a ``MaskStructure`` (from the ``"attncc"`` mask interface), a 4-D bool/float tensor
            the caller built (carried exactly), or None (causal as ``is_causal`` / ``module.is_causal`` say).
        dropout: attention dropout probability (transformers passes 0 in eval mode).
        scaling: multiplier of ``q @ k^T`` (default ``1/sqrt(D)``).
        kwargs: ``softcap`` (Gemma 2), ``s_aux`` (learned sink logits ``[Hq]``, gpt-oss), ``position_bias``
            (additive float ``[B|1, Hq, Nq, Nk]``), ``is_causal``, ``sliding_window``; others are recorded.

    Returns:
        ``(output [B, Nq, Hq, Dv], None)``: attention weights are never materialized.
    """
    record = record_for(module)
    _note_other_arguments(record, kwargs)
    if STATE.policy is None:
        raise AttnccError("attncc.hf: a model with attn_implementation='attncc' ran after attncc.hf.unregister(); "
                          "call attncc.hf.register(policy) first")
    softcap = float(kwargs.get("softcap") or 0.0)
    sinks = kwargs.get("s_aux")
    if isinstance(attention_mask, MaskStructure):
        facts = _facts_from_structure(attention_mask, query.shape[-2], key.shape[-2], query.device)
    else:
        facts = _facts_from_tensor(record, module, attention_mask, query, key, kwargs.get("is_causal"),
                                   kwargs.get("sliding_window"))
    keys = facts["keys"]
    key, value = key[..., :keys, :], value[..., :keys, :]
    bias = _sum(kwargs.get("position_bias"), facts["bias"])
    bias = None if bias is None else bias[..., :keys]
    site = _site(module, query, key, value, facts, softcap=softcap, dropout=dropout, has_bias=bias is not None,
                 sinks=sinks)
    plan = _plan(record, site)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scaling is None else float(scaling)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64) if dropout > 0 else None
    # the op's fields by name (AttentionCall's, spelled out: torch.compile traces this without a graph break)
    fields = dict(bias=bias, mask=facts["mask"], scale=scale, causal=facts["op_causal"], softcap=softcap,
                  dropout_p=float(dropout), dropout_seed=seed, variant=str(plan.spec), fallback=str(plan.fallback),
                  min_len=plan.min_len, sinks=None if sinks is None else sinks.to(query.dtype))
    if plan.variant == "none":
        record.note("the policy says 'none' here: ran plain exact attention math (attncc's reference), not the op")
        out = _reference(AttentionCall(query, key, value, **fields))
        record.ran("none (reference math)", plan.reason, facts["described"])
    else:
        out = attention_op(query, key, value, **fields)  # [B, Hq, Nq, Dv]
        record.ran(str(plan.spec), plan.reason, facts["described"])
    return out.transpose(1, 2).contiguous(), None


def _sum(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return a if b is None else b if a is None else a + b


# -- the mask as op arguments -----------------------------------------------------------------------------------


def _facts_from_structure(structure: MaskStructure, nq: int, nk: int, device: torch.device) -> dict:
    """The op's mask arguments for one call from the mask structure, with explicit query/key alignment.

    Returns a dict: ``keys`` (how many leading keys any query may see), ``causal`` and ``band`` (the model's
    structure, as the plan sees it), ``op_causal`` (the op's flag), ``mask`` (bool, broadcast to
    ``[B, Hq, Nq, Nk]``, or None), ``bias`` (None), ``residual`` ('none'/'padding'/'dense') and ``described``.
    """
    if (nq, nk) != (structure.q_length, structure.kv_length):
        raise AttnccError(f"attncc.hf: the mask was built for {structure.q_length} queries and "
                          f"{structure.kv_length} keys, the attention got {nq} and {nk}")
    described = structure.describe()
    if structure.dense is not None:
        return dict(keys=nk, causal=False, band=None, op_causal=False, mask=structure.dense, bias=None,
                    residual="dense", described=described)
    # query row i is at key column i + shift; under causality no query sees a column past nq - 1 + shift
    shift = structure.q_offset - structure.kv_offset
    keys = max(1, min(nk, nq + shift)) if structure.causal else nk
    padding = None if structure.padding is None else structure.padding[:, None, None, :keys]
    band = structure.band if _band_hides_keys(structure.band, nq, keys, shift) else None
    square = nq == keys and shift == 0
    facts = dict(keys=keys, causal=structure.causal, band=band, op_causal=structure.causal and square and nq > 1,
                 mask=padding, bias=None, residual="padding" if padding is not None else "none", described=described)
    if square or band is None and (nq == 1 or not structure.causal):
        return facts  # aligned as the op aligns, one query that sees every kept key, or nothing to align
    visible = _visible_pairs(structure.causal, band, nq, keys, shift, device)
    facts.update(band=None, mask=visible if padding is None else visible & padding, residual="dense",
                 described=described + f" (queries at keys +{shift}: causal/window as a [{nq}, {keys}] mask)")
    return facts


def _band_hides_keys(band, nq: int, nk: int, shift: int) -> bool:
    """Whether the window ``band`` hides any of the ``nk`` keys from any of the ``nq`` queries."""
    if band is None:
        return False
    left, right = band
    return (nq - 1 + shift) - left > 0 or shift + right < nk - 1


def _visible_pairs(causal: bool, band, nq: int, nk: int, shift: int, device) -> Tensor:
    """Bool ``[1, 1, nq, nk]``: query i (at key column ``i + shift``) sees key j under causality and the band."""
    q_pos = torch.arange(nq, device=device)[:, None] + shift
    k_pos = torch.arange(nk, device=device)[None, :]
    keep = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if causal:
        keep &= k_pos <= q_pos
    if band is not None:
        keep &= (k_pos >= q_pos - band[0]) & (k_pos <= q_pos + band[1])
    return keep[None, None]


def _facts_from_tensor(record: ModuleRecord, module: nn.Module, mask, query: Tensor, key: Tensor,
                       is_causal: Optional[bool], sliding_window: Optional[int]) -> dict:
    """Facts (as ``_facts_from_structure``) when the mask is not a structure: None (no mask: causal as
    ``is_causal`` or the module says, as sdpa does, and the ``sliding_window`` argument as a band; the last query
    at the last key) or a 4-D tensor the caller built (bool: ``mask``; float: added as ``bias``, as sdpa adds it;
    it holds the whole mask, window included). Anything else (a flex ``BlockMask``) is an AttnccError."""
    nq, nk = query.shape[-2], key.shape[-2]
    if mask is None:
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        band = None if not sliding_window else (sliding_window - 1, 0) if causal else (sliding_window, sliding_window)
        structure = MaskStructure(causal, band, None, nq, nk, q_offset=nk - nq if causal else 0)
        return _facts_from_structure(structure, nq, nk, query.device)
    if isinstance(mask, Tensor) and mask.dim() == 4:
        record.note(f"the caller passed a 4-D {mask.dtype} attention mask: carried exactly as a dense "
                    f"{'mask' if mask.dtype == torch.bool else 'bias'} (no structure to exploit; it holds the "
                    f"whole mask, as for sdpa)")
        mask = mask[..., :nk]
        if mask.dtype == torch.bool:
            return dict(keys=nk, causal=False, band=None, op_causal=False, mask=mask, bias=None, residual="dense",
                        described="dense (caller's 4-D mask)")
        return dict(keys=nk, causal=False, band=None, op_causal=False, mask=None, bias=mask, residual="none",
                    described="dense (caller's 4-D float mask)")
    raise AttnccError(f"attncc.hf: an attention mask of type {type(mask).__name__} is not one the attncc op takes "
                      f"(a structure from the 'attncc' mask interface, a 4-D tensor or None)")


# -- the plan -------------------------------------------------------------------------------------------------


def _site(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, facts: dict, softcap: float, dropout: float,
          has_bias: bool, sinks: Optional[Tensor]) -> AttentionSite:
    """The ``AttentionSite`` the plan sees for this call (no graph: the node fields are None). Self-attention gets
    one symbolic length ``N`` for queries and keys, so prefill and decode get the same plan."""
    # T5/BART modules serve both kinds (cross when called with key_value_states): a bidirectional call with
    # fewer or more keys than queries is cross-attention (self-attention without causality has no KV cache)
    cross = bool(getattr(module, "is_cross_attention", False)) or "cross" in type(module).__name__.lower() or (
        not facts["causal"] and query.shape[-2] != key.shape[-2])
    length = "N" if not cross else None
    return AttentionSite(
        module=record_for(module).module, source="hf", q=None, k=None, v=None, output=None,
        kind="cross" if cross else "self", batch=query.shape[0], q_heads=query.shape[1], kv_heads=key.shape[1],
        q_len=length or "Nq", kv_len=length or "Nk", head_dim=query.shape[-1], value_dim=value.shape[-1],
        causal=facts["causal"], softcap=softcap, dropout_p=float(dropout), dtype=query.dtype,
        layer=record_for(module).layer, has_bias=has_bias, mask_residual=facts["residual"],
        band=None if facts["band"] is None else (int(facts["band"][0]), int(facts["band"][1])),
        sink_logits=sinks,
    )


def _plan(record: ModuleRecord, site: AttentionSite) -> SitePlan:
    """The policy's plan for ``site`` (``attncc.passes.plan.plan_site``), cached per set of site facts."""
    key = (site.kind, site.causal, site.band, site.mask_residual, site.has_bias, site.softcap, site.dropout_p,
           site.sink_logits is not None, site.dtype, site.q_heads, site.kv_heads, site.head_dim, site.value_dim)
    plan = record.plans.get(key)
    if plan is None:
        plan = plan_site(site, STATE.policy)
        record.plans[key] = plan
    return plan


# -- what the op does not take --------------------------------------------------------------------------------


def _note_other_arguments(record: ModuleRecord, kwargs: dict) -> None:
    """Record (and warn once) every keyword argument that is neither an op argument nor attention-neutral."""
    if kwargs.get("output_attentions"):
        record.note("output_attentions=True: attention weights are not materialized; the module returns None")
    for name, value in kwargs.items():
        if name in TAKEN or name in NOT_ATTENTION or name == "output_attentions" or value is None:
            continue
        record.note(f"argument {name!r} is not an attention argument attncc knows: not applied "
                    f"(transformers' sdpa attention does not apply it either)")


def _reference(call: AttentionCall) -> Tensor:
    """Plain exact attention math (``attncc.variants.exact.reference``) for a module the policy leaves alone."""
    if call.dropout_p > 0:
        raise AttnccError("attncc.hf: policy 'none' with attention dropout (training): use policy 'exact'")
    return reference(call.q, call.k, call.v, bias=call.bias, mask=call.mask, scale=call.scale, causal=call.causal,
                     softcap=call.softcap, sinks=call.sinks)


__all__ = ["STATE", "attncc_attention"]
