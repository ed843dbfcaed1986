"""Hugging Face integration: ``attn_implementation="attncc"`` runs every attention of a transformers model through
attncc's op, with a policy applied per layer, without graph capture.

Example::

    import attncc.hf
    from transformers import AutoModelForCausalLM

    attncc.hf.register(policy="local(window=256, sinks=4)")
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="attncc")
    out = model.generate(ids, max_new_tokens=64)
    print(attncc.hf.report(model))        # per attention module: the variant that ran, why, the mask it saw

``register`` adds ``"attncc"`` to transformers' ``AttentionInterface`` (the attention function,
``attncc.hf.attention.attncc_attention``) and to its ``AttentionMaskInterface`` (``attncc.hf.mask.structured_mask``:
causal, sliding window and padding reach the attention function as structure, never as an ``N x N`` tensor). The
policy's rules select modules by the names ``model.named_modules()`` gives them (``match``, ``layers``), exactly as
``attncc.compile`` does; the plan for each module is the capture path's (``attncc.passes.plan.plan_site``).
``attn_implementation="sdpa"`` and ``"eager"`` are untouched.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from attncc.errors import AttnccError
from attncc.hf.attention import STATE, attncc_attention
from attncc.hf.mask import MaskStructure, structured_mask
from attncc.hf.records import ModuleRecord, Report, forget_plans, report
from attncc.policy import PolicyLike, as_policy

NAME = "attncc"
"""The ``attn_implementation`` name ``register`` adds."""

_saved: dict = {}
"""What transformers' interfaces held under ``NAME`` before ``register`` (restored by ``unregister``)."""


def _interfaces():
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as err:  # transformers < 5 has no mask interface
        raise AttnccError(f"attncc.hf needs transformers >= 5 (AttentionInterface and AttentionMaskInterface): "
                          f"{err}") from None

    return ((AttentionInterface, attncc_attention), (AttentionMaskInterface, structured_mask))


def register(policy: PolicyLike = "exact") -> None:
    """Make ``attn_implementation="attncc"`` available to transformers, applying ``policy``.

    Args:
        policy: what ``attncc.compile`` takes: a variant string (``"exact"``, ``"local(window=256, sinks=4)"``),
            a rules file (``.yaml``/``.json``), a list of ``attncc.Rule`` or an ``attncc.Policy``. A bad policy raises
            ``AttnccError`` here, before any model runs.

    Idempotent: registering again replaces the policy (models already loaded with ``"attncc"`` follow the new
    one from their next call). ``unregister()`` undoes it.
    """
    resolved = as_policy(policy)
    for interface, function in _interfaces():
        current = interface._global_mapping.get(NAME)
        if current is not function and interface not in _saved:
            _saved[interface] = current
        interface.register(NAME, function)
    if STATE.policy != resolved:
        forget_plans()
    STATE.policy = resolved


def unregister() -> None:
    """Remove ``"attncc"`` from transformers' interfaces (restoring what was there before ``register``, if
    anything). A model loaded with ``attn_implementation="attncc"`` then fails at its next call. Safe to call when
    not registered."""
    for interface, function in _interfaces():
        if interface._global_mapping.get(NAME) is function:
            previous = _saved.pop(interface, None)
            if previous is None:
                del interface._global_mapping[NAME]
            else:
                interface._global_mapping[NAME] = previous
    STATE.policy = None
    forget_plans()


@contextlib.contextmanager
def registered(policy: PolicyLike = "exact") -> Iterator[None]:
    """``with attncc.hf.registered("exact"): ...``: ``register(policy)`` inside the block; afterwards the previous
    state (another policy, or not registered) is back."""
    before = STATE.policy
    register(policy)
    try:
        yield
    finally:
        if before is None:
            unregister()
        else:
            register(before)


def is_registered() -> bool:
    """Whether ``attn_implementation="attncc"`` is available now."""
    return STATE.policy is not None


__all__ = ["MaskStructure", "ModuleRecord", "NAME", "Report", "is_registered", "register", "registered", "report",
           "structured_mask", "unregister", "attncc_attention"]
