"""The visual report: ``attncc inspect MODEL --html PATH`` and ``--format dot|svg``.

The HTML page is opened in a real headless browser (Debian's Chromium): the rendered DOM holds the site table and
the graphs, and the screenshot is not blank. Without Chromium the browser tests skip, unless
``ATTNCC_REQUIRE_BROWSER`` is set (CI sets it, so there a missing browser fails).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import textwrap
import xml.etree.ElementTree as ET

import pytest

import attncc
from attncc.cli import main
from attncc.visual import render, site_views
from attncc.visual.svg import MAX_LABEL

SVG = "{http://www.w3.org/2000/svg}"

REJECTED_MODEL = """
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self, squared):
            super().__init__()
            self.qkv = nn.Linear(32, 96)
            self.squared = squared
        def forward(self, x):
            q, k, v = self.qkv(x).view(1, 16, 3, 2, 16).permute(2, 0, 3, 1, 4)
            p = (q @ k.transpose(-2, -1) * 0.25).softmax(-1)
            if self.squared:  # probabilities changed after the softmax: not attention attncc may rewrite
                p = p.pow(2)
            return (p @ v).transpose(1, 2).reshape(1, 16, 32)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.plain = Attention(False)
            self.squared = Attention(True)
        def forward(self, x):
            return self.squared(self.plain(x))

    def build():
        torch.manual_seed(0)
        return Model(), (torch.randn(1, 16, 32),)
"""


# ------------------------------------------------------------------------------------------------ the browser


def chromium() -> str:
    """The Chromium executable; skips the test without one unless ATTNCC_REQUIRE_BROWSER is set."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("ATTNCC_REQUIRE_BROWSER"):
            pytest.fail("ATTNCC_REQUIRE_BROWSER is set but chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium); set ATTNCC_REQUIRE_BROWSER to fail")
    return path


def browse(page, tmp_path, *mode: str) -> subprocess.CompletedProcess:
    """Run headless Chromium on ``page`` offline (no network, sync or updates) with ``mode`` arguments."""
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--window-size=1280,1600", *mode, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------------------------------- fixtures


def run_cli(*args: str) -> tuple[int, str]:
    """``attncc ARGS`` in-process: (exit status, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(list(args))
    return status, out.getvalue()


@pytest.fixture(scope="module")
def demo_page(tmp_path_factory):
    """The demo under a local policy, one CLI run: (HTML path, HTML text, the DOT text it printed)."""
    path = tmp_path_factory.mktemp("visual") / "report.html"
    status, dot = run_cli("inspect", "demo", "--seq-len", "32", "--policy", "local(window=8)", "--html", str(path),
                          "--format", "dot")
    assert status == 0
    return path, path.read_text(encoding="utf-8"), dot


@pytest.fixture(scope="module")
def demo_compiled():
    from attncc.models import load_model

    loaded = load_model("demo", seq_len=32)
    return attncc.compile(loaded.model, "local(window=8)", example_inputs=loaded.example_inputs)


@pytest.fixture(scope="module")
def rejected_spec(tmp_path_factory):
    path = tmp_path_factory.mktemp("rejected") / "two_blocks.py"
    path.write_text(textwrap.dedent(REJECTED_MODEL))
    return f"{path}:build"


# ------------------------------------------------------------------------------------------ HTML in a browser


def test_html_renders_in_headless_chromium(demo_page, tmp_path):
    from PIL import Image, ImageStat

    path, _, _ = demo_page
    dom = browse(path, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    table = re.search(r'<table id="sites">.*?</table>', html, re.S)
    assert table, html[:2000]
    rows = re.findall(r"<tr>.*?</tr>", table.group(0).split("<tbody>")[1], re.S)
    assert len(rows) == 4 and all(f"blocks.{i}.attn" in row for i, row in enumerate(rows))
    assert html.count('class="graph"') == 8  # before and after of each of the 4 sites, rendered inline
    assert html.count('data-role="op"') == 4

    screenshot = tmp_path / "report.png"
    shot = browse(path, tmp_path, f"--screenshot={screenshot}")
    assert shot.returncode == 0 and screenshot.stat().st_size > 0, shot.stderr[-2000:]
    with Image.open(screenshot) as image:
        assert image.size == (1280, 1600)
        gray = image.convert("L")
        assert ImageStat.Stat(gray).var[0] > 100  # text, tables and boxes: not a blank page
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 50  # more than a few flat colours: the graphs drew


def test_html_is_self_contained(demo_page):
    _, html, _ = demo_page
    assert "<script" not in html and "<link" not in html and "@import" not in html and "src=" not in html
    assert set(re.findall(r"https?://[^\s\"')]+", html)) <= {"http://www.w3.org/2000/svg"}


def test_html_states_the_reports_facts(demo_page, demo_compiled):
    """Every site's FLOPs, measured error and mask as ``cm.report()`` gives them (same inputs, same policy)."""
    from attncc.report import _error_cells, _gflop

    _, html, _ = demo_page
    report = demo_compiled.report()
    assert len(report.sites) == 4
    for site in report.sites:
        section = html.split(f'id="site-{site.index}"')[1].split('<section class="site"')[0]
        assert f"attn GFLOP {_gflop(site.flops_before)} -&gt; {_gflop(site.flops_after)}" in section
        rel_l2, cosine = _error_cells(site)
        assert f"rel. error {rel_l2}, cosine {cosine}" in section and site.rel_l2 > 0  # approximate: measured
        assert f"mask {site.mask}" in section and "local(window=8)" in section


def test_labels_are_short_and_details_hold_the_node(demo_compiled):
    report, views = site_views(demo_compiled)
    assert [v.site for v in views] == report.sites
    for view in views:
        roles = {data["role"] for _, data in view.before.nodes(data=True)}
        assert {"q", "k", "v", "removed", "mask", "user"} <= roles, roles  # the tril mask of the demo
        labels = [data["label"] for _, data in view.before.nodes(data=True) if data["role"] == "removed"]
        assert {"matmul", "softmax", "masked_fill"} <= set(labels), labels
        ops = [n for n, data in view.after.nodes(data=True) if data["role"] == "op"]
        assert len(ops) == 1 and view.after.nodes[ops[0]]["label"] == "attncc.attention"
        assert "torch.ops.attncc.attention" in view.after.nodes[ops[0]]["detail"]
        assert ("variant", "'local(window=8)'") in view.arguments and ("causal", "True") in view.arguments
    svg = render(demo_compiled, "svg", title="demo")
    for text in ET.fromstring(svg).iter(f"{SVG}text"):
        assert len(text.text or "") <= max(MAX_LABEL, 200)
    for node in ET.fromstring(svg).iter(f"{SVG}g"):
        if node.get("class") == "node":
            assert len(node.find(f"{SVG}text").text) <= MAX_LABEL


# ------------------------------------------------------------------------------------------------ DOT and SVG


def test_format_dot_has_one_cluster_per_site(demo_page):
    _, _, dot = demo_page
    assert dot.startswith("digraph attncc {") and dot.rstrip().endswith("}")
    clusters = re.findall(r"subgraph (cluster_\w+) \{", dot)
    assert clusters == [f"cluster_site{i}" for i in range(4)]
    assert dot.count('label="rewritten as"') == 4
    declared = set(re.findall(r'^\s+("(?:[^"\\]|\\.)*") \[label=', dot, re.M))
    edges = re.findall(r'^\s+("(?:[^"\\]|\\.)*") -> ("(?:[^"\\]|\\.)*")', dot, re.M)
    assert len(edges) > 4 * 10
    for source, target in edges:
        assert source in declared and target in declared
    assert dot.count("{") == dot.count("}")


def test_svg_parses_and_draws_every_site(demo_compiled):
    root = ET.fromstring(render(demo_compiled, "svg", title="demo").split("?>", 1)[1])
    graphs = [e for e in root.iter(f"{SVG}svg") if e.get("class") == "graph"]
    assert len(graphs) == 8
    nodes = [g for g in root.iter(f"{SVG}g") if g.get("class") == "node"]
    assert nodes and all(g.find(f"{SVG}title") is not None and g.find(f"{SVG}rect") is not None for g in nodes)
    assert sum(g.get("data-role") == "op" for g in nodes) == 4


# ----------------------------------------------------------------------------------------------- real models


@pytest.mark.slow
def test_hf_llama_page(tmp_path):
    pytest.importorskip("transformers")
    path = tmp_path / "llama.html"
    assert main(["inspect", "hf:llama", "--seq-len", "32", "--html", str(path)]) == 0
    html = path.read_text(encoding="utf-8")
    assert html.count('id="site-') == 2 and "layers.1.self_attn" in html
    assert html.count('data-role="op"') == 2
    assert "softmax" in html and 'data-role="removed"' in html  # the eager attention's chain, matched
    assert "dynamo" in html  # transformers 5 models go through Dynamo: the graphs drawn are Dynamo's


def test_rejected_site_is_listed_with_its_reason(rejected_spec, tmp_path):
    path = tmp_path / "rejected.html"
    status, dot = run_cli("inspect", rejected_spec, "--html", str(path), "--format", "dot")
    assert status == 0
    html = path.read_text(encoding="utf-8")
    table = re.search(r'<table id="rejected">.*?</table>', html, re.S).group(0)
    assert "squared" in table and "applied to the attention probabilities" in table
    assert html.count('id="site-') == 1 and "plain" in html
    assert "not rewritten: squared" in dot and dot.count("subgraph cluster_") == 1


def test_policy_none_draws_sites_left_as_they_were(rejected_spec):
    status, svg = run_cli("inspect", rejected_spec, "--policy", "none", "--format", "svg")
    assert status == 0
    root = ET.fromstring(svg.split("?>", 1)[1])
    roles = [g.get("data-role") for g in root.iter(f"{SVG}g") if g.get("class") == "node"]
    assert "op" not in roles and "removed" not in roles and "kept" in roles
    assert len([e for e in root.iter(f"{SVG}svg") if e.get("class") == "graph"]) == 1  # before only
    assert "left as it was" in svg


# ---------------------------------------------------------------------------------------- writing the file


def one_error_line(capfd) -> str:
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("attncc: error: ") and "Traceback" not in err, err
    return err


def test_existing_file_is_kept_without_force(rejected_spec, tmp_path, capfd):
    path = tmp_path / "report.html"
    path.write_text("mine")
    assert main(["inspect", rejected_spec, "--html", str(path)]) == 2
    assert "exists; use --force" in one_error_line(capfd)
    assert path.read_text() == "mine"
    assert main(["inspect", rejected_spec, "--html", str(path), "--force"]) == 0
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


@pytest.mark.parametrize("where,phrase", [("missing/report.html", "no such folder"),
                                          ("a_file/report.html", "no such folder"),
                                          (".", "is a folder")])
def test_unwritable_paths_are_one_line(tmp_path, capfd, where, phrase):
    (tmp_path / "a_file").write_text("")
    assert main(["inspect", "demo", "--html", str(tmp_path / where)]) == 2
    assert phrase in one_error_line(capfd)


@pytest.mark.parametrize("args,phrase", [(["--force"], "--force only applies to --html"),
                                         (["--json", "--format", "dot"], "two outputs"),
                                         (["--format", "svg", "--graph"], "--graph")])
def test_conflicting_options_are_one_line(capfd, args, phrase):
    assert main(["inspect", "demo", *args]) == 2
    assert phrase in one_error_line(capfd)
