"""Tokenise cleaned JSONL into Megatron `<prefix>.bin/.idx`, one document per line, eos appended.

Two backends write byte-identical files (tests/py/test_encode.py holds them to it):

* `fast` (default): `workers` threads of this process encode batches of lines
  while the main thread reads the next batches and writes finished ones, in
  order, in megatron-core's `IndexedDatasetBuilder` format. Memory is bounded
  by 2 x workers batches of BATCH_BYTES in flight plus 12 bytes of index per
  document, whatever the corpus size. The engine is tiktoken's BPE built from
  the same vocabulary (3-4x faster per core than HF `tokenizers`) when tiktoken
  is importable and passes a self-check against HF `tokenizers`, otherwise HF
  `tokenizers`; the setting data.engine=hf|tiktoken forces one. Both engines get
  Python's NFC first (for NFC tokenizers like Qwen's), as the reference does.
  BENCHMARKS.md has the figures and how the engines' exactness was established.
* `nemo`: NeMo's own path, the reference. In the NeMo container that is
  `preprocess_data_for_megatron.py` (run by `bin/tokenize-nemo`); elsewhere the
  script is absent (it is not in the nemo_toolkit wheel), so the same pieces are
  used from the wheel: the slow HF tokenizer via `get_nmt_tokenizer(use_fast=False)`
  and NeMo's legacy `MMapIndexedDatasetBuilder`, document by document as the script does.

Both call `progress(stats, elapsed)` as they go (the container's script does not),
`elapsed` counting from when the tokenizer is loaded: the rate it shows is the steady one.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import os
import re
import subprocess
import sys
import time
import unicodedata
from array import array
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from jacpt.paths import BIN_DIR, SAMPLE_DIR

NEMO_SCRIPT = Path("/opt/NeMo/scripts/nlp_language_modeling/preprocess_data_for_megatron.py")
BATCH_BYTES = 256 * 1024  # JSONL bytes per batch (~50 Wikipedia-length articles); BENCHMARKS.md has the sweep
ENGINES = ("auto", "tiktoken", "hf")

assert array("i").itemsize == 4 and array("q").itemsize == 8  # the .bin is int32, the .idx document indices int64


@dataclass
class TokenizeStats:
    documents: int = 0
    tokens: int = 0
    bytes_in: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        s = max(self.seconds, 1e-9)
        return {"documents": self.documents, "tokens": self.tokens, "bytes_in": self.bytes_in,
                "seconds": round(self.seconds, 3), "docs_per_s": round(self.documents / s, 1),
                "mb_per_s": round(self.bytes_in / s / 1e6, 3), "tokens_per_s": round(self.tokens / s, 1)}


# ----------------------------------------------------------------------------- fast backend: engines

class EngineError(RuntimeError):
    """The engine named by data.engine cannot be used; the message says why and the fix."""


class _Unsupported(Exception):
    """tiktoken cannot stand in for this tokenizer.json (layout, vocabulary or self-check)."""


# Strings where tokenisers are known to part ways: byte-level splits of multi-byte characters, \s and \p{N}
# edge cases of the split regex (bpe-qwen fails "  ①" and "X ²"), NFC, added tokens in running text.
_PROBES = [
    "😀👍🏽👨‍👩‍👧‍👦🇯🇵 絵文字✨テスト", "ｱｲｳｴｵｶﾞｷﾞﾊﾟﾋﾟｰ、ﾃｽﾄ｡", "ｶﾀｶﾅ 全角ＡＢＣ１２３",
    "GPUを2枚使うDNA解析、e.g. Python3.11とC++17で I'm, THEY'LL, it's", "a  b   c\t\t d", "   leading",
    "trailing   ", "\n\n\n", "a\r\nb\r\n\r\n", "行1\n\n行2\n", " \n \n", "x \n\ny", "全角　スペース　　二つ\u3000",
    "か\u3099き\u3099 e\u0301cole ﾊ\uff9f \u0301先頭", "\U00011935\U00011930 \u9463\u0315\U00016b36\u1df9",
    "  １２", "X ²", "面積は10 km²", "項目  ①", "年 Ⅱ", "  Ⅱ世", "note:  ½", "H₂O", "①②③ⅠⅡⅢ→←",
    "nbsp\u00a0\u00a0x nel\u0085x ls\u2028ps\u2029x zw\u200bj\u200dx bom\ufeffx en\u2002em\u2003x",
    "𠀋𡈽𪚲 ꙮ 한국어 中文繁體與简体 ไทย Ελληνικά", "<|endoftext|>", "文中に<|endoftext|>が", "<|endoftext|>\u0338",
    "<|im_start|>user\nこんにちは<|im_end|>", "<tool_call>x</tool_call><|fim_prefix|>",
    "https://example.org/path?q=1&x=２", "    def f(x):\n        return x  # comment\n", "\x00\x01\x7f", "",
]


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the printable character standing for each byte -> the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + i): b for i, b in enumerate(rest)}}


def _tiktoken_parts(spec: dict) -> tuple[str, dict[bytes, int]]:
    """(split regex, byte ranks) for tiktoken from a Qwen2-style byte-level BPE tokenizer.json.

    tiktoken merges the adjacent pair whose concatenation has the lowest id; HF
    merges the pair earliest in `merges`. They agree when every token but the 256
    bytes is the result of exactly one merge and merges are ordered by the id of
    their result (checked here), and when HF's merges rebuild every token from
    its own bytes, as tiktoken returns a piece that is a whole token as is (checked
    by _self_check). Anything else raises _Unsupported.
    """
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if not (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("behavior") == "Isolated"
            and not steps[0].get("invert") and "Regex" in (steps[0].get("pattern") or {})
            and steps[1].get("type") == "ByteLevel" and steps[1].get("use_regex") is False
            and not steps[1].get("add_prefix_space")):
        raise _Unsupported("the pre-tokenizer is not Split(regex, isolated) + ByteLevel(use_regex=false)")
    if spec.get("normalizer") not in (None, {"type": "NFC"}):
        raise _Unsupported(f"normalizer {spec.get('normalizer')} (only NFC or none)")
    if (model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback") or model.get("ignore_merges")
            or model.get("unk_token") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")):
        raise _Unsupported("the model is not a plain byte-level BPE (dropout, byte fallback, unk or affixes)")
    dec, vocab = _byte_decoder(), model["vocab"]
    try:
        ranks = {bytes(dec[c] for c in tok): i for tok, i in vocab.items()}
    except KeyError:
        raise _Unsupported("a vocabulary entry is outside the byte-level alphabet") from None
    if len(ranks) != len(vocab) or any(bytes([b]) not in ranks for b in range(256)):
        raise _Unsupported("the vocabulary lacks some of the 256 single bytes")
    made, last = set(), -1
    for m in model["merges"]:
        a, b = m.split(" ") if isinstance(m, str) else m
        i = vocab.get(a + b)
        if i is None or i <= last:
            raise _Unsupported(f"merge {a!r} {b!r} is not ordered by the id of its result")
        made.add(i)
        last = i
    if len(made) + 256 != len(vocab):
        raise _Unsupported("some tokens are not the result of exactly one merge")
    return steps[0]["pattern"]["Regex"], ranks


class _HFEngine:
    """HF `tokenizers` (Rust). encode_batch releases the GIL, so our threads run it in parallel."""

    name = "hf"

    def __init__(self, tokenizer_dir: Path, spec: dict):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        # Qwen2Tokenizer (the reference) applies Python's NFC to the whole text, then splits out added tokens.
        # tokenizers' own NFC runs after that split and with older Unicode tables (it leaves U+11935 U+11930
        # and some newer combining marks alone), so the text gets Python's NFC first; tokenizers' is then a no-op.
        self.nfc = spec.get("normalizer") == {"type": "NFC"}
        self.note = ""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]


class _TiktokenEngine:
    """tiktoken's Rust BPE on the same vocabulary and split regex; texts holding added tokens go to HF."""

    name = "tiktoken"

    def __init__(self, spec: dict, hf: _HFEngine):
        import tiktoken

        pattern, ranks = _tiktoken_parts(spec)
        enc = tiktoken.Encoding("jacpt-byte-bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        # CoreBPE's own method raises on a lone surrogate as HF and the reference do; Encoding.encode_ordinary
        # would replace it with U+FFFD. The self-check holds both behaviours, so a tiktoken without it falls back.
        self._encode = enc._core_bpe.encode_ordinary
        self._hf, self.nfc, self.note = hf, hf.nfc, ""
        specials = sorted((t["content"] for t in spec.get("added_tokens", [])), key=len, reverse=True)
        self._added = re.compile("|".join(map(re.escape, specials))) if specials else None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        out = []
        for text in texts:
            if self._added is not None and self._added.search(text):
                out += self._hf.encode_batch([text])  # added tokens in running text: HF splits them as the reference
            else:
                out.append(self._encode(text))
        return out


def _self_check(engine: _TiktokenEngine, hf: _HFEngine, spec: dict) -> None:
    """Raise _Unsupported unless `engine` gives HF's ids on the probes and on every token's own bytes."""
    model = hf.tokenizer.model
    for tok, i in spec["model"]["vocab"].items():  # ~0.3 s for Qwen's 151,643 tokens
        got = model.tokenize(tok)
        if len(got) != 1 or got[0].id != i:
            raise _Unsupported(f"HF's merges do not rebuild token {i} ({tok!r}) from its bytes; tiktoken would")
    texts = list(_PROBES)
    with gzip.open(SAMPLE_DIR / "validation_0.jsonl.gz", "rt", encoding="utf-8") as f:
        texts += [json.loads(line)["text"] for line in f]
    texts = [unicodedata.normalize("NFC", t) for t in texts] if engine.nfc else texts
    for text, want, got in zip(texts, hf.encode_batch(texts), engine.encode_batch(texts)):
        if want != got:
            raise _Unsupported(f"self-check: {text[:40]!r} gives {got[:12]} ..., HF tokenizers {want[:12]} ...")
    try:
        engine.encode_batch(["lone \ud800 surrogate"])
    except Exception:  # what HF and the reference do (TypeError, UnicodeEncodeError)
        return
    raise _Unsupported("self-check: tiktoken encodes a lone surrogate; HF and the reference fail on it")


_ENGINE_CACHE: dict[tuple, _HFEngine | _TiktokenEngine] = {}


def load_engine(tokenizer_dir: Path, choice: str | None = None) -> _HFEngine | _TiktokenEngine:
    """The fast backend's engine: `choice` (auto when None). `.name` says which, `.note` why.

    Built and self-checked once per process and tokenizer file (~1 s for Qwen).
    """
    choice = choice or "auto"
    if choice not in ENGINES:
        raise EngineError(f"data.engine={choice!r} is not one of {', '.join(ENGINES)}")
    path = Path(tokenizer_dir) / "tokenizer.json"
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size, choice)
    if key not in _ENGINE_CACHE:
        spec = json.loads(path.read_text(encoding="utf-8"))
        hf = _HFEngine(Path(tokenizer_dir), spec)
        engine: _HFEngine | _TiktokenEngine = hf
        if choice != "hf":
            try:
                engine = _TiktokenEngine(spec, hf)
                with _hf_threads_off():
                    _self_check(engine, hf, spec)
            except (ImportError, AttributeError, _Unsupported) as e:
                why = "tiktoken is not installed" if isinstance(e, ImportError) else str(e)
                if choice == "tiktoken":
                    raise EngineError(f"data.engine=tiktoken: {why}; use data.engine=auto or hf") from None
                engine, hf.note = hf, f"tiktoken not used: {why}"
                if not isinstance(e, ImportError):
                    print(f"[jacpt] tokenize: {hf.note}; using HF tokenizers", file=sys.stderr, flush=True)
        _ENGINE_CACHE[key] = engine
    return _ENGINE_CACHE[key]


# ----------------------------------------------------------------------------- fast backend: pipeline

def _encode_lines(engine, eos: int, lines: list[bytes]) -> tuple[array, array, int]:
    """Thread: raw JSONL lines -> (ids with eos after each document, per-document lengths, bytes read)."""
    texts = [json.loads(line)["text"] for line in lines]
    if engine.nfc:
        texts = [unicodedata.normalize("NFC", t) for t in texts]  # returns the same str at once if already NFC
    ids, lengths = array("i"), array("i")
    for doc in engine.encode_batch(texts):
        if doc:  # no tokens: no entry, as preprocess_data_for_megatron.py does
            ids.fromlist(doc)
            ids.append(eos)
            lengths.append(len(doc) + 1)
    return ids, lengths, sum(map(len, lines))


def _batches(path: Path, batch_bytes: int) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    size = 0
    with open(path, "rb") as f:
        for line in f:
            batch.append(line)
            size += len(line)
            if size >= batch_bytes:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _in_order(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator:
    """fn(item) for each item on the pool, results in input order, at most `window` submitted and not yet taken."""
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for fut in pending:
            fut.cancel()


@contextlib.contextmanager
def _hf_threads_off() -> Iterator[None]:
    """One core per thread: HF's encode_batch would otherwise start Rayon threads inside each of ours."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _append(builder, ids: array, lengths: array) -> None:
    """Add many one-sequence documents at once: what `add_document` does per document, in one write.

    megatron/core/datasets/indexed_dataset.py (core_r0.12.0) `IndexedDatasetBuilder.add_document`
    writes the ids, extends `sequence_lengths` and appends `len(sequence_lengths)` to
    `document_indices`; `finalize` turns both into numpy arrays. The byte-identity test keeps this in step.
    """
    builder.data_file.write(ids)  # the array's buffer, no copy
    start = len(builder.sequence_lengths)
    builder.sequence_lengths.extend(lengths)
    builder.document_indices.extend(range(start + 1, start + 1 + len(lengths)))


def tokenize_fast(jsonl: Path, prefix: Path, tokenizer_dir: Path, eos: int, workers: int = 2,
                  progress=None, engine: str | None = None) -> TokenizeStats:
    """The fast backend (module docstring): `workers` encoding threads, the engine load_engine picks."""
    return _tokenize_fast(jsonl, prefix, tokenizer_dir, eos, workers, progress, engine=engine)


def _tokenize_fast(jsonl: Path, prefix: Path, tokenizer_dir: Path, eos: int, workers: int = 2, progress=None, *,
                   engine: str | None = None, batch_bytes: int = BATCH_BYTES) -> TokenizeStats:
    """tokenize_fast with the knobs BENCHMARKS.md sweeps: the engine and the batch size."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    t0 = time.perf_counter()
    eng = load_engine(tokenizer_dir, engine)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    # 12 bytes a document in flat arrays, where the builder's lists of ints take ~70.
    builder.sequence_lengths, builder.document_indices = array("i"), array("q", [0])
    stats = TokenizeStats()
    work = functools.partial(_encode_lines, eng, eos)
    ready = time.perf_counter()
    with _hf_threads_off(), ThreadPoolExecutor(workers, thread_name_prefix="jacpt-tokenize") as pool:
        for ids, lengths, nbytes in _in_order(pool, work, _batches(jsonl, batch_bytes), 2 * workers):
            _append(builder, ids, lengths)
            stats.documents += len(lengths)
            stats.tokens += len(ids)
            stats.bytes_in += nbytes
            if progress:
                progress(stats, time.perf_counter() - ready)
    builder.finalize(str(prefix) + ".idx")
    stats.seconds = time.perf_counter() - t0
    return stats


# ----------------------------------------------------------------------------- NeMo reference

def tokenize_nemo(jsonl: Path, prefix: Path, tokenizer_dir: Path, eos: int, workers: int = 2,
                  progress=None) -> TokenizeStats:
    """NeMo's preprocessing: its script in the container, the same pieces from the wheel elsewhere."""
    t0 = time.perf_counter()
    if NEMO_SCRIPT.is_file():
        # The script names its outputs <output-prefix>_text_document.{bin,idx}.
        out_prefix = str(prefix).removesuffix("_text_document")
        subprocess.run([str(BIN_DIR / "tokenize-nemo"), "--input", str(jsonl), "--tokenizer", str(tokenizer_dir),
                        "--output-prefix", out_prefix, "--workers", str(workers)], check=True)
        stats = _stats_from_files(prefix, jsonl)
    else:
        stats = _tokenize_nemo_pieces(jsonl, prefix, tokenizer_dir, eos, progress)
    stats.seconds = time.perf_counter() - t0
    return stats


def _tokenize_nemo_pieces(jsonl: Path, prefix: Path, tokenizer_dir: Path, eos: int, progress) -> TokenizeStats:
    import torch
    from nemo.collections.nlp.data.language_modeling.megatron import indexed_dataset
    from nemo.collections.nlp.modules.common.tokenizer_utils import get_nmt_tokenizer

    tok = get_nmt_tokenizer(library="huggingface", model_name=str(tokenizer_dir), use_fast=False)
    if tok.eos_id != eos:
        raise RuntimeError(f"NeMo's tokenizer gives eos id {tok.eos_id}, expected {eos}")
    builder = indexed_dataset.make_builder(str(prefix) + ".bin", impl="mmap", vocab_size=tok.vocab_size)
    stats = TokenizeStats()
    t0 = time.perf_counter()
    with open(jsonl, "rb") as f:
        for line in f:
            # preprocess_data_for_megatron.py Encoder.encode with the identity splitter and --append-eod
            ids = tok.text_to_ids(json.loads(line)["text"])
            if ids:
                ids.append(tok.eos_id)
                builder.add_item(torch.IntTensor(ids))
                builder.end_document()
                stats.documents += 1
                stats.tokens += len(ids)
            stats.bytes_in += len(line)
            if progress and stats.documents % 200 == 0:
                progress(stats, time.perf_counter() - t0)
    builder.finalize(str(prefix) + ".idx")
    return stats


def _stats_from_files(prefix: Path, jsonl: Path) -> TokenizeStats:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return TokenizeStats(documents=len(ds.document_indices) - 1, tokens=int(ds.sequence_lengths.sum()),
                         bytes_in=jsonl.stat().st_size)


BACKENDS = {"fast": tokenize_fast, "nemo": tokenize_nemo}


def progress_printer(label: str, total_bytes: int):
    """A progress callback printing docs, MB and rate to stderr, at most ~2 times a second (terminals only)."""
    if not sys.stderr.isatty():
        return None
    last = [0.0]

    def show(stats: TokenizeStats, elapsed: float) -> None:
        if elapsed - last[0] < 0.5 and stats.bytes_in < total_bytes:
            return
        last[0] = elapsed
        pct = 100.0 * stats.bytes_in / total_bytes if total_bytes else 100.0
        print(f"\r[jacpt] tokenize {label}: {pct:5.1f}%  {stats.documents:,} docs  "
              f"{stats.bytes_in / 1e6:,.1f} MB  {stats.documents / max(elapsed, 1e-9):,.0f} docs/s",
              end="" if stats.bytes_in < total_bytes else "\n", file=sys.stderr, flush=True)

    return show
