"""Copying a GraphModule so a pass can edit the copy and leave its input untouched."""

from __future__ import annotations

import torch.fx as fx


def copy_graph_module(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A GraphModule over a copy of ``gm``'s graph (same submodules and parameters), and the old->new node map.

    Node metadata is copied; Dynamo's ``example_value`` is also exposed as ``meta['val']``, the key passes read.
    """
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, value_map))
    for old, new in value_map.items():
        new.meta = dict(old.meta)
        if "val" not in new.meta and "example_value" in new.meta:
            new.meta["val"] = new.meta["example_value"]
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__), value_map
