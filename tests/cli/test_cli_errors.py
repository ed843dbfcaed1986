"""Every user mistake at the command line is one line ``attncc: error: ...`` on stderr and exit status 2: no
traceback, no torch logs, and the line names the real cause. Information (a model without attention) exits 0
but says so.
"""

from __future__ import annotations

import logging
import textwrap

import pytest

from attncc.cli import main
from attncc.errors import AttnccError


def factory(tmp_path, body: str, name: str = "mine.py") -> str:
    """A factory file ``build()`` -> (model, inputs) whose source is ``body``; returns the model spec."""
    path = tmp_path / name
    path.write_text("import torch\n" + textwrap.dedent(body))
    return f"{path}:build"


def one_error_line(capfd) -> str:
    """stderr (at the file-descriptor level, so torch's own handlers count too), which must be one error line."""
    err = capfd.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("attncc: error: ")
    assert "Traceback" not in err
    return lines[0]


MISMATCHED_INPUTS = """
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
        def forward(self, x):
            if x.sum() > 0:  # a graph break: capture would go through Dynamo and its fake tensors
                x = x * 2
            h = self.proj(x)
            return torch.softmax(h @ h.transpose(-2, -1), -1) @ h
    def build():
        return Model(), (torch.randn(2, 5, 7),)   # 7 features, the model wants 8
"""


def test_inputs_the_model_rejects_name_the_models_own_error(tmp_path, capfd):
    assert main(["inspect", factory(tmp_path, MISMATCHED_INPUTS)]) == 2
    line = one_error_line(capfd)
    assert line.startswith("attncc: error: the model failed on its example inputs: RuntimeError: mat1 and mat2 "
                           "shapes cannot be multiplied")


def test_capture_failure_names_the_innermost_cause_without_torch_logs(tmp_path, capfd):
    spec = factory(tmp_path, """
        class Model(torch.nn.Module):
            calls = 0
            def forward(self, x):
                Model.calls += 1
                if Model.calls > 1:  # fine when run, broken when captured
                    x = x.reshape(3, -1)
                return torch.softmax(x @ x.transpose(-2, -1), -1) @ x
        def build():
            return Model(), (torch.randn(2, 5, 7),)
    """)
    torch_level = logging.getLogger("torch").level
    assert main(["inspect", spec]) == 2
    line = one_error_line(capfd)
    assert "could not capture the model: RuntimeError: shape '[3, -1]' is invalid" in line
    assert logging.getLogger("torch").level == torch_level, "the CLI restores torch's logging"


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCC_DEBUG", "1")
    with pytest.raises(AttnccError, match="the model failed on its example inputs"):
        main(["inspect", factory(tmp_path, MISMATCHED_INPUTS)])


def test_model_without_attention_says_so_and_exits_0(tmp_path, capsys):
    spec = factory(tmp_path, """
        def build():
            return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()), (torch.randn(2, 8),)
    """)
    assert main(["inspect", spec]) == 0
    out = capsys.readouterr().out
    assert f"no attention found in {spec}" in out
    assert "┏" not in out, "no empty table"


def test_bad_attncc_backend_is_refused_before_the_model_is_built(tmp_path, monkeypatch, capfd):
    marker = tmp_path / "built"
    spec = factory(tmp_path, f"""
        def build():
            open({str(marker)!r}, "w").close()
            return torch.nn.Linear(2, 2), (torch.randn(1, 2),)
    """)
    monkeypatch.setenv("ATTNCC_BACKEND", "bogus")
    assert main(["inspect", spec]) == 2
    line = one_error_line(capfd)
    assert "ATTNCC_BACKEND='bogus'" in line and "auto, triton, torch" in line
    assert not marker.exists()


def test_oversized_demo_is_refused_up_front(capfd):
    # 10^7 tokens: a 100 TB causal mask; refused by the estimate, nothing is allocated
    assert main(["inspect", "demo", "--seq-len", "10000000"]) == 2
    line = one_error_line(capfd)
    assert "seq_len 10000000" in line and "needs about" in line and "of memory available" in line


def test_demo_estimate_uses_the_memory_available(monkeypatch, capfd):
    import attncc.models.demo as demo

    monkeypatch.setattr(demo, "available_memory_bytes", lambda: 1_000_000)  # 1 MB: even the 4096^2 mask is over
    assert main(["demo", "--seq-len", "16", "--repeat", "1"]) == 2
    line = one_error_line(capfd)
    assert "seq_len 16, batch 1" in line and "1.0 MB of memory available" in line


@pytest.mark.parametrize("raise_it", [
    "raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 80.00 GiB')",
    "raise RuntimeError('[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: not enough memory: you tried "
    "to allocate 40000000000 bytes.')",
    "raise MemoryError()",
], ids=["cuda", "cpu-allocator", "memory-error"])
def test_out_of_memory_is_one_line_exit_2(tmp_path, capfd, raise_it):
    spec = factory(tmp_path, f"""
        class Model(torch.nn.Module):
            def forward(self, x):
                {raise_it}
        def build():
            return Model(), (torch.randn(1, 2),)
    """)
    assert main(["inspect", spec]) == 2
    line = one_error_line(capfd)
    assert line.startswith("attncc: error: out of memory: ") and "smaller --seq-len" in line


@pytest.mark.parametrize("policy, says, never", [
    ("local(windo=3)", "valid parameters are window, left, right, sinks, globals", "none"),
    ("exact(x=1)", "exact takes no parameters", "none"),
    ("fastest", "valid variants are exact, local, neighborhood, block_sparse, topk, linear, vertical_slash, heads, "
     "or 'none'", None),
    ("block_sparse(pattern=nope(x=1))", "valid patterns are bigbird", "none"),
], ids=["parameter", "no-parameters", "variant", "pattern"])
def test_policy_errors_name_the_choices_of_their_field(policy, says, never, capfd):
    assert main(["inspect", "demo", "--seq-len", "8", "--policy", policy]) == 2
    line = one_error_line(capfd)
    assert says in line
    assert never is None or never not in line


def test_demo_labels_flops_as_estimates_and_times_as_measured(capsys):
    assert main(["demo", "--seq-len", "16", "--repeat", "1"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps the caption to the console width
    assert "attn FLOPs ratio" in out and "not a measured speedup" in out
    assert "measured time (ms)" in out and "measured speedup" in out
    assert " saved " not in out
