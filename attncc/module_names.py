"""Module names by identity: every site is named as ``model.named_modules()`` names its module.

Dynamo records, on each node, the stack of modules whose forward produced it (``meta['nn_module_stack']``): a key
per module and a source string such as ``L['self'].layers.0`` or ``L['args'][0].layers.0``. The source string
depends on the frame Dynamo compiled (the model's forward, a wrapper around it, a submodule after a graph break)
and on the torch/transformers version, so attncc never parses it into a name. The key is ``str(id(module))`` (with
``@N`` for a repeated call) for modules Dynamo inlines, or an attribute path of the captured GraphModule; either
way it leads to the module object, and the object's name is the one ``named_modules()`` gives it. fx.symbolic_trace
records qualified names of the traced root, which ``named_modules()`` knows too.

The layer number policies select on (``Rule(layers="4-11")``) comes from the model's structure, not from the
first integer in a path: it is the index into the first stack of repeated layers on the module's path (a
ModuleList/Sequential child that has a sibling of its own class), so a wrapper's own index (sentence-transformers'
``0.auto_model...``) is not taken for a layer number.
"""

from __future__ import annotations

import re
from typing import Optional

import torch.fx as fx
import torch.nn as nn

META_KEY = "attncc_module"
"""``node.meta`` key: the node's module name as ``named_modules()`` gives it (set by ``ModuleNames.annotate``)."""


class ModuleNames:
    """Names and layer numbers of a model's submodules, looked up by object identity.

    Example::

        names = ModuleNames(model)
        names.annotate(gm)              # every node with a module stack gets meta['attncc_module']
        names.layer_of("model.layers.3.self_attn")   # 3
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._by_id: dict[int, str] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self._by_id.setdefault(id(module), name)

    def name_of(self, module: object) -> Optional[str]:
        """The ``named_modules()`` name of a submodule of the model ('' for the model itself), None if not one."""
        return self._by_id.get(id(module))

    def annotate(self, gm: fx.GraphModule) -> None:
        """Set ``meta[META_KEY]`` on every node of ``gm`` whose innermost module the model contains."""
        for node in gm.graph.nodes:
            stack = node.meta.get("nn_module_stack")
            if not stack:
                continue
            key, (path, _cls) = list(stack.items())[-1]
            name = self._resolve(gm, key, path)
            if name is not None:
                node.meta[META_KEY] = name

    def _resolve(self, gm: fx.GraphModule, key: str, path: str) -> Optional[str]:
        key = key.split("@")[0]
        if key.isdigit() and int(key) in self._by_id:
            return self._by_id[int(key)]
        for root, attr in ((gm, key), (self.model, path), (self.model, key)):
            try:
                found = root.get_submodule(attr) if attr else None
            except (AttributeError, TypeError):
                continue
            name = self.name_of(found)
            if name is not None:
                return name
        return None

    def layer_of(self, name: str) -> Optional[int]:
        """The layer number of a module: its index in the first stack of repeated layers on its path
        (``model.layers.3.self_attn`` -> 3; ``0.auto_model.encoder.layer.5.attention.self`` -> 5), else the first
        integer in the name, else None."""
        parts = name.split(".") if name else []
        parent: nn.Module = self.model
        for part in parts:
            children = dict(parent.named_children())
            child = children.get(part)
            if child is None:
                break
            if part.isdigit() and sum(type(c) is type(child) for c in children.values()) > 1:
                return int(part)
            parent = child
        return first_integer(name)


def first_integer(name: str) -> Optional[int]:
    """The first integer component of a dotted path (``blocks.3.attn`` -> 3), None if there is none."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def readable_source(path: str) -> str:
    """Dynamo's source string made readable (``L['self'].layers[0]`` -> ``layers.0``), for modules that are not
    submodules of the compiled model (created during forward)."""
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"^L\['(\w+)'\](\[\d+\])?\.?", "", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".")
