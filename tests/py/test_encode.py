"""Tokenising: the fast backend is byte-identical to NeMo's reference and reads back through megatron-core."""

from __future__ import annotations

import json
import unicodedata

import pytest
from conftest import sample_texts, write_jsonl

from jacpt import assets, encode

EDGE_CASES = ["ｶﾀｶﾅ 全角ＡＢＣ😀", "a\n\n  b\t\tc   ", "<|endoftext|>は特殊トークン", "é e\u0301", "x",
              "", "\U00011935\U00011930", "<|endoftext|>\u0338"]  # NFC before special-token split; empty skipped


@pytest.fixture(scope="module")
def corpus_jsonl(tmp_path_factory):
    texts = sample_texts() + EDGE_CASES
    path = write_jsonl(tmp_path_factory.mktemp("enc") / "train.jsonl", [{"text": t} for t in texts])
    return path, [t for t in texts if t]  # NeMo's script skips documents with no tokens


@pytest.fixture(scope="module")
def nemo_prefix(corpus_jsonl, tokenizer_dir, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("nemo") / "train_text_document"
    stats = encode.tokenize_nemo(corpus_jsonl[0], prefix, tokenizer_dir, assets.EOS_ID)
    assert stats.documents == len(corpus_jsonl[1])
    return prefix


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_fast_is_byte_identical_to_nemo_reference(corpus_jsonl, nemo_prefix, tokenizer_dir, tmp_path, workers):
    prefix = tmp_path / "train_text_document"
    stats = encode.tokenize_fast(corpus_jsonl[0], prefix, tokenizer_dir, assets.EOS_ID, workers=workers)
    assert stats.documents == len(corpus_jsonl[1]) and stats.tokens > stats.documents
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"train_text_document{ext}").read_bytes() == nemo_prefix.with_suffix(ext).read_bytes()


@pytest.mark.slow
def test_megatron_reads_back_every_document_as_its_source_text(corpus_jsonl, nemo_prefix, tokenizer_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ds = IndexedDataset(str(nemo_prefix))
    texts = corpus_jsonl[1]
    assert len(ds) == len(texts) and len(ds.document_indices) == len(texts) + 1
    for i, text in enumerate(texts):
        ids = ds[i].tolist()
        assert ids[-1] == assets.EOS_ID and assets.EOS_ID not in ids[:-1] or "<|endoftext|>" in text
        assert tok.decode(ids[:-1]) == unicodedata.normalize("NFC", text)  # Qwen's normalizer is NFC


def test_idx_header_is_megatron_mmap_int32(nemo_prefix, corpus_jsonl):
    import struct

    raw = nemo_prefix.with_suffix(".idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, dtype_code, n_seq, n_doc = struct.unpack("<QBQQ", raw[9:34])
    assert (version, dtype_code) == (1, 4)  # int32: Qwen's ids exceed uint16
    assert n_seq == len(corpus_jsonl[1]) and n_doc == n_seq + 1


def test_fast_on_an_empty_file_writes_an_empty_dataset(tmp_path, tokenizer_dir):
    (tmp_path / "e.jsonl").write_bytes(b"")
    stats = encode.tokenize_fast(tmp_path / "e.jsonl", tmp_path / "e", tokenizer_dir, assets.EOS_ID, workers=1)
    assert stats.documents == 0 and (tmp_path / "e.idx").is_file()


def test_stats_rates():
    d = encode.TokenizeStats(documents=10, tokens=1000, bytes_in=2_000_000, seconds=2.0).as_dict()
    assert (d["docs_per_s"], d["mb_per_s"], d["tokens_per_s"]) == (5.0, 1.0, 500.0)
    assert json.dumps(d)
