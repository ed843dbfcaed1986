"""Policy: what attncc does with each attention site it finds.

Policies today: ``"exact"`` rewrites every site into the exact fused op, ``"none"`` only detects and reports.
The rule grammar (selectors, approximate variants such as ``"local(window=256)"``) builds on this type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from attncc.errors import AttnccError

KNOWN_POLICIES = ("exact", "none")


@dataclass(frozen=True)
class Policy:
    """Which variant every site gets.

    Example::

        attncc.compile(model, policy=attncc.Policy("exact"))
        attncc.compile(model, policy="none")     # same as Policy("none")
    """

    variant: str = "exact"

    def __post_init__(self) -> None:
        if self.variant not in KNOWN_POLICIES:
            raise AttnccError(
                f"unknown policy {self.variant!r}: valid policies are {', '.join(map(repr, KNOWN_POLICIES))}"
            )

    def choose(self, site) -> tuple[str, str]:
        """The variant for ``site`` and the reason, e.g. ``("exact", "policy 'exact'")``."""
        if self.variant == "none":
            return "none", "policy 'none': detect and report only"
        return self.variant, f"policy {self.variant!r}"

    @property
    def rewrites(self) -> bool:
        """Whether this policy changes the graph at all."""
        return self.variant != "none"

    def __str__(self) -> str:
        return self.variant


PolicyLike = Union[str, Policy, None]


def as_policy(policy: PolicyLike) -> Policy:
    """Normalize what a user passes as ``policy`` (a string, a Policy or None for 'exact')."""
    if policy is None:
        return Policy("exact")
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str):
        return Policy(policy.strip())
    raise AttnccError(f"policy must be a string or attncc.Policy, not {type(policy).__name__}")
