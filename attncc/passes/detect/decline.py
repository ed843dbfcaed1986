"""Why a softmax that is attention is not rewritten: the Decline raised inside the matchers, and the words its
reasons use for operations and readers."""

from __future__ import annotations

from typing import Optional

import torch.fx as fx


class Decline(Exception):
    """Raised inside the matcher when a softmax turns out to be attention that cannot be rewritten.

    ``rule`` names the score-chain rule that refused (``score_chain.SCORE_RULES``), '' when no rule did.
    """

    def __init__(self, reason: str, node: Optional[fx.Node] = None, rule: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.node = node
        self.rule = rule


def op_name(node: fx.Node) -> str:
    """How a reason names node's operation: ``Tensor.mean``, ``module encoder.drop``, ``matmul``."""
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_module":
        return f"module {node.target}"
    return getattr(node.target, "__name__", str(node.target))


def describe_uses(users: list[fx.Node]) -> str:
    """``"also read by Tensor.mean, returned from the graph"``: what else reads the scores (rejection reasons)."""
    names = sorted({"returned from the graph" if u.op == "output" else f"read by {op_name(u)}" for u in users})
    return "also " + ", ".join(names) if names else "also read elsewhere"
