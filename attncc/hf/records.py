"""What ran at each attention module on the Hugging Face path, and the module's name.

The attention function transformers calls receives the module, not its name. Policies select by the name
``model.named_modules()`` gives (``match="*.layers.*.self_attn"``, ``layers="0-3"``), so the first call of a module
looks up the call stack for the outermost ``nn.Module`` whose forward is running (the model the user called,
``generate`` included) and names every submodule of it at once; later calls read the name back.

Each module keeps a ``ModuleRecord``: what variant ran how many times, the plan's reasons, the mask structures
seen, and every note about an argument attncc carried differently or fell back on (each also warned once per
module). ``attncc.hf.report(model)`` collects them.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch.nn as nn

from attncc.errors import AttnccWarning
from attncc.module_names import ModuleNames


@dataclass
class ModuleRecord:
    """What the Hugging Face path did at one attention module.

    Attributes:
        module: the name ``named_modules()`` of the outermost running model gives it ('' if it ran standalone).
        layer: its layer number as policies select it (``Rule(layers=...)``), or None.
        runs: ``{variant text: calls}``: what the attncc op ran (``"sdpa (fallback)"`` where it did not run).
        reasons: the plan's reasons (the rule that chose the variant; why a variant did not apply), in order seen.
        masks: the mask structures seen (``causal``, ``causal+window 4096+padding``, ``dense (...)``).
        notes: each argument attncc fell back on or did not take, and why (also warned once).
    """

    module: str
    layer: Optional[int]
    runs: Counter = field(default_factory=Counter)
    reasons: list[str] = field(default_factory=list)
    masks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plans: dict = field(default_factory=dict, repr=False)
    """Plan cache: the site facts of a call -> the ``SitePlan`` the policy gave them."""

    def ran(self, variant: str, reason: str, mask: str) -> None:
        """Count one call that ran ``variant`` for ``reason`` on a mask described as ``mask``."""
        self.runs[variant] += 1
        if reason not in self.reasons:
            self.reasons.append(reason)
        if mask not in self.masks:
            self.masks.append(mask)

    def note(self, text: str) -> None:
        """Record ``text`` and warn it, once per module."""
        if text in self.notes:
            return
        self.notes.append(text)
        where = self.module or "an attention module"
        warnings.warn(f"attncc.hf: {where}: {text}", AttnccWarning, stacklevel=4)

    def to_dict(self) -> dict:
        """JSON-able: module, layer, runs, reasons, masks, notes."""
        return {"module": self.module, "layer": self.layer, "runs": dict(self.runs), "reasons": list(self.reasons),
                "masks": list(self.masks), "notes": list(self.notes)}


_RECORDS: "weakref.WeakKeyDictionary[nn.Module, ModuleRecord]" = weakref.WeakKeyDictionary()


def record_for(module: nn.Module) -> ModuleRecord:
    """The record of ``module``; the first call names it (and every module of the model it belongs to)."""
    record = _RECORDS.get(module)
    if record is None:
        _name_modules_of(module)
        record = _RECORDS.get(module) or ModuleRecord("", None)
        _RECORDS[module] = record
    return record


def forget_plans() -> None:
    """Drop every cached plan (the policy changed); the counts and notes stay."""
    for record in list(_RECORDS.values()):
        record.plans.clear()


def _name_modules_of(module: nn.Module) -> None:
    """Give a record to every module of the outermost running model that contains ``module``."""
    for root in _running_modules():
        names = ModuleNames(root)
        if names.name_of(module) is None:
            continue
        for name, sub in root.named_modules():
            if sub not in _RECORDS:
                _RECORDS[sub] = ModuleRecord(name, names.layer_of(name) if name else None)
        return


def _running_modules() -> list[nn.Module]:
    """The ``nn.Module`` objects whose methods are on the call stack (``self`` of each frame), outermost first."""
    found, seen = [], set()
    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, nn.Module) and id(obj) not in seen:
            seen.add(id(obj))
            found.append(obj)
        frame = frame.f_back
    return found[::-1]


@dataclass
class Report:
    """``attncc.hf.report(model)``: one ``ModuleRecord`` per attention module that ran on the attncc path."""

    modules: list[ModuleRecord]

    def to_dict(self) -> dict:
        """JSON-able ``{"modules": [...]}``."""
        return {"modules": [m.to_dict() for m in self.modules]}

    def __str__(self) -> str:
        if not self.modules:
            return "attncc.hf: no attention module of this model ran through attn_implementation='attncc'"
        lines = []
        for m in self.modules:
            runs = ", ".join(f"{variant} x{count}" for variant, count in m.runs.items())
            lines.append(f"{m.module or '<root>'} (layer {m.layer}): {runs}; mask {' | '.join(m.masks)}")
            lines.extend(f"    why: {r}" for r in m.reasons)
            lines.extend(f"    note: {n}" for n in m.notes)
        return "\n".join(lines)


def report(model: nn.Module) -> Report:
    """What ran at each attention module of ``model`` (named as ``model.named_modules()`` names them)."""
    modules = []
    for name, module in model.named_modules():
        record = _RECORDS.get(module)
        if record is not None and record.runs:
            modules.append(ModuleRecord(name, record.layer, Counter(record.runs), list(record.reasons),
                                        list(record.masks), list(record.notes)))
    return Report(modules)


__all__ = ["ModuleRecord", "Report", "forget_plans", "record_for", "report"]
