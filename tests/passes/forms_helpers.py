"""Shared helpers for the hand-written attention form tests: compile a form, count ops, compare outputs."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

import attncc
from attncc.passes import graph_ops as g

ATTENTION_OP = torch.ops.attncc.attention.default
FRONTENDS = ("fx", "dynamo")

# small, fixed sizes shared by the forms
B, H, N, D = 2, 4, 12, 16


class QKV(torch.nn.Module):
    """A module around ``fn(q, k, v)``: one attention form per test case."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, v):
        return self.fn(q, k, v)


class QKVM(torch.nn.Module):
    """A module around ``fn(q, k, v, m)``: a form with a mask or bias input."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, v, m):
        return self.fn(q, k, v, m)


def rand(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 7919 + sum(shape))
    return torch.randn(*shape, generator=gen, dtype=dtype)


def qkv(*, hq: int = H, hkv: int = H, nq: int = N, nk: int = N, d: int = D, dv: int = D, b: int = B, seed: int = 0):
    return rand(b, hq, nq, d, seed=seed), rand(b, hkv, nk, d, seed=seed + 1), rand(b, hkv, nk, dv, seed=seed + 2)


def keep_mask(*shape: int, seed: int = 0) -> torch.Tensor:
    """A random bool mask (True = attend) that never masks a whole row (the diagonal is kept)."""
    gen = torch.Generator().manual_seed(seed + 11)
    m = torch.rand(*shape, generator=gen) > 0.4
    eye = torch.eye(shape[-2], shape[-1], dtype=torch.bool)
    return m | eye


def run_model(model: torch.nn.Module, inputs: Any):
    with torch.no_grad():
        if isinstance(inputs, dict):
            return model(**inputs)
        return model(*inputs)


def compile_form(model: torch.nn.Module, inputs: Any, frontend: str, policy: str = "exact"):
    """attncc.compile with strict=True (so verify_graph runs on every rewritten graph)."""
    if frontend == "dynamo":
        torch._dynamo.reset()
    return attncc.compile(model, policy, example_inputs=inputs, frontend=frontend, strict=True)


def all_nodes(cm):
    for gm in cm.graph_modules:
        yield from gm.graph.nodes


def count_ops(cm) -> int:
    return sum(1 for n in all_nodes(cm) if n.op == "call_function" and n.target is ATTENTION_OP)


def op_nodes(cm) -> list[fx.Node]:
    return [n for n in all_nodes(cm) if n.op == "call_function" and n.target is ATTENTION_OP]


def count_softmax_like(cm) -> int:
    """softmax / SDPA calls (any spelling, including nn.Softmax modules) left in the graphs."""
    count = 0
    for gm in cm.graph_modules:
        for n in gm.graph.nodes:
            if g.is_softmax(n) or g.is_sdpa(n):
                count += 1
            elif n.op == "call_module" and isinstance(gm.get_submodule(n.target), torch.nn.Softmax):
                count += 1
    return count


def rel_err(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, (got.shape, want.shape)
    denom = want.norm().item()
    return (got - want).norm().item() / (denom if denom > 0 else 1.0)


def flat_outputs(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in flat_outputs(item)]
    if isinstance(x, dict):
        return [t for item in x.values() for t in flat_outputs(item)]
    return []


def assert_same_outputs(got, want, tol: float = 1e-5) -> None:
    got_l, want_l = flat_outputs(got), flat_outputs(want)
    assert len(got_l) == len(want_l)
    for a, b in zip(got_l, want_l):
        assert torch.isfinite(a).all()
        err = rel_err(a, b)
        assert err <= tol, f"relative error {err:.3g} > {tol}"


def compile_exactly(model: torch.nn.Module, inputs: Any, frontend: str):
    """Compile with the exact policy and check the form became one exact site: one attncc op, no softmax left,
    nothing refused, outputs equal to the original's. Returns the compiled module."""
    want = run_model(model, inputs)
    cm = compile_form(model, inputs, frontend)
    rep = cm.report()
    assert count_ops(cm) == 1 and count_softmax_like(cm) == 0, cm.code()
    assert len(rep.sites) == 1 and not rep.rejected, rep
    assert_same_outputs(run_model(cm, inputs), want)
    return cm


def check_fields(site, expected: dict) -> None:
    for key, want in expected.items():
        have = getattr(site, key)
        if isinstance(want, float):
            assert have == pytest_approx(want), f"{key}: {have!r} != {want!r}"
        else:
            assert have == want, f"{key}: {have!r} != {want!r}"


def pytest_approx(x: float):
    import pytest

    return pytest.approx(x, rel=1e-6, abs=1e-9)
