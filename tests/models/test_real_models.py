"""attncc on real model code: transformers gpt2, llama, bert, vit, t5 (eager and sdpa) and timm vit, swin.

For each model, with its weights random and its sizes tiny:
  * the sites found are exactly the model's attention computations, counted from its config (not from attncc),
    each in a distinct real submodule, with the head counts the config says;
  * the "exact" policy reproduces the model's output (fp32, relative L2 error <= 1e-5);
  * the rewritten graphs compose with torch.compile: through AOTAutograd (backend="aot_eager") the custom op
    stays one node per site, the output still matches, and capture adds no graph break (Dynamo captures as many
    graphs with attncc as without; an fx-captured graph is one Dynamo graph with fullgraph=True).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
import torch.fx as fx

import attncc
from attncc.frontend import CallArgs, placeholder_values
from attncc.models import load_model

pytestmark = pytest.mark.slow

ATTN_OP = torch.ops.attncc.attention.default
TOL = 1e-5


# ------------------------------------------------------------------ what each model really has


def _layers(n: int) -> list[tuple[str]]:
    """The regex groups of the site modules of n numbered layers: ('0',), ('1',), ..."""
    return [(str(i),) for i in range(n)]


def _gpt2(model):
    n = model.config.n_layer
    return {"count": n, "pattern": r"h\.(\d+)\.attn", "where": _layers(n), "q_heads": model.config.n_head,
            "kv_heads": model.config.n_head}


def _llama(model):
    cfg = model.config
    return {"count": cfg.num_hidden_layers, "pattern": r"layers\.(\d+)\.self_attn",
            "where": _layers(cfg.num_hidden_layers), "q_heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim}


def _bert(model):
    cfg = model.config
    return {"count": cfg.num_hidden_layers, "pattern": r"encoder\.layer\.(\d+)\.attention\.self",
            "where": _layers(cfg.num_hidden_layers),
            "q_heads": cfg.num_attention_heads, "kv_heads": cfg.num_attention_heads,
            "head_dim": cfg.hidden_size // cfg.num_attention_heads}


def _vit(model):
    cfg = model.config
    tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1  # patches + cls
    return {"count": cfg.num_hidden_layers, "pattern": r"(?:encoder\.)?layers?\.(\d+)\.attention(?:\.attention)?",
            "where": _layers(cfg.num_hidden_layers),
            "q_heads": cfg.num_attention_heads, "kv_heads": cfg.num_attention_heads,
            "head_dim": cfg.hidden_size // cfg.num_attention_heads, "q_len": tokens}


def _t5(model):
    cfg = model.config
    return {"count": cfg.num_layers + 2 * cfg.num_decoder_layers, "cross": cfg.num_decoder_layers,
            "pattern": r"(encoder|decoder)\.block\.(\d+)\.layer\.([01])\.(SelfAttention|EncDecAttention)",
            "where": [("encoder", str(i), "0", "SelfAttention") for i in range(cfg.num_layers)]
            + [("decoder", str(i), "0", "SelfAttention") for i in range(cfg.num_decoder_layers)]
            + [("decoder", str(i), "1", "EncDecAttention") for i in range(cfg.num_decoder_layers)],
            "q_heads": cfg.num_heads, "kv_heads": cfg.num_heads, "head_dim": cfg.d_kv}


def _timm_vit(model):
    return {"count": len(model.blocks), "pattern": r"blocks\.(\d+)\.attn", "where": _layers(len(model.blocks)),
            "q_heads": model.blocks[0].attn.num_heads, "kv_heads": model.blocks[0].attn.num_heads,
            "q_len": model.patch_embed.num_patches + model.num_prefix_tokens}


def _timm_swin(model):
    depths = [len(stage.blocks) for stage in model.layers]
    return {"count": sum(depths), "pattern": r"layers\.(\d+)\.blocks\.(\d+)\.attn",
            "where": [(str(stage), str(block)) for stage, depth in enumerate(depths) for block in range(depth)]}


@dataclass(frozen=True)
class Case:
    spec: str
    attn: str
    facts: Callable[[Any], dict]
    batch: int = 2

    @property
    def id(self) -> str:
        name = self.spec.replace(":", "-")
        return f"{name}-{self.attn}" if self.spec.startswith("hf:") else name


CASES = [Case(f"hf:{arch}", attn, facts)
         for arch, facts in (("gpt2", _gpt2), ("llama", _llama), ("bert", _bert), ("vit", _vit), ("t5", _t5))
         for attn in ("sdpa", "eager")]
CASES += [Case("timm:vit_tiny_patch16_224", "eager", _timm_vit, batch=1),
          Case("timm:swin_tiny_patch4_window7_224", "eager", _timm_swin, batch=1)]


# ------------------------------------------------------------------ helpers


def _call(fn, inputs):
    with torch.no_grad():
        return fn(**inputs) if isinstance(inputs, dict) else fn(*inputs)


def _main_output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for name in ("last_hidden_state", "logits"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    return out[0]


def _rel_err(got, want) -> float:
    got, want = _main_output(got).double(), _main_output(want).double()
    assert got.shape == want.shape
    return ((got - want).norm() / want.norm()).item()


def _op_count(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is ATTN_OP)


def _count_dynamo_graphs(model, inputs) -> int:
    """How many graphs Dynamo captures for the unmodified model (a counting backend that runs them eagerly)."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    _call(torch.compile(model, backend=counting), inputs)
    torch._dynamo.reset()
    return len(graphs)


def _recording_aot_backend():
    """aot_eager, but keeping the graphs AOTAutograd hands to its compiler (after functionalization)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    aot_graphs: list[fx.GraphModule] = []

    def keep(gm, example_inputs):
        aot_graphs.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=keep), aot_graphs


@dataclass
class Built:
    case: Case
    model: torch.nn.Module
    inputs: Any
    facts: dict
    reference: Any
    compiled: Any
    output: Any
    extra: dict = field(default_factory=dict)


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def built(request) -> Built:
    case: Case = request.param
    torch._dynamo.reset()  # many models share code objects: start each from an empty Dynamo cache
    loaded = load_model(case.spec, attn=case.attn, seq_len=16, batch=case.batch)
    model, inputs = loaded.model.eval(), loaded.example_inputs
    if case.spec.startswith("hf:"):
        assert model.config._attn_implementation == case.attn
    reference = _call(model, inputs)
    cm = attncc.compile(model, "exact", example_inputs=inputs, strict=True)
    output = _call(cm, inputs)
    return Built(case, model, inputs, case.facts(model), reference, cm, output)


# ------------------------------------------------------------------ 1. sites


def test_sites_are_the_models_attentions(built):
    facts, model = built.facts, built.model
    report = built.compiled.report()
    sites = report.sites
    assert len(sites) == facts["count"], report.render()
    # One rewritten op per site, in the graphs attncc runs.
    assert sum(_op_count(gm) for gm in built.compiled.graph_modules) == facts["count"]
    assert all(s.variant == "exact" for s in sites)

    modules = [s.module for s in sites]
    assert len(set(modules)) == len(modules), f"two sites in one module: {modules}"
    layer_ids = []
    for name in modules:
        match = re.fullmatch(facts["pattern"], name)
        assert match, f"site module {name!r} does not look like {facts['pattern']!r}"
        model.get_submodule(name)  # a real submodule path of the model
        layer_ids.append(match.groups())
    # One site in each attention module the model has (layer indices, and for t5 which stack and sublayer).
    assert sorted(layer_ids) == sorted(facts["where"])

    for s in sites:
        if "q_heads" in facts:
            assert (s.q_heads, s.kv_heads) == (facts["q_heads"], facts["kv_heads"]), s
        if "head_dim" in facts:
            assert s.head_dim == s.value_dim == facts["head_dim"], s
        if "q_len" in facts:
            assert s.q_len == s.kv_len == facts["q_len"], s
        elif built.case.spec.startswith("hf:"):
            assert s.q_len == s.kv_len == 16, s
        assert s.dtype == "float32"

    if "cross" in facts:  # t5
        cross = [s for s in sites if s.kind == "cross"]
        assert len(cross) == facts["cross"]
        assert all("EncDecAttention" in s.module and s.module.startswith("decoder.") for s in cross)
        assert all("EncDecAttention" not in s.module for s in sites if s.kind == "self")
        decoder_self = [s for s in sites if s.kind == "self" and s.module.startswith("decoder.")]
        assert len(decoder_self) == model.config.num_decoder_layers
        # The decoder's self attention is causal: it is either flagged so or masked (t5 adds the causal mask
        # to its position bias).
        assert all(s.causal or s.mask != "none" for s in decoder_self)
    else:
        assert all(s.kind == "self" for s in sites)
    if built.case.spec in ("hf:gpt2", "hf:llama"):  # decoders: every site is causal or masked
        assert all(s.causal or s.mask != "none" for s in sites)


# ------------------------------------------------------------------ 2. exact outputs


def test_exact_policy_matches_original(built):
    assert _rel_err(built.output, built.reference) <= TOL
    assert type(built.output) is type(built.reference)
    if not isinstance(built.reference, torch.Tensor):
        assert built.output.keys() == built.reference.keys()


# ------------------------------------------------------------------ 3. torch.compile


def test_composes_with_torch_compile(built):
    model, inputs, facts = built.model, built.inputs, built.facts
    frontend = built.compiled.report().frontend
    if frontend == "dynamo":
        # No graph break added: Dynamo captures as many graphs with attncc's rewrite as for the plain model.
        plain_graphs = _count_dynamo_graphs(model, inputs)
        assert built.compiled.report().graphs == plain_graphs

        cm = attncc.compile(model, "exact", example_inputs=inputs, backend="aot_eager", strict=True)
        assert _rel_err(_call(cm, inputs), built.reference) <= TOL
        report = cm.report()
        assert (report.frontend, report.graphs, len(report.sites)) == ("dynamo", plain_graphs, facts["count"])

        # Through AOTAutograd the op stays one opaque node per site (aot_eager, with the graphs kept).
        torch._dynamo.reset()
        backend, aot_graphs = _recording_aot_backend()
        cm = attncc.compile(model, "exact", example_inputs=inputs, backend=backend, strict=True)
        assert _rel_err(_call(cm, inputs), built.reference) <= TOL
        assert len(aot_graphs) == plain_graphs
        assert sum(_op_count(gm) for gm in aot_graphs) == facts["count"]
    else:
        assert frontend == "fx"
        (gm,) = built.compiled.graph_modules
        # The graph's placeholders: the model's inputs, then its defaulted arguments (fixed when traced).
        values = placeholder_values(gm, CallArgs.from_example(inputs))
        assert all(value is given for value, given in zip(values, inputs))
        torch._dynamo.reset()
        with torch.no_grad():
            explanation = torch._dynamo.explain(gm)(*values)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
        assert _op_count(explanation.graphs[0]) == facts["count"]

        torch._dynamo.reset()
        backend, aot_graphs = _recording_aot_backend()
        compiled = torch.compile(built.compiled, backend=backend, fullgraph=True)
        assert _rel_err(_call(compiled, inputs), built.reference) <= TOL
        assert len(aot_graphs) == 1 and _op_count(aot_graphs[0]) == facts["count"]

        torch._dynamo.reset()
        compiled = torch.compile(built.compiled, backend="aot_eager", fullgraph=True)
        assert _rel_err(_call(compiled, inputs), built.reference) <= TOL
    torch._dynamo.reset()
