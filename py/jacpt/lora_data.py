"""LoRA examples: {input, output} JSONL for NeMo's FineTuningDataModule.

Built deterministically from the cleaned corpus: the input is an ASCII
instruction (NeMo passes prompt templates through `unicode_escape`, so the
template stays ASCII and Japanese lives only in the data) plus the article's
title and lead sentence; the output is the sentences that follow. Training
examples come from the train split, validation and test from the held-out
validation split (alternating), so evaluation never sees
training articles. A user-supplied directory is validated the same way.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

INSTRUCTION = "Continue the following Japanese encyclopedia article.\nTitle: {title}\nLead: {lead}\nContinuation:"
FILES = ("training.jsonl", "validation.jsonl", "test.jsonl")
MAX_OUTPUT_CHARS = 240
_SENT = re.compile(r"[^。！？!?]*[。！？!?]")


class LoraDataError(Exception):
    """A LoRA data file is malformed; the message has file:line and the fix."""


def example(rec: dict) -> dict | None:
    """The example for one corpus record, or None when it has no title or too few sentences."""
    title = (rec.get("meta") or {}).get("title") if isinstance(rec.get("meta"), dict) else None
    first_para = rec["text"].strip().split("\n", 1)[0]
    sents = [s.strip() for s in _SENT.findall(first_para) if s.strip()]
    if not title or not isinstance(title, str) or len(sents) < 2:
        return None
    out = ""
    for s in sents[1:]:
        if out and len(out) + len(s) > MAX_OUTPUT_CHARS:
            break
        out += s
    return {"input": INSTRUCTION.format(title=title.strip(), lead=sents[0]), "output": out}


def build(clean_train: Path, clean_val: Path, out_dir: Path, max_train: int, max_eval: int) -> dict[str, int]:
    """Write training/validation/test.jsonl into out_dir; returns the example count per file."""
    counts = {}
    with open(out_dir / "training.jsonl", "w", encoding="utf-8") as f:
        counts["training.jsonl"] = _write(_examples(clean_train), f, max_train)
    with open(out_dir / "validation.jsonl", "w", encoding="utf-8") as fv, \
            open(out_dir / "test.jsonl", "w", encoding="utf-8") as ft:
        nv = nt = 0
        for i, ex in enumerate(_examples(clean_val)):
            if i % 2 == 0:
                if not max_eval or nv < max_eval:
                    fv.write(json.dumps(ex, ensure_ascii=False) + "\n")
                    nv += 1
            elif not max_eval or nt < max_eval:
                ft.write(json.dumps(ex, ensure_ascii=False) + "\n")
                nt += 1
        counts["validation.jsonl"], counts["test.jsonl"] = nv, nt
    empty = [k for k, v in counts.items() if v == 0]
    if empty:
        raise LoraDataError(f"no LoRA examples for {', '.join(empty)}: the corpus needs documents with "
                            "meta.title and at least two sentences in the first paragraph; supply your own "
                            "with LORA_DATA=<dir of training/validation/test.jsonl>")
    return counts


def _examples(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            ex = example(json.loads(line))
            if ex:
                yield ex


def _write(examples, f, cap: int) -> int:
    n = 0
    for ex in examples:
        if cap and n >= cap:
            break
        f.write(json.dumps(ex, ensure_ascii=False) + "\n")
        n += 1
    return n


def validate_file(path: Path) -> int:
    """Check one user-supplied JSONL file: every line an object with non-empty string input and output."""
    if not path.is_file():
        raise LoraDataError(f"{path}: missing; a LoRA data directory needs {', '.join(FILES)}")
    n = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise LoraDataError(f"{path}:{lineno}: not a valid UTF-8 JSON line ({e}); fix or remove it") from None
            bad = [k for k in ("input", "output") if not isinstance(rec, dict) or not isinstance(rec.get(k), str)
                   or not rec[k].strip()]
            if bad:
                raise LoraDataError(f"{path}:{lineno}: needs non-empty string field(s) {', '.join(bad)} "
                                    "(each line: {\"input\": ..., \"output\": ...})")
            n += 1
    if n == 0:
        raise LoraDataError(f"{path}: no examples; add at least one {{\"input\", \"output\"}} line")
    return n


def copy_user(src_dir: Path, out_dir: Path) -> dict[str, int]:
    counts = {name: validate_file(src_dir / name) for name in FILES}
    for name in FILES:
        shutil.copyfile(src_dir / name, out_dir / name)
    return counts
