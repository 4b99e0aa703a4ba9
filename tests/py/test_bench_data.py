"""`jacpt bench-data`: it runs on a tiny input, every backend matches the reference byte for byte, and the
check that says so catches a difference. No timing is asserted: figures depend on the machine."""

from __future__ import annotations

import json
import re

import click
import pytest
from click.testing import CliRunner

from jacpt import bench_data, encode
from jacpt.cli import cli

TOP_KEYS = {"schema", "date", "created_utc", "command", "machine", "input", "tokenizer", "method", "reference",
            "rows", "memory", "identical", "goal"}
ROW_KEYS = {"table", "name", "backend", "engine", "workers", "repeats", "documents", "tokens", "bytes_in", "load_s",
            "steady_s", "total_s", "cpu_s", "cores_busy", "docs_per_s", "mb_per_s", "tokens_per_s",
            "ratio_vs_reference", "identical", "steady_s_all", "note"}
MACHINE_KEYS = {"cpu_model", "cores", "usable_cores", "platform", "loadavg_start", "loadavg_end", "versions"}


@pytest.fixture
def assets_env(monkeypatch, tokenizer_dir):
    monkeypatch.setenv("JACPT_ASSETS_DIR", str(tokenizer_dir.parent))


def _run(tmp_path, capsys):
    out = bench_data.main(mb=0.1, out_dir=str(tmp_path / "results"), repeats=1, levers=False)
    return out, json.loads(out.read_text(encoding="utf-8")), capsys.readouterr().out


@pytest.mark.slow  # imports NeMo for the reference; ~15 s
def test_bench_runs_and_every_backend_is_byte_identical_to_the_reference(assets_env, tmp_path, capsys):
    out, res, printed = _run(tmp_path, capsys)
    assert re.fullmatch(r"data-\d{4}-\d{2}-\d{2}\.json", out.name) and out.parent == tmp_path / "results"
    assert set(res) == TOP_KEYS and set(res["machine"]) == MACHINE_KEYS
    assert res["machine"]["cores"] >= 1 and res["machine"]["versions"]["tokenizers"]
    assert res["input"]["bytes"] >= 0.1e6 and res["input"]["documents"] > 0 and res["identical"] is True
    rows = {(r["name"], r["workers"]): r for r in res["rows"]}
    assert {("fast", 1), ("fast", 2), ("fast, HF engine", 2), ("NeMo reference (slow HF tokenizer)", 1),
            ("raw tokenizers encode_batch", 2)} == set(rows)
    for r in res["rows"]:
        assert set(r) == ROW_KEYS
        assert r["documents"] == res["input"]["documents"] and r["tokens"] == res["input"]["tokens"]
        assert r["identical"] is (None if r["backend"] == "nemo" else True), r["name"]
    assert rows[("NeMo reference (slow HF tokenizer)", 1)]["ratio_vs_reference"] == 1.0
    assert {"met", "fast_ratio", "fast_ratio_vs_reference_scaled_to_cores"} <= set(res["goal"])
    assert "all outputs byte-identical to the reference" in printed and "x ref" in printed
    assert not list(out.parent.glob("*.tmp"))  # written atomically


@pytest.mark.slow
def test_a_fast_backend_that_differs_fails_the_bench(assets_env, tmp_path, capsys, monkeypatch):
    real = encode._encode_lines

    def off_by_one(engine, eos, lines):
        ids, lengths, n = real(engine, eos, lines)
        ids[-1] = eos - 1  # the last eos of each batch becomes another token
        return ids, lengths, n

    monkeypatch.setattr(encode, "_encode_lines", off_by_one)
    with pytest.raises(click.ClickException, match="differs from the NeMo reference: fast"):
        _run(tmp_path, capsys)
    res = json.loads(next((tmp_path / "results").glob("data-*.json")).read_text(encoding="utf-8"))
    assert res["identical"] is False
    assert [r["identical"] for r in res["rows"] if r["backend"] == "fast"] == [False, False, False]


def test_corpus_is_deterministic_japanese_and_not_the_sample_repeated(tmp_path):
    a, b, c = (bench_data.make_corpus(tmp_path / f"{n}.jsonl", 0.1, seed) for n, seed in (("a", 1), ("b", 1), ("c", 2)))
    assert a == b and a["sha256"] != c["sha256"] and a["bytes"] >= 0.1e6
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(records) == a["documents"] and all(set(r) == {"text", "meta"} for r in records)
    lengths = [len(r["text"]) for r in records]
    assert min(lengths) >= bench_data.DOC_CHARS[0] and 1000 < sum(lengths) / len(lengths) < 2500
    runs = [r for rec in records for r in bench_data._RUN.findall(rec["text"]) if len(r) >= bench_data.RUN_MIN]
    assert len(set(runs)) > 0.9 * len(runs)  # spliced: BPE caches see real text's repetition, not the sample's


def test_without_the_tokenizer_it_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("JACPT_ASSETS_DIR", str(tmp_path / "no-assets"))
    res = CliRunner().invoke(cli, ["bench-data", "--mb", "0.1", "--out-dir", str(tmp_path / "r")])
    assert res.exit_code == 1 and "make assets" in res.output and "JACPT_ASSETS_DIR" in res.output
    assert not (tmp_path / "r").exists()
