"""Unit tests of attncc.report on hand-built sites: the row of a site, its FLOPs before/after, JSON, rendering."""

from __future__ import annotations

import json

import torch

from attncc.measure import SiteError
from attncc.report import RejectedReport, Report, SiteReport, site_flops
from attncc.site import AttentionSite, RejectedSite
from attncc.variants.parse import parse_variant


def _site(**fields) -> AttentionSite:
    base = dict(module="layers.0.attn", source="sdpa", q=None, k=None, v=None, output=None, batch=2, q_heads=8,
                kv_heads=2, q_len=1024, kv_len=1024, head_dim=64, value_dim=64, dtype=torch.float16, causal=True,
                variant="exact", reason="policy: exact")
    base.update(fields)
    return AttentionSite(**base)


def _dense_flops(site: AttentionSite) -> int:
    return 2 * site.batch * site.q_heads * site.q_len * site.kv_len * (site.head_dim + site.value_dim)


def test_row_carries_the_site_and_its_measured_error():
    site = _site(spec=parse_variant("exact"), fallback=parse_variant("exact"))
    row = SiteReport.from_site(site, 3, SiteError(rel_l2=1e-7, cosine=1.0))
    assert row.index == 3
    assert (row.module, row.kind, row.causal, row.dtype) == ("layers.0.attn", "self", True, "float16")
    assert (row.q_heads, row.kv_heads, row.q_len, row.head_dim) == (8, 2, 1024, 64)
    assert row.rel_l2 == 1e-7 and row.cosine == 1.0
    assert row.flops_before == _dense_flops(site)


def test_report_leaves_the_site_unchanged():
    site = _site(spec=parse_variant("exact"))
    before = repr(site)
    SiteReport.from_site(site, 5)
    assert repr(site) == before


def test_channel_attention_reads_as_channel():
    assert SiteReport.from_site(_site(axis="channels"), 0).kind == "channel"


def test_flops_of_a_site_left_alone_are_the_models():
    site = _site(variant="none", spec=None)
    before, after = site_flops(site)
    assert before == after == _dense_flops(site)


def test_flops_after_follow_the_variant():
    site = _site(spec=parse_variant("local(window=128)"), fallback=parse_variant("exact"), causal=False)
    before, after = site_flops(site)
    assert before == _dense_flops(site)
    assert 0 < after < before / 4


def test_flops_below_min_len_are_the_fallbacks():
    site = _site(spec=parse_variant("local(window=128)"), fallback=parse_variant("exact"), min_len=4096)
    before, after = site_flops(site)
    assert after == site_flops(_site(spec=parse_variant("exact")))[1]


def test_dynamic_sizes_give_expression_text():
    site = _site(q_len="s0", kv_len="s0", spec=parse_variant("exact"))
    before, after = site_flops(site)
    assert isinstance(before, str) and "s0" in before
    assert SiteReport.from_site(site, 0).saving is None


def test_saving_is_before_over_after():
    row = SiteReport.from_site(_site(spec=parse_variant("local(window=128)"), causal=False), 0)
    assert row.saving == row.flops_before / row.flops_after


def test_to_dict_is_plain_json():
    report = Report([SiteReport.from_site(_site(spec=parse_variant("exact")), 0)],
                    [RejectedReport.from_rejected(RejectedSite("enc", "softmax over a non-score tensor"))],
                    frontend="dynamo", graphs=1, policy="exact")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["frontend"] == "dynamo" and data["graphs"] == 1
    assert data["sites"][0]["module"] == "layers.0.attn"
    assert data["rejected"] == [{"module": "enc", "reason": "softmax over a non-score tensor"}]


def test_render_before_any_capture():
    assert "nothing captured yet" in Report(policy="exact", captured=False).render()


def test_render_without_attention_names_the_model_and_the_near_misses():
    text = Report([], [RejectedReport("enc", "scores written in place")], frontend="fx", graphs=1,
                  policy="exact").render(model="MyNet")
    assert "no attention found in MyNet" in text
    assert "scores written in place" in text


def test_reasons_table_only_when_a_reason_differs_from_the_policy():
    plain = SiteReport.from_site(_site(spec=parse_variant("exact")), 0)
    assert "why" not in Report([plain], frontend="fx", graphs=1, policy="exact").render()
    odd = SiteReport.from_site(_site(reason="policy: exact; the model's own window is narrower"), 1)
    text = Report([plain, odd], frontend="fx", graphs=1, policy="exact").render(width=200)
    assert "why" in text and "the model's own window is narrower" in text


def test_error_cells():
    exact = SiteReport.from_site(_site(), 0, SiteError(rel_l2=0.0, cosine=1.0))
    approx = SiteReport.from_site(_site(variant="local(window=8)"), 1, SiteError(rel_l2=0.0123, cosine=0.99))
    unrun = SiteReport.from_site(_site(), 2)
    untouched = SiteReport.from_site(_site(variant="none"), 3)
    text = Report([exact, approx, unrun, untouched], frontend="fx", graphs=1, policy="exact").render(width=250)
    assert "1.23e-02" in text and "0.99000" in text
    assert "not run" in text
    assert "exact" in text


def test_mask_column_names_the_structure_and_what_is_left():
    assert SiteReport.from_site(_site(causal=False), 0).mask == "none"
    site = _site(band=(4095, 0), mask_residual="padding", has_bias=True)
    assert SiteReport.from_site(site, 0).mask == "causal+window 4096+padding+bias"
    assert SiteReport.from_site(_site(causal=False, segments=True, mask_residual="dense"), 0).mask == "segments+dense"


class _PaddedLayer(torch.nn.Module):
    """Self-attention through SDPA with a key-padding mask ``[B, 1, 1, N]`` (fx-traceable, quick to capture)."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x, mask):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return x + self.out(y.transpose(1, 2).reshape(b, n, -1))


class _PaddedModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_PaddedLayer(), _PaddedLayer()])

    def forward(self, x, mask):
        for layer in self.layers:
            x = layer(x, mask)
        return x


def test_measured_flops_on_a_padded_batch():
    """A small model on a padded batch (64 and 20 real tokens): dense FLOPs over real tokens, and the FLOPs top-k
    actually ran, counted by hand; an exact site measures no variant FLOPs."""
    import attncc

    torch.manual_seed(0)
    model = _PaddedModel().eval()
    x = torch.randn(2, 64, 32)
    mask = (torch.arange(64)[None, :] < torch.tensor([64, 20])[:, None]).view(2, 1, 1, 64)
    width = 4 * 2 * (8 + 8)  # heads * 2 * (D + Dv)
    dense_real = width * (64 * 64 + 20 * 20)
    # diagonal blocks only: row 0 has 4 blocks of 16 x 16; row 1 a full block (16 x 16) and 4 real of block 1
    # plus the selection's block-pair scores, half a pair each: 4 x 4 real blocks in row 0, 2 x 2 in row 1
    diagonal = width * (4 * 16 * 16 + 16 * 16 + 4 * 4 + (4 * 4 + 2 * 2) / 2)
    cm = attncc.compile(model, "topk(block=16, k=1, sinks=0, local=1)")
    with torch.no_grad():
        cm(x, mask)
    report = cm.report()
    sites = report.to_dict()["sites"]
    assert len(sites) == 2
    for s in sites:
        assert s["mask"] == "padding"
        assert s["flops_before_real"] == dense_real
        assert s["flops_after_measured"] == diagonal
        assert s["flops_before"] == width * 2 * 64 * 64  # the shape figures stand beside them
    assert report.sites[0].measured_saving == dense_real / diagonal
    assert "measured GFLOP" in report.render(width=250)
    # an exact site measures no variant FLOPs: no measured columns
    exact_row = SiteReport.from_site(_site(spec=parse_variant("exact")), 0, SiteError(0.0, 1.0, None, 123.0))
    assert exact_row.flops_after_measured is None and exact_row.flops_before_real == 123
    assert "measured GFLOP" not in Report([exact_row], policy="exact").render(width=250)
