"""Validation and cleaning: every error class, every skip reason, dedup, split."""

from __future__ import annotations

import gzip
import io
import json

import pytest
from conftest import write_jsonl

from jacpt import corpus
from jacpt.corpus import CorpusError, Filters

JA = "日本語の文章である。これは二つ目の文である。"


def run_clean(inputs, filters=Filters(), **kw):
    out = {"train": io.StringIO(), "validation": io.StringIO()}
    reports = corpus.clean(inputs, out, filters, **kw)
    kept = {k: [json.loads(x) for x in v.getvalue().splitlines()] for k, v in out.items()}
    return kept, corpus.summarize(reports)


def doc(text, i=0):
    return {"text": text, "meta": {"id": str(i), "title": f"t{i}", "url": ""}}


def test_good_lines_pass_through_with_meta(tmp_path):
    f = write_jsonl(tmp_path / "train_0.jsonl.gz", [doc(JA + str(i), i) for i in range(5)], gz=True)
    kept, rep = run_clean([(f, "train")])
    assert [d["meta"]["id"] for d in kept["train"]] == ["0", "1", "2", "3", "4"]
    assert rep["total"]["kept"] == 5 and rep["total"]["lines"] == 5
    assert sum(rep["total"]["dropped"].values()) == 0


def test_empty_blank_and_duplicates_are_counted_not_fatal(tmp_path):
    f = tmp_path / "train_0.jsonl"
    f.write_text("\n".join([json.dumps(doc(JA)), json.dumps(doc("")), json.dumps(doc("  \n ")), "",
                            json.dumps(doc(JA)), json.dumps(doc(JA + "別"))]) + "\n", encoding="utf-8")
    kept, rep = run_clean([(f, "train")])
    assert len(kept["train"]) == 2
    d = rep["total"]["dropped"]
    assert (d["empty"], d["blank_line"], d["duplicate"]) == (2, 1, 1)
    assert rep["total"]["lines"] == rep["total"]["kept"] + sum(d.values())  # nothing dropped silently


@pytest.mark.parametrize("raw, reason, message", [
    (b'{"text": "ok"', "bad_json", r"train_0.jsonl:2: not valid JSON"),
    (b'{"text": "\xe6\x97\xa5\xff"}', "bad_utf8", r"train_0.jsonl:2: invalid UTF-8 at byte 13"),
    (b'{"txt": "a"}', "bad_schema", r"train_0.jsonl:2: expected an object with a string field \"text\""),
    (b'{"text": 42}', "bad_schema", r"train_0.jsonl:2: expected an object"),
    (b'["text"]', "bad_schema", r"train_0.jsonl:2: expected an object"),
])
def test_structural_errors_name_file_line_and_fix(tmp_path, raw, reason, message):
    f = tmp_path / "train_0.jsonl"
    f.write_bytes(json.dumps(doc(JA)).encode() + b"\n" + raw + b"\n" + json.dumps(doc(JA + "2")).encode() + b"\n")
    with pytest.raises(CorpusError, match=message) as e:
        run_clean([(f, "train")])
    assert "SKIP_BAD=1" in str(e.value)
    kept, rep = run_clean([(f, "train")], skip_bad=True)
    assert len(kept["train"]) == 2 and rep["total"]["dropped"][reason] == 1


def test_truncated_gzip_is_fatal_with_the_line_then_skippable(tmp_path):
    body = "".join(json.dumps(doc(JA + str(i))) + "\n" for i in range(200)).encode()
    f = tmp_path / "train_0.jsonl.gz"
    f.write_bytes(gzip.compress(body)[:-40])
    with pytest.raises(CorpusError, match=r"train_0.jsonl.gz:\d+: gzip stream is truncated or corrupt"):
        run_clean([(f, "train")])
    kept, rep = run_clean([(f, "train")], skip_bad=True)
    assert rep["total"]["dropped"]["corrupt_gzip"] == 1
    assert 0 < len(kept["train"]) <= 200


def test_not_gzip_at_all(tmp_path):
    f = tmp_path / "train_0.jsonl.gz"
    f.write_bytes(b"this is not gzip\n")
    with pytest.raises(CorpusError, match="truncated or corrupt"):
        run_clean([(f, "train")])


def test_filters_count_each_reason(tmp_path):
    docs = [doc("短い。"), doc(JA * 10), doc("This document is written entirely in English, not Japanese."), doc(JA)]
    f = write_jsonl(tmp_path / "train_0.jsonl", docs)
    kept, rep = run_clean([(f, "train")], Filters(min_chars=10, max_chars=100, min_ja_ratio=0.5))
    d = rep["total"]["dropped"]
    assert (d["too_short"], d["too_long"], d["low_ja_ratio"]) == (1, 1, 1)
    assert [k["text"] for k in kept["train"]] == [JA]


@pytest.mark.parametrize("text, lo, hi", [
    ("東京は日本の首都である。", 0.99, 1.0),
    ("This is English.", 0.0, 0.0),
    ("Pythonは2024年に人気のプログラミング言語である。", 0.6, 0.8),
    ("", 0.0, 0.0),
    ("12345、。！", 0.0, 0.0),
])
def test_japanese_ratio(text, lo, hi):
    assert lo <= corpus.japanese_ratio(text) <= hi


def test_validation_first_wins_duplicates(tmp_path):
    v = write_jsonl(tmp_path / "validation_0.jsonl", [doc(JA)])
    t = write_jsonl(tmp_path / "train_0.jsonl", [doc(JA), doc(JA + "x")])
    kept, rep = run_clean([(v, "validation"), (t, "train")])
    assert [d["text"] for d in kept["validation"]] == [JA]
    assert [d["text"] for d in kept["train"]] == [JA + "x"]
    assert rep["files"][1]["dropped"] == {"duplicate": 1}


def test_auto_split_is_deterministic_and_near_the_fraction(tmp_path):
    f = write_jsonl(tmp_path / "all.jsonl", [doc(f"{JA}{i}") for i in range(1000)])
    a, _ = run_clean([(f, "auto")], val_fraction=0.2)
    b, _ = run_clean([(f, "auto")], val_fraction=0.2)
    assert a == b
    assert 150 <= len(a["validation"]) <= 250 and len(a["train"]) + len(a["validation"]) == 1000


def test_memory_is_per_document_not_per_text(tmp_path):
    # 2,000 docs of 5 KB each: the dedup set holds 16-byte digests only.
    f = write_jsonl(tmp_path / "big.jsonl", [doc(f"{i}" + JA * 100) for i in range(2000)])
    out = {"train": open(tmp_path / "o.jsonl", "w", encoding="utf-8"), "validation": io.StringIO()}
    seen_sizes = []
    orig = corpus.hashlib.blake2b

    def spy(data, digest_size):
        h = orig(data, digest_size=digest_size)
        seen_sizes.append(len(h.digest()))
        return h

    corpus.hashlib.blake2b = spy
    try:
        corpus.clean([(f, "train")], out, Filters())
    finally:
        corpus.hashlib.blake2b = orig
        out["train"].close()
    assert set(seen_sizes) == {16} and len(seen_sizes) == 2000
