"""Verify: every call node's ``meta['val']`` still matches what its inputs produce (shape and dtype)."""

from __future__ import annotations

import torch
import torch.fx as fx

from attncc.passes.fake_eval import fill_val


class GraphInvariantError(AssertionError):
    """A pass left a node whose recorded value no longer matches its computation."""


def verify_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """Check ``gm`` (lint plus meta['val'] re-derivation of every call node); return it unchanged."""
    gm.graph.lint()
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        recorded = node.meta.get("val")
        if not isinstance(recorded, torch.Tensor):
            continue
        probe = fx.Node(node.graph, "probe", node.op, node.target, node.args, node.kwargs)
        try:
            fill_val(probe)
        except Exception:  # ops that cannot run on fake values (data-dependent): nothing to compare
            continue
        finally:
            for inp in probe.all_input_nodes:
                inp.users.pop(probe, None)
        fresh = probe.meta.get("val")
        if isinstance(fresh, torch.Tensor) and (fresh.shape != recorded.shape or fresh.dtype != recorded.dtype):
            raise GraphInvariantError(
                f"{node.format_node()}: meta['val'] says {tuple(recorded.shape)} {recorded.dtype}, "
                f"recomputed {tuple(fresh.shape)} {fresh.dtype}"
            )
    return gm
