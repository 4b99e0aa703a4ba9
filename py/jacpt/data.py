"""`jacpt data`: source -> validated, cleaned JSONL -> Megatron .bin/.idx -> LoRA JSONL -> data_manifest.json.

The output directory `<data dir>/<profile>/` is built under a temp name and
swapped into place whole, with `data_manifest.json` written last inside it, so
a later stage either finds a complete, verified data set or none. Re-running
with unchanged inputs (source checksums, data settings, tokenizer) does nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from jacpt import log
from jacpt import assets, corpus, encode, lora_data, paths, runs
from jacpt.config import Config, parse_shards
from jacpt.fsutil import sha256_file, staging_dir, write_json_atomic

FORMAT_VERSION = 1
MANIFEST = "data_manifest.json"
SPLITS = ("train", "validation")
_TRAIN_RE = re.compile(r"^train_(\d+)\.jsonl(\.gz)?$")
_VAL_RE = re.compile(r"^validation_(\d+)\.jsonl(\.gz)?$")


class DataError(Exception):
    """The data stage cannot go on; the message says what, where and the fix."""



@dataclass
class SourceFile:
    path: Path
    split: str  # train | validation | auto
    size: int = 0
    sha256: str = ""

    def as_dict(self) -> dict:
        return {"name": self.path.name, "split": self.split, "size": self.size, "sha256": self.sha256}


@dataclass
class Source:
    kind: str  # llmjp | sample | dir
    dir: Path
    files: list[SourceFile]


# ----------------------------------------------------------------------------- sources

def raw_dir() -> Path:
    return paths.data_dir() / "raw" / "llmjp-ja_wiki"


def _llmjp_files(directory: Path, shards: list[int]) -> list[SourceFile]:
    return ([SourceFile(directory / "validation_0.jsonl.gz", "validation")]
            + [SourceFile(directory / f"train_{n}.jsonl.gz", "train") for n in shards])


def _dir_files(directory: Path, shards: list[int]) -> list[SourceFile]:
    if not directory.is_dir():
        raise DataError(f"data.source {directory} is not a directory: use llmjp, sample, or a directory "
                        "of train_*.jsonl[.gz] / validation_*.jsonl[.gz] files")
    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    val = [n for n in names if _VAL_RE.match(n)]
    train = [n for n in names if (m := _TRAIN_RE.match(n)) and int(m.group(1)) in shards]
    if not train and not any(_TRAIN_RE.match(n) for n in names):
        train = [n for n in names if re.search(r"\.jsonl(\.gz)?$", n) and n not in val]
    if not train:
        raise DataError(f"{directory}: no training files (train_<N>.jsonl[.gz] within SHARDS, or other "
                        "*.jsonl[.gz]); check the directory and SHARDS")
    split = "train" if val else "auto"  # no validation file: split deterministically by content hash
    return [SourceFile(directory / n, "validation") for n in val] + [SourceFile(directory / n, split) for n in train]


def _read_sums(path: Path) -> dict[str, tuple[int | None, str]]:
    """MANIFEST.tsv (file, size, sha256, date) of the download or SHA256SUMS (sha256  file) -> {file: (size, sha)}."""
    sums: dict[str, tuple[int | None, str]] = {}
    if not path.is_file():
        return sums
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if "\t" in line:
            name, size, sha = line.split("\t")[:3]
            sums[name] = (int(size), sha)
        else:
            sha, name = line.split(None, 1)
            sums[name.lstrip("*")] = (None, sha)
    return sums


def resolve_source(cfg: Config) -> Source:
    """Which files make up the corpus; nothing is read or downloaded yet."""
    spec, shards = cfg["data.source"], parse_shards(cfg["data.shards"])
    if spec == "llmjp":
        return Source("llmjp", raw_dir(), _llmjp_files(raw_dir(), shards))
    if spec == "sample":
        files = [f for f in _dir_files(paths.SAMPLE_DIR, shards)]
        return Source("sample", paths.SAMPLE_DIR, files)
    return Source("dir", paths.resolve(spec), _dir_files(paths.resolve(spec), shards))


def download(cfg: Config, source: Source) -> None:
    shards = cfg["data.shards"]
    cmd = [str(paths.BIN_DIR / "download-jawiki"), "--dest", str(source.dir), "--shards", shards,
           "--base-url", cfg["data.base_url"]]
    log("download: " + " ".join(cmd))
    # Progress and errors go straight to our stderr; the per-file summary (stdout) is relayed there too,
    # so that this command's stdout stays the manifest path alone.
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    sys.stderr.write(proc.stdout)
    rc = proc.returncode
    if rc != 0:
        raise DataError(f"download of ja_wiki failed (exit {rc}); the messages above say which file and why")


def checksum_source(source: Source) -> None:
    """Fill size and sha256 of every source file, verifying against the recorded sums where there are some."""
    recorded = _read_sums(source.dir / ("MANIFEST.tsv" if source.kind == "llmjp" else "SHA256SUMS"))
    for f in source.files:
        if not f.path.is_file():
            raise DataError(f"{f.path}: missing; for llmjp run `make data` online (or set JAWIKI_BASE_URL to a "
                            "mirror), for a directory check data.source and SHARDS")
        f.size = f.path.stat().st_size
        rec = recorded.get(f.path.name)
        if source.kind == "llmjp" and rec and rec[0] == f.size:
            f.sha256 = rec[1]  # verified by bin/download-jawiki in this run
            continue
        f.sha256 = sha256_file(f.path)
        if rec and rec[1] != f.sha256:
            raise DataError(f"{f.path}: sha256 {f.sha256} differs from the recorded {rec[1]}: the file changed "
                            "or is corrupt; restore it (git checkout / re-download)")
        if source.kind == "sample" and not rec:
            raise DataError(f"{f.path.name} has no entry in {source.dir / 'SHA256SUMS'}: reinstall the kit")


# ----------------------------------------------------------------------------- plan and fingerprint

def tokenizer_dir(cfg: Config) -> Path:
    return paths.resolve(cfg["tokenizer.dir"]) if cfg["tokenizer.dir"] else paths.assets_dir() / "tokenizer"


def out_dir(cfg: Config) -> Path:
    return paths.data_dir() / cfg.profile


# Settings that change the output bytes; backend and workers don't (the backends are byte-identical).
_FINGERPRINT_KEYS = ("data.min_chars", "data.max_chars", "data.min_ja_ratio", "data.val_fraction",
                     "data.skip_bad", "data.lora_source", "data.lora_max_train", "data.lora_max_eval")


def input_fingerprint(cfg: Config, source: Source, tok_fp: str, lora_src: Path | None) -> str:
    doc = {"format": FORMAT_VERSION, "files": [f.as_dict() for f in source.files],
           "settings": {k: cfg[k] for k in _FINGERPRINT_KEYS}, "tokenizer": tok_fp,
           "lora_files": [[n, sha256_file(lora_src / n)] for n in lora_data.FILES] if lora_src else None}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def plan_text(cfg: Config, source: Source) -> str:
    lines = [f"profile      {cfg.profile}",
             f"source       {source.kind}: {source.dir}",
             *(f"  {f.split:<10} {f.path.name}" for f in source.files),
             f"tokenizer    {tokenizer_dir(cfg)}",
             f"backend      {cfg['data.backend']} ({cfg['data.workers']} workers)",
             f"filters      min_chars={cfg['data.min_chars']} max_chars={cfg['data.max_chars']} "
             f"min_ja_ratio={cfg['data.min_ja_ratio']} skip_bad={cfg['data.skip_bad']}",
             f"lora data    {cfg['data.lora_source']}",
             f"output       {out_dir(cfg)}/{MANIFEST}"]
    if source.kind == "llmjp":
        lines.insert(2, f"  download   {cfg['data.base_url']} (shards {cfg['data.shards']} + validation_0)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- manifest

def load_manifest(path: Path) -> dict:
    """Read a data_manifest.json and resolve its relative paths against its directory."""
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the data manifest ({e}); run `make data`") from None
    if m.get("format") != FORMAT_VERSION:
        raise DataError(f"{path}: data format {m.get('format')} is not {FORMAT_VERSION}; run `make data` again")
    base = path.parent
    for split in SPLITS:
        m["megatron"][split]["prefix_path"] = str(base / m["megatron"][split]["prefix"])
    m["lora"]["dir_path"] = str(base / m["lora"]["dir"])
    return m


def up_to_date(out: Path, fingerprint: str) -> bool:
    mpath = out / MANIFEST
    if not mpath.is_file():
        return False
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    if m.get("input_fingerprint") != fingerprint:
        return False
    return all((out / rel).is_file() and (out / rel).stat().st_size == info["size"]
               for rel, info in m.get("outputs", {}).items())


# ----------------------------------------------------------------------------- run

def run(cfg: Config, force: bool = False) -> Path:
    """Build the profile's data directory; returns the path of its data_manifest.json."""
    source = resolve_source(cfg)
    if source.kind == "llmjp":
        download(cfg, source)
    checksum_source(source)
    tok = tokenizer_dir(cfg)
    try:
        assets.check_tokenizer_dir(tok)
    except assets.AssetError as e:
        raise DataError(str(e)) from None
    tok_fp = assets.tokenizer_fingerprint(tok)
    lora_src = None if cfg["data.lora_source"] == "auto" else paths.resolve(cfg["data.lora_source"])
    if lora_src and not lora_src.is_dir():
        raise DataError(f"data.lora_source {lora_src} is not a directory of {', '.join(lora_data.FILES)}")
    fp = input_fingerprint(cfg, source, tok_fp, lora_src)
    out = out_dir(cfg)
    if not force and up_to_date(out, fp):
        log(f"up to date: {out} (inputs unchanged; --force rebuilds)")
        return out / MANIFEST

    t0 = time.perf_counter()
    with staging_dir(out) as stage:
        manifest = _build(cfg, source, tok, tok_fp, lora_src, stage)
        manifest["input_fingerprint"] = fp
        manifest["seconds"] = round(time.perf_counter() - t0, 2)
        write_json_atomic(stage / MANIFEST, manifest)  # last: marks the directory complete
    return out / MANIFEST


def _build(cfg: Config, source: Source, tok: Path, tok_fp: str, lora_src: Path | None, stage: Path) -> dict:
    clean_dir, mega_dir, lora_dir = stage / "clean", stage / "megatron", stage / "lora"
    for d in (clean_dir, mega_dir, lora_dir):
        d.mkdir()

    log(f"clean: {len(source.files)} file(s) from {source.dir}")
    filters = corpus.Filters(cfg["data.min_chars"], cfg["data.max_chars"], cfg["data.min_ja_ratio"])
    inputs = [(f.path, f.split) for f in source.files]
    try:
        with open(clean_dir / "train.jsonl", "w", encoding="utf-8") as ft, \
                open(clean_dir / "validation.jsonl", "w", encoding="utf-8") as fv:
            reports = corpus.clean(inputs, {"train": ft, "validation": fv}, filters,
                                   skip_bad=cfg["data.skip_bad"], val_fraction=cfg["data.val_fraction"])
    except corpus.CorpusError as e:
        raise DataError(str(e)) from None
    report = corpus.summarize(reports)
    write_json_atomic(clean_dir / "report.json", report)
    dropped = {k: v for k, v in report["total"]["dropped"].items() if v}
    log(f"clean: kept {report['total']['kept']:,} of {report['total']['lines']:,} lines; dropped {dropped or 'none'}")

    backend = encode.BACKENDS[cfg["data.backend"]]
    megatron, tok_stats = {}, {}
    for split in SPLITS:
        jsonl = clean_dir / f"{split}.jsonl"
        if jsonl.stat().st_size == 0:
            hint = ("raise data.val_fraction or add a validation_*.jsonl file" if split == "validation"
                    else "check the source files and the filters (data.min_chars, data.min_ja_ratio)")
            raise DataError(f"no {split} documents left after cleaning (counts above): {hint}")
        prefix = mega_dir / f"{split}_text_document"
        extra = {"engine": cfg["data.engine"]} if cfg["data.backend"] == "fast" else {}
        try:
            stats = backend(jsonl, prefix, tok, assets.EOS_ID, cfg["data.workers"],
                            progress=encode.progress_printer(split, jsonl.stat().st_size), **extra)
        except encode.EngineError as e:
            raise DataError(str(e)) from None
        log(f"tokenize {split}: {stats.documents:,} docs, {stats.tokens:,} tokens in {stats.seconds:.1f}s "
            f"({stats.as_dict()['docs_per_s']:,} docs/s, {stats.as_dict()['mb_per_s']} MB/s, "
            f"{stats.as_dict()['tokens_per_s']:,} tokens/s)")
        _check_readback(prefix, stats.documents)
        megatron[split] = {"prefix": f"megatron/{split}_text_document", "documents": stats.documents,
                           "tokens": stats.tokens}
        tok_stats[split] = stats.as_dict()

    try:
        if lora_src:
            counts = lora_data.copy_user(lora_src, lora_dir)
        else:
            counts = lora_data.build(clean_dir / "train.jsonl", clean_dir / "validation.jsonl", lora_dir,
                                     cfg["data.lora_max_train"], cfg["data.lora_max_eval"])
    except lora_data.LoraDataError as e:
        raise DataError(str(e)) from None
    log(f"lora: {counts}")

    outputs = {}
    for p in sorted(stage.rglob("*")):
        if p.is_file():
            outputs[str(p.relative_to(stage))] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return {
        "format": FORMAT_VERSION,
        "profile": cfg.profile,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": {"kind": source.kind, "dir": str(source.dir), "files": [f.as_dict() for f in source.files]},
        "settings": {k: v for k, v in cfg.as_dict().items() if k.startswith(("data.", "tokenizer."))},
        "tokenizer": {"dir": str(tok), "fingerprint": tok_fp, "vocab_size": assets.TOKENIZER_VOCAB_SIZE,
                      "eos_id": assets.EOS_ID},
        "clean": report["total"],
        "megatron": megatron,
        "tokenize": {"backend": cfg["data.backend"], "workers": cfg["data.workers"],
                     "engine": encode.load_engine(tok, cfg["data.engine"]).name if cfg["data.backend"] == "fast"
                     else "nemo", **tok_stats},
        "lora": {"dir": "lora", "source": str(lora_src) if lora_src else "auto", "examples": counts},
        "outputs": outputs,
        "versions": runs.versions(),
    }


def _check_readback(prefix: Path, documents: int) -> None:
    """Open the written files with megatron-core's reader, as training will."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    if len(ds.document_indices) - 1 != documents:
        raise DataError(f"{prefix}.idx reads back {len(ds.document_indices) - 1} documents, wrote {documents}")
