"""Tokenise cleaned JSONL into Megatron `<prefix>.bin/.idx`, one document per line, eos appended.

Two backends write byte-identical files (tests/py/test_tokenize.py holds them to it):

* `fast` (default): HF `tokenizers` (Rust) batch encoding in N worker processes,
  streaming batches of lines through an ordered pool into megatron-core's
  `IndexedDatasetBuilder`. Memory is bounded by batch size x in-flight batches.
* `nemo`: NeMo's own path, the reference. In the NeMo container that is
  `preprocess_data_for_megatron.py` (run by `bin/tokenize-nemo`); elsewhere the
  script is absent (it is not in the nemo_toolkit wheel), so the same pieces are
  used from the wheel: the slow HF tokenizer via `get_nmt_tokenizer(use_fast=False)`
  and NeMo's legacy `MMapIndexedDatasetBuilder`, document by document as the script does.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from jacpt.paths import BIN_DIR

NEMO_SCRIPT = Path("/opt/NeMo/scripts/nlp_language_modeling/preprocess_data_for_megatron.py")
BATCH_LINES = 256


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


# ----------------------------------------------------------------------------- fast backend

_TOKENIZER = None


def _init_worker(tokenizer_json: str) -> None:
    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; the pool gives the parallelism
    from tokenizers import Tokenizer

    _TOKENIZER = Tokenizer.from_file(tokenizer_json)


def _encode_lines(args: tuple[list[bytes], int]) -> tuple[np.ndarray, np.ndarray, int]:
    """Worker: raw JSONL lines -> (flat int32 ids with eos after each doc, per-doc lengths, bytes read)."""
    lines, eos = args
    texts = [json.loads(line)["text"] for line in lines]
    encs = _TOKENIZER.encode_batch(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) + 1 for e in encs), dtype=np.int32, count=len(encs))
    flat = np.empty(int(lengths.sum()), dtype=np.int32)
    pos = 0
    for e, n in zip(encs, lengths):
        flat[pos:pos + n - 1] = e.ids
        flat[pos + n - 1] = eos
        pos += n
    return flat, lengths, sum(map(len, lines))


def _batches(path: Path, eos: int) -> Iterator[tuple[list[bytes], int]]:
    batch: list[bytes] = []
    with open(path, "rb") as f:
        for line in f:
            batch.append(line)
            if len(batch) == BATCH_LINES:
                yield batch, eos
                batch = []
    if batch:
        yield batch, eos


def _append_flat(builder, flat: np.ndarray, lengths: np.ndarray) -> None:
    """Add many one-sequence documents at once: what `add_document` does per document, in one write.

    megatron/core/datasets/indexed_dataset.py (core_r0.12.0) `IndexedDatasetBuilder.add_document`
    writes the ids, extends `sequence_lengths` and appends `len(sequence_lengths)` to
    `document_indices`; the read-back test keeps this in step with it.
    """
    builder.data_file.write(flat.tobytes(order="C"))
    start = len(builder.sequence_lengths)
    builder.sequence_lengths.extend(lengths.tolist())
    builder.document_indices.extend(range(start + 1, start + 1 + len(lengths)))


def tokenize_fast(jsonl: Path, prefix: Path, tokenizer_dir: Path, eos: int, workers: int = 2,
                  progress=None) -> TokenizeStats:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    stats = TokenizeStats()
    t0 = time.perf_counter()
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    ctx = mp.get_context("spawn")  # the workers need only tokenizers and numpy, not the parent's state
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_dir / "tokenizer.json"),)) as pool:
        for flat, lengths, nbytes in pool.imap(_encode_lines, _batches(jsonl, eos), chunksize=1):
            _append_flat(builder, flat, lengths)
            stats.documents += len(lengths)
            stats.tokens += len(flat)
            stats.bytes_in += nbytes
            if progress:
                progress(stats, time.perf_counter() - t0)
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
