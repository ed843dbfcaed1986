"""A calibration plan: which variant each query head of each attention site runs, why, and what it measured.

``attncc.calibrate(model, attncc.auto(...), data=...)`` returns a :class:`Plan`; ``plan.save("plan.json")`` writes
it as human-readable JSON and ``Plan.load("plan.json")`` reads it back; ``attncc.compile(model, plan)`` (or the
path) runs it. The file::

    {"attncc_plan": 1, "model": "BertModel", "fingerprint": "3f2a...", "metric": "cosine", "max_error": 0.01,
     "target_len": 512,
     "sites": {"encoder.layer.0.attention.self": [
         {"head": 0, "variant": "topk(block=16, density=0.25)", "error": 0.0004, "time_s": 0.0011,
          "flops": 1.2e7, "considered": [{"variant": "exact", "error": 0.0, "time_s": 0.0019, "flops": 5e7,
                                          "why": "slower"}, ...]},
         ...]},
     "measured": {"calibration": {"mean": 0.006, "worst": 0.011, "texts": 16}, "held_out": {...}},
     "notes": ["..."], "dtype": "float32", "weights": "9c1e..."}

A plan belongs to one architecture: its ``fingerprint`` (:func:`model_fingerprint`) hashes the model's class name
and the names and shapes of its parameters and buffers. Not their values, and not their dtypes: a fine-tuned copy
of the same architecture, or the same model in bfloat16, accepts the plan, because the sites and heads it names
are the same ones. The errors it measured, though, belong to the weights and dtype it was calibrated with, so the
plan also records those (``dtype``, and ``weights``: a digest of a strided sample of every parameter) and
:meth:`Plan.check_model` warns when they differ; calibrate again to know the error of the other copy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch.nn as nn

from attncc.errors import AttnccError, AttnccWarning
from attncc.policy import Decision, Policy, Rule

PLAN_VERSION = 1
"""The ``attncc_plan`` value this attncc writes and reads."""

CANDIDATE_KEYS = ("variant", "error", "time_s", "flops", "why")
"""The keys of one entry of :attr:`HeadChoice.considered`."""


@dataclass
class HeadChoice:
    """What one query head of one site runs, and the candidates the calibrator weighed for it."""

    variant: str
    """Canonical variant text this head runs (``"exact"``, ``"topk(block=16, density=0.25)"``)."""
    error: float
    """Predicted contribution of this head's variant to the end-to-end error, in the plan's metric units."""
    time_s: float
    """Predicted time (seconds) of this head's share of the site at ``target_len``."""
    flops: float
    """Attention FLOPs of this head at ``target_len``, padding excluded where measured."""
    considered: list[dict] = field(default_factory=list)
    """The candidates: ``{"variant", "error", "time_s", "flops", "why"}`` each; ``why`` is ``"chosen"``,
    ``"over budget"``, ``"slower than exact"``, ..."""

    def to_json(self, head: int) -> dict:
        """The JSON entry of this head (``head`` is its query head index)."""
        return {"head": head, **asdict(self)}

    @staticmethod
    def from_json(entry: Any, where: str) -> "HeadChoice":
        """A HeadChoice from its JSON entry; AttnccError naming ``where`` when a field is missing or wrong."""
        if not isinstance(entry, dict):
            raise AttnccError(f"{where}: expected a mapping with variant, error, time_s, flops, got "
                              f"{type(entry).__name__}")
        missing = [key for key in ("variant", "error", "time_s", "flops") if key not in entry]
        if missing:
            raise AttnccError(f"{where}: missing field {missing[0]!r}")
        if not isinstance(entry["variant"], str) or not entry["variant"].strip():
            raise AttnccError(f"{where}: field 'variant' must be a variant text, got {entry['variant']!r}")
        numbers = {key: _number(entry[key], f"{where}: field {key!r}") for key in ("error", "time_s", "flops")}
        considered = entry.get("considered", [])
        if not isinstance(considered, list) or not all(isinstance(c, dict) for c in considered):
            raise AttnccError(f"{where}: field 'considered' must be a list of mappings")
        return HeadChoice(entry["variant"].strip(), considered=[dict(c) for c in considered], **numbers)


@dataclass
class Plan:
    """A calibrated per-head choice of variants for one model architecture (see the module docstring).

    Fields beyond the fixed interface: ``dtype`` (the dtype the model was calibrated in) and ``weights`` (a
    digest of its weights, :func:`weights_digest`): both only make :meth:`check_model` warn, never refuse.
    """

    model: str
    fingerprint: str
    metric: str
    max_error: float
    target_len: Optional[int]
    sites: dict[str, list[HeadChoice]]
    measured: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    dtype: Optional[str] = None
    weights: Optional[str] = None

    # ----------------------------------------------------------------------------------------- files
    def to_json(self) -> dict:
        """The plan as plain JSON types, in the file's key order."""
        data = {"attncc_plan": PLAN_VERSION, "model": self.model, "fingerprint": self.fingerprint,
                "metric": self.metric, "max_error": self.max_error, "target_len": self.target_len,
                "sites": {name: [choice.to_json(head) for head, choice in enumerate(heads)]
                          for name, heads in self.sites.items()},
                "measured": self.measured, "notes": list(self.notes)}
        if self.dtype is not None:
            data["dtype"] = self.dtype
        if self.weights is not None:
            data["weights"] = self.weights
        return data

    def save(self, path: Union[str, Path], overwrite: bool = False) -> None:
        """Write the plan to ``path`` as JSON (indent 2), atomically (a temp file, then a rename).

        An existing file is replaced only with ``overwrite=True``; otherwise AttnccError (the caller decides).
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise AttnccError(f"{path} exists; pass overwrite=True (the CLI: --force) to replace it")
        text = json.dumps(self.to_json(), indent=2) + "\n"
        folder = path.parent if str(path.parent) else Path(".")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        except OSError as error:
            raise AttnccError(f"cannot write {path}: {error.strerror or error}") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Plan":
        """Read a plan file; one AttnccError line for a missing file, invalid JSON, a JSON that is not a plan, a
        plan of another version, or a field that is missing or wrong."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise AttnccError(f"cannot read plan file {str(path)!r}: {error.strerror or error}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise AttnccError(f"plan file {str(path)!r} is not valid JSON: {error.msg} (line {error.lineno})") \
                from None
        try:
            return cls.from_json(data)
        except AttnccError as error:
            raise AttnccError(f"plan file {str(path)!r}: {error}") from None

    @classmethod
    def from_json(cls, data: Any) -> "Plan":
        """A Plan from the JSON :meth:`to_json` gives; AttnccError when it is not one."""
        if not isinstance(data, dict) or "attncc_plan" not in data:
            raise AttnccError("not an attncc plan (no top-level 'attncc_plan' key; a plan is what "
                              "'attncc calibrate' or Plan.save writes)")
        if data["attncc_plan"] != PLAN_VERSION:
            raise AttnccError(f"plan format version {data['attncc_plan']!r}, but this attncc reads version "
                              f"{PLAN_VERSION}: calibrate again with this attncc")
        for key in ("model", "fingerprint", "metric", "max_error", "sites"):
            if key not in data:
                raise AttnccError(f"missing field {key!r}")
        for key in ("model", "fingerprint", "metric"):
            if not isinstance(data[key], str):
                raise AttnccError(f"field {key!r} must be a string, got {data[key]!r}")
        target_len = data.get("target_len")
        if target_len is not None and (isinstance(target_len, bool) or not isinstance(target_len, int)):
            raise AttnccError(f"field 'target_len' must be an integer or null, got {target_len!r}")
        measured, notes = data.get("measured", {}), data.get("notes", [])
        if not isinstance(measured, dict):
            raise AttnccError("field 'measured' must be a mapping")
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise AttnccError("field 'notes' must be a list of strings")
        return cls(data["model"], data["fingerprint"], data["metric"], _number(data["max_error"], "field 'max_error'"),
                   target_len, _sites_from_json(data["sites"]), measured, notes,
                   dtype=data.get("dtype"), weights=data.get("weights"))

    # -------------------------------------------------------------------------------------- using it
    def to_policy(self) -> "PlanPolicy":
        """One rule per site: ``match`` = the site's module name exactly (fnmatch characters escaped), ``variant``
        = its per-head variant text (:func:`per_head_variant`). A site the plan does not name runs exact, as under
        the policy ``"exact"``; its report line says it was not in the plan."""
        rules = [Rule(variant=per_head_variant([c.variant for c in heads]), match=escape_glob(name),
                      label=f"plan site {name or '<root>'}")
                 for name, heads in self.sites.items()]
        return PlanPolicy(rules, self)

    def check_model(self, model: nn.Module) -> None:
        """Raise AttnccError unless ``model`` has the architecture this plan was calibrated for (its fingerprint);
        warn (AttnccWarning) when its dtype or weights differ from the calibrated ones."""
        found = model_fingerprint(model)
        if found != self.fingerprint:
            name = type(model).__name__
            same = " (same class, other parameter names or shapes)" if name == self.model else ""
            raise AttnccError(f"this plan was calibrated for {self.model} (fingerprint {self.fingerprint[:12]}), "
                              f"not this model ({name}, fingerprint {found[:12]}){same}: calibrate it for this model")
        dtype = model_dtype(model)
        if self.dtype is not None and dtype is not None and dtype != self.dtype:
            warnings.warn(f"attncc: this plan's errors and times were measured with {self.dtype} weights; this "
                          f"model has {dtype} weights: its errors may differ (calibrate again to know them)",
                          AttnccWarning, stacklevel=3)
        elif self.weights is not None and weights_digest(model) != self.weights:
            warnings.warn(f"attncc: this plan was calibrated on other weights of {self.model} (a fine-tuned "
                          f"copy?): the heads and sites match, but its measured errors are those of the other "
                          f"weights (calibrate again to know this model's)", AttnccWarning, stacklevel=3)

    # ----------------------------------------------------------------------------------------- summary
    def heads_per_variant(self, module: str) -> Counter:
        """``Counter(variant text -> number of heads)`` of one site."""
        return Counter(choice.variant for choice in self.sites[module])

    def predicted_seconds(self) -> tuple[Optional[float], float]:
        """``(exact, plan)``: predicted attention seconds of every planned head at ``target_len``, with each
        head's exact candidate (None when a head's ``considered`` has no exact entry) and with its choice."""
        exact, chosen = 0.0, 0.0
        for heads in self.sites.values():
            for choice in heads:
                chosen += choice.time_s
                reference = [c for c in choice.considered if c.get("variant") == "exact"]
                if exact is not None and reference and _is_number(reference[0].get("time_s")):
                    exact += float(reference[0]["time_s"])
                else:
                    exact = None
        return exact, chosen

    def predicted_speedup(self) -> Optional[float]:
        """Predicted attention speedup (exact time / plan time), None when it cannot be said."""
        exact, chosen = self.predicted_seconds()
        if exact is None or chosen <= 0:
            return None
        return exact / chosen


class PlanPolicy(Policy):
    """The policy of a plan (:meth:`Plan.to_policy`): its rules, and the plan itself (``.plan``) so that
    ``attncc.compile`` checks the model's fingerprint and the report shows the plan."""

    def __init__(self, rules: Sequence[Rule], plan: Plan):
        super().__init__(list(rules) if rules else "exact")
        if not rules:  # a plan that names no site: every site runs exact, as "not in the plan" says
            self.rules = ()
        self.plan = plan

    def decide(self, site) -> Decision:
        for rule in self.rules:
            if rule.matches(site):
                counts = self.plan.heads_per_variant(site.module)
                summary = ", ".join(f"{n} head(s) {variant}" for variant, n in counts.items())
                return Decision(rule.variant, f"plan ({self.plan.metric} <= {self.plan.max_error}): {summary}")
        return Decision("exact", f"not in the plan (it names {len(self.plan.sites)} other site(s)): exact")

    @property
    def rewrites(self) -> bool:
        return True  # sites the plan does not name still run exact

    def __str__(self) -> str:
        length = f", {self.plan.target_len} tokens" if self.plan.target_len else ""
        return (f"plan for {self.plan.model} ({self.plan.metric} <= {self.plan.max_error}{length}, "
                f"{len(self.plan.sites)} site(s))")


def check_plan_model(policy: Any, model: nn.Module) -> None:
    """``policy.plan.check_model(model)`` when ``policy`` comes from a plan; nothing for another policy."""
    plan = getattr(policy, "plan", None)
    if isinstance(plan, Plan):
        plan.check_model(model)


def is_plan_file(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a ``.json`` file whose top level is a mapping with ``attncc_plan`` (False when it
    cannot be read or parsed: the rules reader then says what is wrong with it)."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "attncc_plan" in data


def per_head_variant(per_head: Sequence[str]) -> str:
    """The variant text of a site whose query head ``h`` runs ``per_head[h]``: that text when all heads agree,
    else the ``heads(groups=...)`` text of ``HeadsSpec.of`` (canonical: groups in order of their first head)."""
    if not per_head:
        raise AttnccError("a planned site needs at least one head")
    from attncc.variants.heads import HeadsSpec

    return str(HeadsSpec.of(list(per_head)))


def escape_glob(name: str) -> str:
    """``name`` as an fnmatch pattern that matches exactly ``name`` (``*``, ``?`` and ``[`` escaped)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def model_fingerprint(model: nn.Module) -> str:
    """A stable hash (32 hex digits) of ``model``'s class name and the names and shapes of its parameters and
    buffers, in registration order: the architecture, not the values, dtypes or device (see the module
    docstring for why)."""
    items = [type(model).__name__]
    for kind, named in (("param", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        items.extend(f"{kind} {name} {tuple(tensor.shape)}" for name, tensor in named)
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:32]


def model_dtype(model: nn.Module) -> Optional[str]:
    """The dtype of the model's first floating parameter (``"float32"``), None when it has none."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return str(parameter.dtype).replace("torch.", "")
    return None


def weights_digest(model: nn.Module, samples: int = 64) -> str:
    """A digest (16 hex digits) of up to ``samples`` evenly strided values of every parameter, in float32: cheap
    on any model size, and different for a fine-tuned copy (in practice; it is a sample, not a checksum)."""
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in model.named_parameters(remove_duplicate=False):
            flat = parameter.detach().reshape(-1)
            step = max(1, flat.numel() // samples)
            digest.update(name.encode())
            digest.update(flat[::step][:samples].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _sites_from_json(sites: Any) -> dict[str, list[HeadChoice]]:
    if not isinstance(sites, dict):
        raise AttnccError("field 'sites' must be a mapping of module name to a list of heads")
    result = {}
    for name, heads in sites.items():
        if not isinstance(heads, list) or not heads:
            raise AttnccError(f"site {name!r}: expected a non-empty list of head entries")
        choices = [HeadChoice.from_json(entry, f"site {name!r} entry {i}") for i, entry in enumerate(heads)]
        order = [entry.get("head", i) for i, entry in enumerate(heads)]
        if order != list(range(len(heads))):
            raise AttnccError(f"site {name!r}: head entries must be heads 0..{len(heads) - 1} in order, "
                              f"got {order}")
        result[name] = choices
    return result


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any, where: str) -> float:
    if not _is_number(value):
        raise AttnccError(f"{where} must be a finite number, got {value!r}")
    return float(value)
