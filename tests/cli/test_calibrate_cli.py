"""``attncc calibrate``: texts become padded token batches for the calibrator, the plan is printed and written
(never over an existing file without --force), every user mistake is one error line and exit status 2, and a plan
file works as ``--policy`` in ``inspect``, ``bench`` and ``export``.

The calibrator (``attncc.calibration.auto``) is replaced by a stand-in that records what it was given and returns a
small plan; one test runs the real one where it exists."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from attncc.calibration.plan import HeadChoice, Plan, model_dtype, model_fingerprint, weights_digest
from attncc.cli import main
from attncc.models import load_model

calibrate_cli = importlib.import_module("attncc.cli.calibrate")  # (attncc.cli.calibrate is the click command)

WORDS = "the a cat dog sat on mat ran far away and then slept under tree in sun".split()


def one_error_line(capfd) -> str:
    err = capfd.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("attncc: error:")]
    assert len(lines) == 1 and lines[0] == err.splitlines()[-1], err
    return lines[0]


def small_plan(model, sites, variant="local(window=8)", heads=4) -> Plan:
    choice = HeadChoice(variant, 0.001, 1e-4, 1e6, [
        {"variant": "exact", "error": 0.0, "time_s": 3e-4, "flops": 4e6, "why": "slower"},
        {"variant": variant, "error": 0.001, "time_s": 1e-4, "flops": 1e6, "why": "chosen"}])
    return Plan(type(model).__name__, model_fingerprint(model), "cosine", 0.01, 32,
                {site: [choice] * heads for site in sites},
                {"calibration": {"mean": 0.002, "worst": 0.003, "texts": 4}}, ["stand-in plan"],
                dtype=model_dtype(model), weights=weights_digest(model))


@pytest.fixture
def stand_in(monkeypatch):
    """The calibrator replaced: records its arguments, returns a plan of local(window=8) for every site."""
    seen = {}

    def auto(**settings):
        return {"auto": settings}

    def calibrate(model, policy, data, held_out=None, progress=True):
        seen.update(model=model, policy=policy, data=data, held_out=held_out)
        sites = [name for name, module in model.named_modules()
                 if name.endswith(("attn", "attention.self")) and not name.endswith("c_attn")]
        heads = getattr(getattr(model, "config", None), "num_attention_heads", 4)
        return small_plan(model, sites, heads=heads)

    monkeypatch.setattr(calibrate_cli, "load_calibrator", lambda: (auto, calibrate))
    return seen


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny BERT (2 layers, 2 heads of 16) saved with a word-piece tokenizer of a few words."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(folder)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=5 + len(WORDS), max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture
def texts(tmp_path):
    data = tmp_path / "texts.txt"
    data.write_text("the cat sat on the mat\n\n  the dog ran far away and then slept  \na cat\nthe sun\nthe tree\n")
    held = tmp_path / "held.txt"
    held.write_text("the dog slept under the tree in the sun\n")
    return data, held


def test_calibrate_texts_into_a_plan(bert_dir, texts, tmp_path, stand_in, capsys):
    data, held = texts
    out = tmp_path / "plan.json"
    assert main(["calibrate", f"hf:{bert_dir}", "--max-error", "0.02", "--target-len", "16", "--data", str(data),
                 "--held-out", str(held), "--batch", "2", "-o", str(out)]) == 0
    assert stand_in["policy"] == {"auto": {"max_error": 0.02, "metric": "cosine", "target_len": 16}}
    batches = stand_in["data"]
    assert len(batches) == 3  # 5 texts (the blank line skipped) in batches of 2
    assert [b["input_ids"].shape for b in batches] == [(2, 16), (2, 16), (1, 16)]  # padded to --target-len
    assert batches[0]["attention_mask"][0].sum() == 8  # [CLS] the cat sat on the mat [SEP]
    assert batches[0]["attention_mask"][1].sum() == 10
    assert stand_in["held_out"][0]["input_ids"].shape == (1, 16)
    printed = " ".join(capsys.readouterr().out.split())
    assert "encoder.layer.0.attention.self" in printed and "2 x local(window=8)" in printed
    assert "predicted attention speedup: 3.00x" in printed
    assert "measured cosine error on calibration data: mean 0.002, worst 0.003 (4 text(s))" in printed
    assert "note: stand-in plan" in printed and f"wrote {out}" in printed
    plan = Plan.load(out)
    assert plan.fingerprint == model_fingerprint(stand_in["model"])


def test_without_data_it_says_random_inputs_measure_little(tmp_path, stand_in, capfd):
    out = tmp_path / "plan.json"
    assert main(["calibrate", "demo", "--max-error", "0.01", "--target-len", "32", "-o", str(out), "-q"]) == 0
    assert "say little about real inputs" in capfd.readouterr().err
    assert [x.shape for x in stand_in["data"][0]] == [(8, 32)]  # the demo's example inputs, batch 8
    assert Plan.load(out).sites.keys() == {f"blocks.{i}.attn" for i in range(4)}


def test_an_existing_output_is_kept_without_force(tmp_path, stand_in, capfd):
    out = tmp_path / "plan.json"
    out.write_text("keep me")
    assert main(["calibrate", "demo", "--max-error", "0.01", "--target-len", "32", "-o", str(out)]) == 2
    assert "exists; use --force" in one_error_line(capfd)
    assert out.read_text() == "keep me" and not stand_in  # refused before anything ran
    assert main(["calibrate", "demo", "--max-error", "0.01", "--target-len", "32", "-o", str(out), "--force"]) == 0
    assert Plan.load(out).model == "DemoGPT"


@pytest.mark.parametrize("args, says", [
    (["--max-error", "0"], "--max-error"),
    (["--max-error", "-1"], "--max-error"),
    ([], "Missing option '--max-error'"),
    (["--max-error", "0.01", "--metric", "mse"], "--metric"),
    (["--max-error", "0.01", "--data", "no/such/texts.txt"], "--data"),
    (["--max-error", "0.01", "--target-len", "1"], "--target-len"),
])
def test_bad_options_are_one_error_line(tmp_path, stand_in, capfd, args, says):
    assert main(["calibrate", "demo", *args, "-o", str(tmp_path / "plan.json")]) == 2
    assert says in one_error_line(capfd)
    assert not (tmp_path / "plan.json").exists()


def test_bad_inputs_are_one_error_line(tmp_path, texts, stand_in, capfd):
    data, _ = texts
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = [
        (["hf:bert", "--data", str(data)], "hf:bert has no tokenizer: --data and --held-out need an hf:LOCAL_DIR"),
        (["demo", "--data", str(empty)], "no texts (one text per line"),
        (["demo", "-o", str(tmp_path / "plan.yaml")], "give OUTPUT a .json name"),
        (["demo", "-o", str(tmp_path / "no" / "plan.json")], "no such folder"),
        (["no-such-model"], "unrecognised model spec"),
    ]
    for args, says in cases:
        output = [] if "-o" in args else ["-o", str(tmp_path / "plan.json")]
        assert main(["calibrate", *args, "--max-error", "0.01", *output]) == 2, args
        assert says in one_error_line(capfd), args
    assert not (tmp_path / "plan.json").exists()


def test_a_model_folder_without_a_tokenizer_is_one_error_line(tmp_path, texts, bert_dir, stand_in, capfd):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(bert_dir / name, bare / name)
    assert main(["calibrate", f"hf:{bare}", "--max-error", "0.01", "--data", str(texts[0]),
                 "-o", str(tmp_path / "plan.json")]) == 2
    assert "has no usable tokenizer" in one_error_line(capfd)


TINY = f"{Path(__file__).parent.parent / 'calibration' / 'tiny_attention_model.py'}:factory"
"""A two-layer model of 4 heads whose attention fx captures (tests/calibration), as a factory-file model spec."""


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    """A plan for the tiny model: local(window=8) at layers.0; layers.1 is not in it."""
    model = load_model(TINY).model
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    small_plan(model, ["layers.0"]).save(path)
    return path


def test_inspect_takes_a_plan(tiny_plan, capsys):
    assert main(["inspect", TINY, "--policy", str(tiny_plan), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["variant"] for s in data["sites"]] == ["local(window=8)", "exact"]
    assert data["sites"][1]["reason"].startswith("not in the plan")
    assert data["plan"]["model"] == "TinyModel" and len(data["plan"]["heads"]) == 4


def test_inspect_refuses_a_plan_for_another_model(tiny_plan, capfd):
    assert main(["inspect", TINY.replace(":factory", ":wide_factory"), "--policy", str(tiny_plan)]) == 2
    assert "this plan was calibrated for TinyModel" in one_error_line(capfd)


def test_bench_takes_a_plan(tiny_plan, capsys):
    assert main(["bench", TINY, "-p", str(tiny_plan), "--seq-len", "64", "--repeat", "1", "--no-memory",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    row = [r for r in data["rows"] if r["model"] == str(tiny_plan)][0]
    assert row["status"] == "ok" and row["cosine"] < 1.0  # layers.0 ran local(window=8)


def test_export_takes_a_plan(tiny_plan, tmp_path, capsys):
    out = tmp_path / "tiny.pt2"
    assert main(["export", TINY, "--policy", str(tiny_plan), "-o", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert out.exists() and "local(window=8)" in printed and "plan for TinyModel" in printed


@pytest.mark.skipif(importlib.util.find_spec("attncc.calibration.auto") is None,
                    reason="attncc.calibration.auto (the calibrator) is not in this tree yet")
def test_the_real_calibrator_on_a_tiny_model(bert_dir, texts, tmp_path, capsys):
    import attncc

    data, held = texts
    out = tmp_path / "plan.json"
    assert main(["calibrate", f"hf:{bert_dir}", "--max-error", "0.05", "--target-len", "16", "--data", str(data),
                 "--held-out", str(held), "--batch", "4", "-o", str(out), "-q"]) == 0
    plan = Plan.load(out)
    loaded = load_model(f"hf:{bert_dir}", seq_len=16)
    assert plan.fingerprint == model_fingerprint(loaded.model) and plan.sites
    assert {"calibration", "held_out"} <= set(plan.measured)
    cm = attncc.compile(loaded.model, str(out), example_inputs=loaded.example_inputs)
    assert cm.report().plan is not None
