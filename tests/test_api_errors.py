"""User mistakes at the Python API: ``attncc.compile`` and ``attncc.attention`` refuse them with one AttnccError
naming the valid choices (before any capture), and a model with no attention says so instead of looking rewritten.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import attncc
from attncc import AttnccWarning
from attncc.errors import AttnccError
from attncc.report import Report
from attncc.variants.exact import reference


class Attn(torch.nn.Module):
    """One hand-written softmax attention (both frontends capture it)."""

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v


class Fails(torch.nn.Module):
    """Raises if it is ever run: proves a check happened before capture."""

    def forward(self, x):
        raise ValueError("captured before the arguments were checked")


def qkv(hq: int = 2, hkv: int = 2, n: int = 8, d: int = 16):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, hq, n, d, generator=g), torch.randn(1, hkv, n, d, generator=g),
            torch.randn(1, hkv, n, d, generator=g))


# ------------------------------------------------------------------------------------------- backend

@pytest.mark.parametrize("frontend", ["fx", "dynamo"])
@pytest.mark.parametrize("backend", ["no_such_backend", 3])
def test_unknown_backend_is_refused_before_capture(frontend, backend):
    with pytest.raises(AttnccError) as err:
        attncc.compile(Fails(), "exact", (torch.randn(2, 2),), frontend=frontend, backend=backend)
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert f"unknown backend {backend!r}" in message
    assert "eager, aot_eager, inductor" in message and "callable" in message


@pytest.mark.parametrize("name", ["eager", "aot_eager", "inductor", "aot_eager_decomp_partition"])
def test_known_backends_pass_the_check(name):
    attncc.api.check_backend(name)  # names list_backends() hides by default are valid too
    attncc.api.check_backend(lambda gm, inputs: gm.forward)


def test_fx_frontend_runs_the_rewritten_graph_through_the_backend():
    """backend= was ignored on the fx path: the rewritten graph (attncc op included) must reach it."""
    seen = []

    def backend(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    inputs = qkv()
    cm = attncc.compile(Attn(), "exact", inputs, frontend="fx", backend=backend)
    assert cm.report().frontend == "fx"
    out = cm(*inputs)  # the first call measured error through the interpreter; this one runs the backend
    out = cm(*inputs)
    assert len(seen) == 1, "one torch.compile per captured graph, reused"
    assert any(node.target is torch.ops.attncc.attention.default for node in seen[0].graph.nodes)
    torch.testing.assert_close(out, Attn()(*inputs), rtol=1e-5, atol=1e-5)


def test_fx_frontend_with_aot_eager_uses_the_op_fake_implementation():
    inputs = qkv(n=12)
    cm = attncc.compile(Attn(), "exact", inputs, frontend="fx", backend="aot_eager", measure_error=False)
    torch.testing.assert_close(cm(*inputs), Attn()(*inputs), rtol=1e-5, atol=1e-5)
    assert "torch.ops.attncc.attention" in cm.code()


# -------------------------------------------------------------------------------------- ATTNCC_BACKEND

def test_bad_attncc_backend_env_is_one_line_before_capture(monkeypatch):
    monkeypatch.setenv("ATTNCC_BACKEND", "cuda")
    with pytest.raises(AttnccError) as err:
        attncc.compile(Fails(), "exact", (torch.randn(2, 2),))
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert "ATTNCC_BACKEND='cuda'" in message and "auto, triton, torch" in message


# ---------------------------------------------------------------------------------------- no attention

def test_model_without_attention_warns_and_says_so():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = attncc.compile(model, "exact", (torch.randn(2, 8),))
    said = [str(w.message) for w in caught if issubclass(w.category, AttnccWarning)]
    assert said == ["attncc: no attention found in Sequential: nothing was rewritten"]
    report = cm.report()
    assert report.sites == []
    text = report.render(model="my_model.py:build")
    assert text.startswith("no attention found in my_model.py:build")
    assert "┏" not in text, "no empty table"
    assert "no attention found in the model" in str(report)


def test_no_attention_is_said_when_captured_at_the_first_call_too():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    cm = attncc.compile(model, "exact")
    with pytest.warns(AttnccWarning, match="no attention found in Sequential"):
        cm(torch.randn(2, 8))


def test_model_with_attention_does_not_warn():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = attncc.compile(Attn(), "exact", qkv())
    assert not [w for w in caught if "no attention" in str(w.message)]
    assert "no attention found" not in cm.report().render()


# ------------------------------------------------------------------------------------ report labels

def test_flop_columns_are_labelled_as_estimates_not_measured_time():
    cm = attncc.compile(Attn(), "local(window=2)", qkv(n=32))
    table = cm.report().table()
    headers = [" ".join(str(column.header).split()) for column in table.columns]  # headers may break lines
    assert "attn GFLOP" in headers and "attn FLOPs ratio" in headers
    assert not any(h in ("saved", "GFLOP", "speedup") for h in headers)
    assert "not a measured speedup" in str(table.caption)
    assert "attn FLOPs ratio" in cm.report().render()


def test_empty_report_before_capture_is_unchanged():
    assert "nothing captured yet" in Report(captured=False).render()


# ------------------------------------------------------------------------------------- attention()

def test_heads_that_do_not_divide_name_the_shapes():
    q, k, v = qkv(hq=3, hkv=2)
    with pytest.raises(AttnccError) as err:
        attncc.attention(q, k, v)
    message = str(err.value)
    assert "3 query heads and 2 key / 2 value heads" in message
    assert "(1, 3, 8, 16)" in message and "(1, 2, 8, 16)" in message


@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 1), (3, 3)], ids=["gqa", "mqa", "mha"])
def test_valid_head_groupings_still_run(hq, hkv):
    q, k, v = qkv(hq=hq, hkv=hkv)
    torch.testing.assert_close(attncc.attention(q, k, v), reference(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, message", [
    (lambda q, k, v: (q.double(), k, v, {}), "one floating dtype, got q torch.float64, k torch.float32"),
    (lambda q, k, v: (q, k.to("meta"), v, {}), "one device, got q cpu, k meta, v cpu"),
    (lambda q, k, v: (q, k, v, {"mask": torch.ones(8, 8)}), "mask must be bool, got torch.float32"),
    (lambda q, k, v: (q, k, v, {"bias": torch.ones(8, 8, dtype=torch.bool)}), "bias must be floating"),
    (lambda q, k, v: (q, k, v, {"mask": torch.ones(9, 8, dtype=torch.bool)}),
     "mask of shape (9, 8) does not broadcast to the scores (1, 2, 8, 8)"),
    (lambda q, k, v: (q.expand(2, -1, -1, -1), k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1), {}),
     "the batch dims of q (2, 2, 8, 16), k (3, 2, 8, 16), v (3, 2, 8, 16) do not broadcast"),
    (lambda q, k, v: (q, k[..., :8], v, {}), "incompatible shapes"),
], ids=["dtype", "device", "float-mask", "bool-bias", "mask-shape", "batch", "head-dim"])
def test_bad_attention_inputs_are_one_clear_error(make, message):
    q, k, v, kwargs = make(*qkv())
    with pytest.raises(AttnccError) as err:
        attncc.attention(q, k, v, **kwargs)
    assert message in str(err.value)
    assert len(str(err.value).splitlines()) == 1
