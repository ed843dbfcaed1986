"""``attncc.export`` -> ``torch.export.save`` -> ``attncc.load`` in a fresh process gives ``attncc.compile``'s
outputs (fp32, relative error <= 1e-5): an HF decoder (Llama, exact and ``local(window=8)``), an HF encoder with
padding (BERT), a timm ViT and the built-in demo (``local(window=8)``); the text models at two sequence lengths from one ``.pt2``.

Every case is exported once (module fixture) and every ``.pt2`` is loaded and run by one subprocess, so the fresh
process costs one start. Then: exports that would lose the rewrite fail with AttnccError, and the CLI.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn as nn

import attncc
from attncc.cli.common import main_tensor
from attncc.errors import AttnccError

LENGTHS = (32, 48)
"""The example length every text model is exported at, and a second one the same program must serve."""
ROOT = Path(attncc.__file__).resolve().parents[1]


def llama():
    from attncc.models import load_model

    return load_model("hf:llama", seq_len=LENGTHS[0]).model


def token_inputs(n: int, batch: int = 1, vocab: int = 100, padded: int = 0) -> dict:
    ids = torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(n))
    inputs = {"input_ids": ids}
    if padded:  # the last row ends in padding
        mask = torch.ones(batch, n, dtype=torch.long)
        mask[-1, n - padded:] = 0
        inputs["attention_mask"] = mask
    return inputs


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    policy: str
    inputs: list  # one call's inputs (dict of keyword or tuple of positional arguments) per length
    dynamic: object = "seq"
    variant: str = "exact"
    check_compile: bool = False
    """attncc.export's own comparison with attncc.compile (the test compares outputs with compile's anyway); on
    in one case, off in the others to keep the suite fast."""
    results: dict = field(default_factory=dict)


def bert():
    from attncc.models import load_model

    return load_model("hf:bert", seq_len=LENGTHS[0], batch=2).model


def vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2).eval()


def demo():
    from attncc.models.demo import build_demo_model

    return build_demo_model(seq_len=LENGTHS[0]).model


CASES = [
    Case("llama_exact", llama, "exact", [token_inputs(n) for n in LENGTHS]),
    Case("llama_local", llama, "local(window=8)", [token_inputs(n) for n in LENGTHS], variant="local(window=8)",
         check_compile=True),
    Case("bert_padding", bert, "exact", [token_inputs(n, batch=2, padded=7) for n in LENGTHS]),
    Case("vit", vit, "exact", [(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)),)],
         dynamic=None),
    Case("demo_local", demo, "local(window=8)", [(token_inputs(n, vocab=512)["input_ids"],) for n in LENGTHS],
         variant="local(window=8)"),
]

LOADER = textwrap.dedent("""
    import json, sys, torch
    import attncc
    from attncc.cli.common import main_tensor
    for job in json.load(open(sys.argv[1])):
        model = attncc.load(job["program"])
        outputs = []
        for call in torch.load(job["inputs"]):
            with torch.no_grad():
                out = model(**call) if isinstance(call, dict) else model(*call)
            outputs.append(main_tensor(out))
        torch.save(outputs, job["outputs"])
""")


def call(model, inputs):
    with torch.no_grad():
        return main_tensor(model(**inputs) if isinstance(inputs, dict) else model(*inputs))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each case exported, saved, loaded and run at each length in ONE fresh process; with what the compiled
    model and the original model give at the same lengths."""
    folder = tmp_path_factory.mktemp("export")
    jobs = []
    for case in CASES:
        model = case.build()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = attncc.export(model, case.policy, case.inputs[0], dynamic=case.dynamic,
                                    check_compile=case.check_compile)
            compiled = attncc.compile(model, case.policy, case.inputs[0])
            case.results["compiled"] = [call(compiled, inputs) for inputs in case.inputs]
        case.results["original"] = [call(model, inputs) for inputs in case.inputs]
        case.results["program"] = program
        path = folder / f"{case.name}.pt2"
        torch.export.save(program, path)
        torch.save(case.inputs, folder / f"{case.name}.inputs.pt")
        jobs.append({"program": str(path), "inputs": str(folder / f"{case.name}.inputs.pt"),
                     "outputs": str(folder / f"{case.name}.outputs.pt")})
    (folder / "jobs.json").write_text(json.dumps(jobs))
    (folder / "loader.py").write_text(LOADER)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, str(folder / "loader.py"), str(folder / "jobs.json")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for case, job in zip(CASES, jobs):
        case.results["loaded"] = torch.load(job["outputs"])
    return {case.name: case for case in CASES}


def op_argument(node, name: str, default):
    """An argument of an op call node, by its schema name (export may pass it by position or keyword)."""
    bound = dict(zip([a.name for a in node.target._schema.arguments], node.args))
    bound.update(node.kwargs)
    return bound.get(name, default)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_loaded_in_a_fresh_process_gives_the_compiled_outputs(exported, name):
    case = exported[name]
    for n, loaded, compiled in zip(LENGTHS, case.results["loaded"], case.results["compiled"]):
        assert loaded.shape == compiled.shape
        assert relative_error(loaded, compiled) <= 1e-5, f"length {n}"
    ops = [node for node in case.results["program"].graph.nodes if "attncc.attention" in str(node.target)]
    report = case.results["program"].attncc_report
    assert ops and len(ops) == len(report.sites)
    assert {op_argument(node, "variant", "exact") for node in ops} == {case.variant}
    assert {site.variant for site in report.sites} == {case.variant}


@pytest.mark.parametrize("name", ["llama_local", "demo_local"])
def test_approximate_policy_really_runs_in_the_program(exported, name):
    # window 8 at 32 and 48 tokens: the loaded program's outputs are the local ones, not the model's own
    case = exported[name]
    for loaded, original in zip(case.results["loaded"], case.results["original"]):
        assert relative_error(loaded, original) > 1e-3
    errors = [site.rel_l2 for site in case.results["program"].attncc_report.sites]
    assert all(e is not None and e > 0 for e in errors)  # measured on the example inputs, per site


def test_structure_proven_for_every_length(exported):
    # the causal mask of Llama (index comparisons) and the demo (a slice of a tril buffer) are structure at
    # symbolic lengths, not a tensor evaluated at the example length
    for name in ("llama_exact", "demo_local"):
        report = exported[name].results["program"].attncc_report
        assert all(site.causal for site in report.sites), name
    masks = {site.mask for site in exported["bert_padding"].results["program"].attncc_report.sites}
    assert masks == {"padding"}


# ------------------------------------------------------------------------------------- losing the rewrite
class TinyAttention(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1) @ v


class AttentionInABranch(TinyAttention):
    def forward(self, x):
        return torch.cond(x.sum() > 0, super().forward, torch.clone, (x,))


X = torch.randn(1, 12, 16)


def test_attention_the_export_hides_fails():
    with pytest.raises(AttnccError, match=r"export would lose the rewrite: .* attention inside a branch"):
        attncc.export(AttentionInABranch(), "exact", (X.abs(),))


def test_a_site_compile_rewrites_but_the_export_cannot_fails(monkeypatch):
    # without the softmax row the exported graph's softmax is not read: compile rewrites a site the export lacks
    from attncc.passes import lower_aten

    monkeypatch.setattr(lower_aten, "_BY_OVERLOAD", {o: r for o, r in lower_aten._BY_OVERLOAD.items()
                                                     if r.name not in ("softmax", "internal_softmax")})
    with pytest.raises(AttnccError, match=r"export would lose the rewrite: attncc.compile rewrites <root>: "):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            attncc.export(TinyAttention(), "exact", (X,))


def test_a_program_without_the_ops_fails(monkeypatch):
    export_module = importlib.import_module("attncc.exporting")

    monkeypatch.setattr(export_module, "_with_signature", lambda rewritten, exported, fixed=(): exported)
    with pytest.raises(AttnccError, match=r"1 site\(s\) were rewritten but the exported program holds 0"):
        attncc.export(TinyAttention(), "exact", (X,))


def test_small_model_exports_with_its_report():
    model = TinyAttention()
    program = attncc.export(model, "exact", (X,), dynamic="seq")
    (site,) = program.attncc_report.sites
    assert site.variant == "exact" and program.attncc_report.frontend == "export"
    y = torch.randn(1, 20, 16)  # another length
    torch.testing.assert_close(program.module()(y), model(y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"policy": "none"}, "policy 'none' rewrites nothing"),
    ({"dynamic": "batch"}, "unknown dynamic='batch'"),
    ({"example_inputs": None}, "needs example_inputs"),
])
def test_user_mistakes_are_one_error(kwargs, message):
    arguments = dict(policy="exact", example_inputs=(X,))
    arguments.update(kwargs)
    with pytest.raises(AttnccError, match=message):
        attncc.export(TinyAttention(), arguments.pop("policy"), arguments.pop("example_inputs"), **arguments)


def test_dynamic_seq_without_a_sequence_input_is_one_error():
    class Image(nn.Module):
        def forward(self, image):
            return image.flatten(1).softmax(-1)

    with pytest.raises(AttnccError, match="dynamic='seq' needs a"):
        attncc.export(Image(), "exact", (torch.randn(1, 3, 8, 8),), dynamic="seq")


class TrilMask(TinyAttention):
    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        n = x.size(1)
        keep = torch.ones(n, n, dtype=torch.bool).tril()  # built from the length: constant at one length only
        scores = (q @ k.transpose(-1, -2) * 0.25).masked_fill(~keep, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


def test_mask_not_proven_for_every_length_stays_a_tensor_and_is_right_at_another_length():
    # at a symbolic length the export cannot evaluate the mask once, so the op gets the mask tensor the graph
    # computes at each length
    model = TrilMask()
    program = attncc.export(model, "local(window=4)", (X,), dynamic="seq")
    (site,) = program.attncc_report.sites
    assert site.mask == "dense" and site.variant == "local(window=4)"
    y = torch.randn(1, 30, 16)
    compiled = attncc.compile(model, "local(window=4)", (y,))
    torch.testing.assert_close(program.module()(y), compiled(y), rtol=1e-5, atol=1e-6)


class WithCache(TinyAttention):
    def forward(self, x, use_cache=True):
        return super().forward(x)


def test_use_cache_is_fixed_and_not_an_input():
    model = WithCache()
    program = attncc.export(model, "exact", {"x": X})
    torch.testing.assert_close(program.module()(x=X), model(X), rtol=1e-5, atol=1e-6)
    # dynamic_shapes of the user's own, by name: the fixed keyword needs no entry
    program = attncc.export(model, "exact", {"x": X}, dynamic={"x": {1: torch.export.Dim.DYNAMIC}})
    y = torch.randn(1, 21, 16)
    torch.testing.assert_close(program.module()(x=y), model(y), rtol=1e-5, atol=1e-6)
    with pytest.raises(AttnccError, match="runs the model with use_cache=False"):
        attncc.export(model, "exact", {"x": X, "use_cache": True})


def test_load_missing_file_is_one_error(tmp_path):
    with pytest.raises(AttnccError, match="no such file"):
        attncc.load(tmp_path / "missing.pt2")


# ---------------------------------------------------------------------------------------------------- CLI
FACTORY = textwrap.dedent("""
    import torch, torch.nn as nn

    class TinyAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1) @ v

    def make():
        torch.manual_seed(0)
        return TinyAttention().eval(), (torch.randn(1, 12, 16),)
""")


def test_cli_writes_refuses_to_overwrite_and_forces(tmp_path, capsys):
    from attncc.cli import main

    factory = tmp_path / "tiny.py"
    factory.write_text(FACTORY)
    output = tmp_path / "tiny.pt2"
    assert main(["export", f"{factory}:make", "--policy", "exact", "-o", str(output), "--dynamic", "seq"]) == 0
    assert output.is_file() and "wrote" in capsys.readouterr().out
    loaded = attncc.load(output)
    assert loaded(torch.randn(1, 20, 16)).shape == (1, 20, 16)  # the sequence axis is dynamic
    before = output.stat().st_mtime_ns

    assert main(["export", f"{factory}:make", "-o", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("attncc: error: ") and "--force" in err
    assert output.stat().st_mtime_ns == before

    assert main(["export", f"{factory}:make", "-o", str(output), "--force"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("arguments, message", [
    (["no-such-model"], "unrecognised model spec"),
    (["demo", "--policy", "local(window="], "policy"),
    (["demo", "--policy", "none"], "policy 'none' rewrites nothing"),
])
def test_cli_mistakes_are_one_line(tmp_path, capsys, arguments, message):
    from attncc.cli import main

    assert main(["export", *arguments, "-o", str(tmp_path / "x.pt2"), "--seq-len", "16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("attncc: error: ") and message in err
    assert not (tmp_path / "x.pt2").exists()
