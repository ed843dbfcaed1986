"""Policy: which variant each attention site gets.

A policy is an ordered list of rules; the first rule whose selector matches a site decides its variant. A
site no rule matches runs exactly. The common case is one string::

    attncc.compile(model, "local(window=256, sinks=4)")   # every site local supports; the others stay exact
    attncc.compile(model, "exact")                         # exact fused op everywhere
    attncc.compile(model, "none")                          # detect and report only

and the general one a list of rules (or a YAML/JSON file of them)::

    attncc.Policy([
        attncc.Rule(match="*.layers.*.self_attn", layers="0-3", variant="exact"),
        attncc.Rule(kind="self", causal=True, variant="local(window=256, sinks=4)", min_len=2048),
    ])

A selector is any combination of ``match`` (fnmatch glob on the module's name as ``model.named_modules()`` gives
it), ``layers`` (inclusive range of the layer number: the module's index in the model's first stack of repeated
layers, ``"4-11"``, ``[4, 11]`` or ``7``), ``kind`` (``self``/``cross``) and
``causal`` (true/false). ``min_len``: below this key length the site runs exact at run time (no recapture).

``heads`` narrows a rule to some query heads of the sites it selects (``Rule(heads=[0, 3, 7], variant=...)``,
``heads: "0-3, 7"`` in a file). A policy with such rules decides per query head: each head gets the first
rule that selects the site and that head; heads that get different variants make the site's variant a
per-head one, ``heads(groups=...)`` (``attncc.variants.heads``). A head a rule names that the site does not
have is said (a warning and the site's reason), never silently dropped.
"""

from __future__ import annotations

import fnmatch
import json
import re
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from attncc.errors import AttnccError
from attncc.module_names import first_integer

if TYPE_CHECKING:
    from attncc.calibration.plan import Plan

RULE_FIELDS = ("variant", "match", "layers", "kind", "causal", "min_len", "heads")
KINDS = ("self", "cross")


@dataclass(frozen=True)
class Rule:
    """One policy rule: a selector and the variant for the sites it selects.

    Example::

        Rule(match="*.self_attn", variant="local(window=256)", min_len=2048)
    """

    variant: str = "exact"
    """Variant text (``"exact"``, ``"none"``, ``"local(window=256, sinks=4)"``, ...)."""
    match: Optional[str] = None
    """fnmatch glob on the site's module name (as ``model.named_modules()`` gives it), e.g.
    ``"*.layers.*.self_attn"``; None matches every module."""
    layers: Optional[tuple[int, int]] = None
    """Inclusive range of the layer number (the module's index in the model's first stack of repeated layers,
    ``model.layers.7.self_attn`` -> 7; see ``attncc.module_names``)."""
    kind: Optional[str] = None
    """'self' or 'cross'; None matches both."""
    causal: Optional[bool] = None
    """True: causal sites only; False: bidirectional only; None: both."""
    min_len: int = 0
    """Run exact whenever the key length is below this (checked at run time)."""
    heads: Optional[tuple[int, ...]] = None
    """The query heads (indices from 0) of the selected sites this rule decides; None: every head. Given as
    ``[0, 3, 7]``, one index, or a text ``"0-3, 7"``."""
    label: str = field(default="", compare=False)
    """How errors and the report name the rule ('rule 2')."""

    def __post_init__(self) -> None:
        name = self.label or "rule"
        if not isinstance(self.variant, str) or not self.variant.strip():
            raise AttnccError(f"{name}: field 'variant' must be a variant string such as 'local(window=256)', "
                              f"'exact' or 'none', got {self.variant!r}")
        object.__setattr__(self, "variant", self.variant.strip())
        check_variant(self.variant, f"{name}: field 'variant'")
        if self.match is not None and not isinstance(self.match, str):
            raise AttnccError(f"{name}: field 'match' must be a glob string such as '*.self_attn', got {self.match!r}")
        object.__setattr__(self, "layers", _layer_range(self.layers, name))
        if self.kind is not None and self.kind not in KINDS:
            raise AttnccError(f"{name}: field 'kind' must be one of {', '.join(map(repr, KINDS))}, got {self.kind!r}")
        if self.causal is not None and not isinstance(self.causal, bool):
            raise AttnccError(f"{name}: field 'causal' must be true or false, got {self.causal!r}")
        if isinstance(self.min_len, bool) or not isinstance(self.min_len, int) or self.min_len < 0:
            raise AttnccError(f"{name}: field 'min_len' must be an integer >= 0, got {self.min_len!r}")
        object.__setattr__(self, "heads", _head_list(self.heads, name))
        if self.heads is not None and self.variant.startswith("heads("):
            raise AttnccError(f"{name}: field 'variant' cannot be per-head (heads(...)) in a rule that names heads: "
                              f"give the variant of these heads")

    def selects_head(self, head: int) -> bool:
        """Whether this rule decides query head ``head`` of a site it matches."""
        return self.heads is None or head in self.heads

    def matches(self, site) -> bool:
        """Whether this rule's selector selects ``site`` (an AttentionSite)."""
        if self.match is not None and not fnmatch.fnmatchcase(site.module, self.match):
            return False
        if self.layers is not None:
            layer = site.layer if site.layer is not None else layer_index(site.module)
            if layer is None or not self.layers[0] <= layer <= self.layers[1]:
                return False
        if self.kind is not None and site.kind != self.kind:
            return False
        if self.causal is not None and bool(site.causal) != self.causal:
            return False
        return True

    def describe(self) -> str:
        """The selector in words, e.g. ``match='*.self_attn', causal`` (``every site`` when empty)."""
        parts = []
        if self.match is not None:
            parts.append(f"match={self.match!r}")
        if self.layers is not None:
            parts.append(f"layers {self.layers[0]}-{self.layers[1]}")
        if self.kind is not None:
            parts.append(self.kind)
        if self.causal is not None:
            parts.append("causal" if self.causal else "bidirectional")
        if self.heads is not None:
            from attncc.variants.heads import head_ranges

            parts.append(f"heads {head_ranges(self.heads)}")
        return ", ".join(parts) or "every site"


def check_variant(text: str, where: str) -> None:
    """Raise ``AttnccError("<where>: <what is wrong>")`` unless ``text`` is ``none`` or a valid variant.

    Only an unknown variant name lists ``none`` among the choices; a wrong parameter names the valid
    parameters of that variant, nothing else.
    """
    if text == "none":
        return
    from attncc.variants.parse import UnknownName, parse_variant

    try:
        parse_variant(text)
    except UnknownName as err:
        if err.what != "variant":
            raise AttnccError(f"{where}: {err}") from None
        raise AttnccError(f"{where}: unknown variant {err.name!r}: valid variants are {', '.join(err.valid)}, "
                          f"or 'none' (detect and report only)") from None
    except AttnccError as err:
        raise AttnccError(f"{where}: {err}") from None


def _is_exact(text: str) -> bool:
    from attncc.variants.parse import parse_variant

    return parse_variant(text).exact


def layer_index(module: str) -> Optional[int]:
    """The first integer component of a module path (``model.layers.3.self_attn`` -> 3), None if there is none;
    used only for sites whose layer number the model's structure did not give (``AttentionSite.layer``)."""
    return first_integer(module)


def _layer_range(value, name: str) -> Optional[tuple[int, int]]:
    bad = AttnccError(f"{name}: field 'layers' must be an index (7), a range '4-11' or a pair [4, 11], got {value!r}")
    if value is None:
        return None
    if isinstance(value, bool):
        raise bad
    if isinstance(value, int):
        lo = hi = value
    elif isinstance(value, str):
        found = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", value)
        if not found:
            raise bad
        lo = int(found.group(1))
        hi = int(found.group(2)) if found.group(2) is not None else lo
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(x, int) and not isinstance(x, bool) for x in value
    ):
        lo, hi = value
    else:
        raise bad
    if lo < 0 or hi < lo:
        raise bad
    return (lo, hi)


def _head_list(value, name: str) -> Optional[tuple[int, ...]]:
    """``heads`` as ascending unique indices: from an int, a list/tuple of ints or a text ``"0-3, 7"``."""
    bad = f"{name}: field 'heads' must be query head indices >= 0 such as [0, 3, 7] or '0-3, 7', got {value!r}"
    if value is None:
        return None
    if isinstance(value, str):
        value = _heads_text(value, bad)
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in value):
        raise AttnccError(bad)
    if len(set(value)) != len(value):
        twice = sorted({h for h in value if list(value).count(h) > 1})
        raise AttnccError(f"{name}: field 'heads' lists head {twice[0]} twice, in {value!r}")
    return tuple(sorted(value))


def _heads_text(text: str, bad: str) -> list[int]:
    """``"0-3, 7"`` -> ``[0, 1, 2, 3, 7]``; AttnccError(``bad``) for anything else."""
    found = [re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part) for part in text.split(",")]
    if not all(found):
        raise AttnccError(bad)
    runs = [(int(f.group(1)), int(f.group(2) or f.group(1))) for f in found]
    if any(last < first for first, last in runs):
        raise AttnccError(bad)
    return [head for first, last in runs for head in range(first, last + 1)]


@dataclass(frozen=True)
class Decision:
    """What a policy says for one site: the variant text (or 'none'), the rule that said it and why."""

    variant: str
    reason: str
    min_len: int = 0


RuleLike = Union[Rule, dict, str]


class Policy:
    """An ordered list of rules; the first rule that matches a site decides its variant.

    ``Policy("local(window=256)")`` is one rule for every site; ``Policy([Rule(...), {...}, ...])`` takes Rule
    objects or dicts with the fields of Rule; ``Policy.from_file("rules.yaml")`` reads such a list (or a mapping
    with a ``rules`` list) from YAML or JSON.
    """

    def __init__(self, rules: Union[RuleLike, Sequence[RuleLike]] = "exact"):
        if isinstance(rules, (str, Rule, dict)):
            rules = [rules]
        if not isinstance(rules, (list, tuple)) or not rules:
            raise AttnccError("a policy is a variant string, a Rule, or a non-empty list of rules")
        self.rules: tuple[Rule, ...] = tuple(_as_rule(r, i + 1, len(rules)) for i, r in enumerate(rules))

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "Policy":
        """Read rules from a YAML or JSON file: a list of rule mappings, or ``{"rules": [...]}``."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise AttnccError(f"cannot read policy file {str(path)!r}: {err.strerror or err}") from None
        data = _load_rules_text(text, path)
        if isinstance(data, dict) and set(data) == {"rules"}:
            data = data["rules"]
        if isinstance(data, str):
            data = [data]
        if not isinstance(data, list) or not data:
            raise AttnccError(f"policy file {str(path)!r}: expected a list of rules (or a mapping with 'rules')")
        try:
            return cls(data)
        except AttnccError as err:
            raise AttnccError(f"policy file {str(path)!r}: {err}") from None

    def decide(self, site) -> Decision:
        """The variant for ``site`` and why (first matching rule; exact when none matches). With rules that name
        ``heads``, per query head (``decide_per_head``)."""
        if any(rule.heads is not None for rule in self.rules):
            return self.decide_per_head(site)
        return self._decision(site, self._first_rule(site))

    def decide_per_head(self, site) -> Decision:
        """Each query head of ``site`` gets the first rule that selects the site and the head; the decision is
        that variant when all heads agree, else the per-head ``heads(...)`` text (``HeadsSpec.of``).

        Loud, never silent: a rule naming heads the site does not have warns and says so in the reason; a site
        with a dynamic head count takes the first rule without ``heads`` and says so; ``none`` for some heads
        and a variant for others is an error (a site is either rewritten or left alone), and so are different
        ``min_len`` among the approximate variants of one site (the fallback is one per call).
        """
        heads = site.q_heads
        if not isinstance(heads, int):
            decision = self._decision(site, self._first_rule(site, lambda rule: rule.heads is None))
            return replace(decision, reason=f"{decision.reason}; rules naming heads were skipped: the site's "
                                            f"number of query heads is not static ({heads})")
        chosen = [self._first_rule(site, lambda rule: rule.selects_head(head)) for head in range(heads)]
        notes = self._missing_heads(site, heads)
        if all(rule is chosen[0] for rule in chosen):
            decision = self._decision(site, chosen[0])
            return replace(decision, reason="; ".join([decision.reason, *notes]))
        return self._mixed_decision(site, chosen, notes)

    def _first_rule(self, site, also=lambda rule: True) -> Optional[Rule]:
        return next((rule for rule in self.rules if rule.matches(site) and also(rule)), None)

    def _decision(self, site, rule: Optional[Rule]) -> Decision:
        if rule is None:
            return Decision("exact", "no rule matched: exact")
        return Decision(rule.variant, f"{self._why(rule)}: {rule.variant}", rule.min_len)

    def _why(self, rule: Optional[Rule]) -> str:
        if rule is None:
            return "no rule matched"
        return f"{rule.label or 'rule'} ({rule.describe()})" if len(self.rules) > 1 else "policy"

    def _missing_heads(self, site, heads: int) -> list[str]:
        """What the rules that select ``site`` say about heads it does not have (also warned)."""
        notes = []
        for rule in self.rules:
            past = [h for h in rule.heads or () if h >= heads]
            if past and rule.matches(site):
                from attncc.variants.heads import heads_label

                notes.append(f"{rule.label or 'rule'} names {heads_label(past)}, which {site.module or 'the model'} "
                             f"does not have ({heads} query heads): nothing runs there")
                warnings.warn(f"attncc: {notes[-1]}", stacklevel=3)
        return notes

    def _mixed_decision(self, site, chosen: list[Optional[Rule]], notes: list[str]) -> Decision:
        """The decision when the heads of ``site`` get their variants from different rules."""
        from attncc.variants.heads import HeadsSpec, heads_label

        texts = [rule.variant if rule is not None else "exact" for rule in chosen]
        by_rule: dict[int, list[int]] = {}
        for head, rule in enumerate(chosen):
            by_rule.setdefault(id(rule), []).append(head)
        parts = [f"{heads_label(found)} {self._why(chosen[found[0]])}: {texts[found[0]]}"
                 for found in by_rule.values()]
        if "none" in texts and any(text != "none" for text in texts):
            raise AttnccError(f"site {site.module or '<root>'}: the policy leaves some heads alone ('none') and rewrites "
                              f"others ({'; '.join(parts)}): a site is either rewritten or left alone; give those "
                              f"heads 'exact' instead of 'none'")
        if all(text == "none" for text in texts):
            return Decision("none", "per head: " + "; ".join([*parts, *notes]))
        variant = HeadsSpec.of(texts)
        lengths = {rule.min_len for rule in chosen if rule is not None and not _is_exact(rule.variant)}
        if len(lengths) > 1:
            raise AttnccError(f"site {site.module or '<root>'}: the heads' rules give different min_len "
                              f"({', '.join(map(str, sorted(lengths)))}): one site falls back to exact below one length")
        return Decision(str(variant), "per head: " + "; ".join([*parts, *notes]), lengths.pop() if lengths else 0)

    @property
    def rewrites(self) -> bool:
        """Whether this policy changes the graph at all."""
        return any(rule.variant != "none" for rule in self.rules)

    def __eq__(self, other) -> bool:
        return isinstance(other, Policy) and self.rules == other.rules

    def __hash__(self) -> int:
        return hash(self.rules)

    def __str__(self) -> str:
        if len(self.rules) == 1 and self.rules[0].describe() == "every site" and not self.rules[0].min_len:
            return self.rules[0].variant
        return "; ".join(
            f"{r.describe()} -> {r.variant}" + (f" (min_len {r.min_len})" if r.min_len else "") for r in self.rules
        )

    def __repr__(self) -> str:
        return f"Policy({str(self)!r})"


def _as_rule(rule: RuleLike, number: int, count: int) -> Rule:
    label = f"rule {number}" if count > 1 else "rule"
    if isinstance(rule, Rule):
        return rule if rule.label else Rule(**{f.name: getattr(rule, f.name) for f in fields(Rule) if f.name != "label"},
                                            label=label)
    if isinstance(rule, str):
        if count == 1:  # a one-string policy: name the policy, not 'rule: field variant'
            check_variant(rule.strip(), f"policy {rule!r}")
        return Rule(variant=rule, label=label)
    if isinstance(rule, dict):
        unknown = [k for k in rule if k not in RULE_FIELDS]
        if unknown:
            raise AttnccError(
                f"{label}: unknown field {unknown[0]!r}; valid fields are {', '.join(RULE_FIELDS)}"
            )
        if "variant" not in rule:
            raise AttnccError(f"{label}: field 'variant' is required (e.g. variant: local(window=256))")
        return Rule(**rule, label=label)
    raise AttnccError(f"{label}: expected a Rule, a mapping or a variant string, got {type(rule).__name__}")


def _load_rules_text(text: str, path: Path) -> Any:
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise AttnccError(f"policy file {str(path)!r} is not valid JSON: {err.msg} (line {err.lineno})") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise AttnccError(f"policy file {str(path)!r} is not valid YAML{where}") from None


PolicyLike = Union[str, Policy, Rule, Sequence[RuleLike], "Plan", Path, None]


def as_policy(policy: PolicyLike) -> Policy:
    """Normalize what a user passes as ``policy``: a variant string, a path to a .yaml/.yml/.json rules file,
    a calibration plan (an ``attncc.calibration.plan.Plan``, or the path of a ``.json`` file whose top level has
    ``attncc_plan``: its ``to_policy()``, which keeps the plan as ``.plan``), a Rule, a list of rules, a Policy,
    or None (exact)."""
    if policy is None:
        return Policy("exact")
    if isinstance(policy, Policy):
        return policy
    from attncc.calibration.plan import Plan, is_plan_file

    if isinstance(policy, Plan):
        return policy.to_policy()
    if isinstance(policy, (str, Path)) and is_plan_file(str(policy).strip()):
        return Plan.load(str(policy).strip()).to_policy()
    if isinstance(policy, Path):
        return Policy.from_file(policy)
    if isinstance(policy, str) and policy.strip().lower().endswith((".yaml", ".yml", ".json")):
        return Policy.from_file(policy.strip())
    if isinstance(policy, (str, Rule, list, tuple)):
        return Policy(policy)
    raise AttnccError(f"policy must be a variant string, a rules file, a plan, a Rule list or attncc.Policy, "
                      f"not {type(policy).__name__}")
