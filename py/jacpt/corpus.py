"""Validate and clean llm-jp-style JSONL corpora, streaming, in bounded memory.

Input lines are `{"text": str, "meta": {...}}` (llm-jp-corpus v3), plain or
gzipped. Structural corruption (a truncated gzip, invalid UTF-8, a line that is
not JSON or has no string `text`) stops the run with file:line and the fix,
unless `skip_bad` turns it into counted skips. Empty and duplicate documents
are normal in web-scale corpora: they are skipped and counted. Every dropped
line is counted under one reason; nothing disappears silently.

Memory: one line at a time plus a 16-byte digest per kept document (exact
dedup), i.e. O(documents), never O(text).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

# Reasons a line can be dropped; the report lists each with its count.
STRUCTURAL = ("bad_utf8", "bad_json", "bad_schema", "corrupt_gzip")
NORMAL = ("blank_line", "empty", "duplicate", "too_short", "too_long", "low_ja_ratio")

_JA = re.compile(r"[\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
                 r"\u3005\u3006\u30fc]")
_LETTER = re.compile(r"[^\W\d_]")

_FIX = "re-download it (make data verifies checksums), or rerun with SKIP_BAD=1 (--skip-bad) to skip and count such lines"


class CorpusError(Exception):
    """Structural corruption in an input file; the message has file:line and the fix."""


def japanese_ratio(text: str) -> float:
    """Share of letters that are Japanese script (kana, kanji, 々, ー); digits and punctuation don't count."""
    letters = len(_LETTER.findall(text))
    return len(_JA.findall(text)) / letters if letters else 0.0


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def iter_raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield (line number, raw bytes without the newline). Raises CorpusError on a broken gzip stream."""
    lineno = 0
    f = _open(path)
    try:
        for lineno, raw in enumerate(f, 1):
            yield lineno, raw.rstrip(b"\r\n")
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise CorpusError(f"{path}:{lineno + 1}: gzip stream is truncated or corrupt after line {lineno} "
                          f"({type(e).__name__}: {e}): {_FIX}") from None
    finally:
        f.close()


@dataclass
class Filters:
    min_chars: int = 0
    max_chars: int = 0
    min_ja_ratio: float = 0.0


@dataclass
class FileReport:
    path: str
    split: str
    lines: int = 0
    kept: int = 0
    chars: int = 0
    dropped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"path": self.path, "split": self.split, "lines": self.lines, "kept": self.kept,
                "chars": self.chars, "dropped": dict(sorted(self.dropped.items()))}


def parse_line(path: Path, lineno: int, raw: bytes) -> dict:
    """Decode one JSONL line into a record with a string `text`, or raise CorpusError naming the problem."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad("bad_utf8", f"{path}:{lineno}: invalid UTF-8 at byte {e.start} of the line: {_FIX}") from None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise _Bad("bad_json", f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}): {_FIX}") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
        raise _Bad("bad_schema", f"{path}:{lineno}: expected an object with a string field \"text\" "
                   f"(llm-jp format {{\"text\": ..., \"meta\": {{...}}}}): {_FIX}")
    return rec


class _Bad(CorpusError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _drop_reason(text: str, filters: Filters) -> str | None:
    if not text.strip():
        return "empty"
    n = len(text)
    if filters.min_chars and n < filters.min_chars:
        return "too_short"
    if filters.max_chars and n > filters.max_chars:
        return "too_long"
    if filters.min_ja_ratio and japanese_ratio(text) < filters.min_ja_ratio:
        return "low_ja_ratio"
    return None


def content_bucket(text: str) -> float:
    """A stable number in [0, 1) from the document's content: the deterministic split key."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def clean(inputs: list[tuple[Path, str]], outputs: dict[str, IO[str]], filters: Filters, *,
          skip_bad: bool = False, val_fraction: float = 0.0) -> list[FileReport]:
    """Stream `inputs` [(path, split)] into `outputs` {split: text file}, returning a report per file.

    split is "train", "validation", or "auto" (assigned by content hash with
    `val_fraction`). Validation inputs should come first: a document seen there
    is then dropped from train as a duplicate, so the held-out set never leaks.
    """
    seen: set[bytes] = set()
    reports = []
    for path, split in inputs:
        rep = FileReport(str(path), split)
        reports.append(rep)
        lines = iter_raw_lines(path)
        while True:
            try:
                lineno, raw = next(lines)
            except StopIteration:
                break
            except CorpusError:
                if not skip_bad:
                    raise
                rep.dropped["corrupt_gzip"] += 1
                break
            rep.lines += 1
            if not raw.strip():
                rep.dropped["blank_line"] += 1
                continue
            try:
                rec = parse_line(path, lineno, raw)
            except _Bad as e:
                if not skip_bad:
                    raise CorpusError(str(e)) from None
                rep.dropped[e.reason] += 1
                continue
            text = rec["text"]
            reason = _drop_reason(text, filters)
            if reason is None:
                digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
                if digest in seen:
                    reason = "duplicate"
                else:
                    seen.add(digest)
            if reason:
                rep.dropped[reason] += 1
                continue
            target = split if split != "auto" else ("validation" if content_bucket(text) < val_fraction else "train")
            outputs[target].write(json.dumps(rec, ensure_ascii=False) + "\n")
            rep.kept += 1
            rep.chars += len(text)
    return reports


def summarize(reports: list[FileReport]) -> dict:
    """Totals per split and per drop reason, plus the per-file reports."""
    total: dict = {"lines": 0, "kept": 0, "chars": 0, "dropped": Counter()}
    for r in reports:
        total["lines"] += r.lines
        total["kept"] += r.kept
        total["chars"] += r.chars
        total["dropped"].update(r.dropped)
    total["dropped"] = {k: total["dropped"].get(k, 0) for k in NORMAL + STRUCTURAL}
    return {"total": total, "files": [r.as_dict() for r in reports]}
