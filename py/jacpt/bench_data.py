"""`jacpt bench-data`: tokeniser throughput, backend against backend, on one synthetic Japanese corpus.

Run: `make bench-data` (= `jacpt bench-data --mb 8`), about 2 minutes on 2 cores, most of
it the NeMo reference. Prints two tables and writes the same figures to
`bench/results/data-<YYYY-MM-DD>.json`; BENCHMARKS.md explains them.

* Backends: the fast backend as `make data` runs it with 1 and 2 workers, the same
  with the HF engine, NeMo's reference (`tokenize_nemo`: outside the container the
  slow HF tokenizer and NeMo's legacy builder, one process), and raw
  `tokenizers.Tokenizer.encode_batch` on 2 Rayon threads with nothing written.
* Levers: what each design choice of the fast backend is worth (batch size,
  threads against a process pool, the engines alone, bpe-qwen).

Rates are steady state: from the moment the tokenizer is loaded to the last byte
written. The load (imports excluded: they are done first, once) is its own column.
Every run starts cold (no tokenizer or BPE cache kept from an earlier run); fast
and raw runs are repeated and the median kept. Each backend's .bin/.idx must be
byte-identical to the reference's, and the raw engines' ids must match it: the
run says so, and fails (exit 1, after writing the JSON) if one does not.
"""

from __future__ import annotations

import filecmp
import gzip
import json
import os
import platform
import random
import re
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import click

from jacpt import log as _log
from jacpt import assets, encode, paths
from jacpt.fsutil import sha256_file, write_json_atomic

WORKERS = 2  # the comparison is at equal cores: the goal is >= 10x the reference on 2
GOAL = 10.0
SEED = 20261122
DOC_CHARS = (500, 3000)  # uniform document length, in characters
PARA_SENTENCES = (2, 6)
RUN_MIN = 4  # letter runs this long or longer are spliced (see make_corpus)
_RUN = re.compile(r"([^\W\d_]+)")  # a run of letters: kanji, kana, Latin (what the split regex keeps together)
_SENTENCE = re.compile(r"[^。！？]+[。！？]?")
_PACKAGES = ("jacpt", "tokenizers", "tiktoken", "bpe-qwen", "transformers", "nemo-toolkit", "megatron-core",
             "numpy", "torch")


def log(msg: str) -> None:
    _log(f"bench-data: {msg}")


# ----------------------------------------------------------------------------- the input

def _sample_sentences() -> list[str]:
    out = []
    for p in sorted(paths.SAMPLE_DIR.glob("*.jsonl.gz")):
        with gzip.open(p, "rt", encoding="utf-8") as f:
            for line in f:
                for para in json.loads(line)["text"].split("\n"):
                    out += [s for s in _SENTENCE.findall(para) if s.strip()]
    return out


def make_corpus(path: Path, mb: float, seed: int = SEED) -> dict:
    """Write a deterministic Japanese JSONL of about `mb` MB (llm-jp shape) built from the embedded sample.

    Documents of DOC_CHARS characters, paragraphs of PARA_SENTENCES sentences drawn
    from the sample. Drawn as they are, the sentences would repeat ~25 times in 8 MB
    and every tokenizer's word cache would hit 95% of the bytes: a benchmark of
    cache lookups. So every letter run of RUN_MIN+ characters (the unit the split
    regex hands to BPE: kanji and kana up to the next punctuation) is spliced: its
    head joined to another run's tail. That keeps the characters, run lengths and
    tokens per character of real text, and leaves the repetition of the sample
    itself (2.8% of pre-token bytes seen before, against 2.5% here over the same
    length). BENCHMARKS.md shows what the unspliced corpus does to the figures.
    """
    rng = random.Random(seed)
    sentences = _sample_sentences()
    runs = [r for s in sentences for r in _RUN.findall(s) if len(r) >= RUN_MIN]

    def vary(sentence: str) -> str:
        parts = _RUN.split(sentence)
        for k in range(1, len(parts), 2):  # odd items are the letter runs
            if len(parts[k]) >= RUN_MIN:
                other = rng.choice(runs)
                parts[k] = parts[k][:rng.randint(2, len(parts[k]) - 1)] + other[rng.randint(1, len(other) - 2):]
        return "".join(parts)

    size = docs = chars = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        while size < mb * 1e6:
            target, paras, n = rng.randint(*DOC_CHARS), [], 0
            while n < target:
                para = "".join(vary(rng.choice(sentences)) for _ in range(rng.randint(*PARA_SENTENCES)))
                paras.append(para)
                n += len(para) + 1
            text = "\n".join(paras)
            line = json.dumps({"text": text, "meta": {"id": f"synthetic-{docs:06d}", "source": "jacpt sample, spliced",
                                                      "seed": seed}}, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode("utf-8"))
            docs += 1
            chars += len(text)
    return {"bytes": size, "documents": docs, "chars": chars, "seed": seed, "sha256": sha256_file(path)}


# ----------------------------------------------------------------------------- measuring

@dataclass
class Run:
    load_s: float
    steady_s: float
    total_s: float
    cpu_s: float
    documents: int
    tokens: int
    bytes_in: int
    cores_busy: float | None = None  # CPU seconds per second once the first batch is out (None: too short to tell)
    identical: bool | None = None  # files (backends) or ids (raw engines) equal the reference's


@dataclass
class Row:
    table: str  # backends | levers
    name: str
    backend: str  # fast | nemo | raw
    engine: str
    workers: int
    runs: list[Run] = field(default_factory=list)
    note: str = ""

    @property
    def median(self) -> Run:
        return sorted(self.runs, key=lambda r: r.steady_s)[(len(self.runs) - 1) // 2]

    def figures(self, ref_mb_s: float | None) -> dict:
        m = self.median
        s = max(m.steady_s, 1e-9)
        mb_s = m.bytes_in / s / 1e6
        return {"table": self.table, "name": self.name, "backend": self.backend, "engine": self.engine,
                "workers": self.workers, "repeats": len(self.runs), "documents": m.documents, "tokens": m.tokens,
                "bytes_in": m.bytes_in, "load_s": round(m.load_s, 3), "steady_s": round(m.steady_s, 3),
                "total_s": round(m.total_s, 3), "cpu_s": round(m.cpu_s, 3),
                "cores_busy": m.cores_busy,
                "docs_per_s": round(m.documents / s, 1), "mb_per_s": round(mb_s, 3),
                "tokens_per_s": round(m.tokens / s, 1),
                "ratio_vs_reference": round(mb_s / ref_mb_s, 2) if ref_mb_s else None,
                "identical": all(r.identical for r in self.runs) if self.runs[0].identical is not None else None,
                "steady_s_all": [round(r.steady_s, 3) for r in self.runs], "note": self.note}


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class _Clock:
    """A progress callback: both backends pass the time since their tokenizer was loaded, so now - elapsed
    is when loading ended. The first call also marks where CPU use is sampled for `cores_busy`."""

    def __init__(self) -> None:
        self.ready: float | None = None
        self.first: tuple[float, float] | None = None

    def __call__(self, stats, elapsed: float) -> None:
        if self.ready is None:
            now = time.perf_counter()
            self.ready, self.first = now - elapsed, (now, _cpu())


def _cores_busy(first: tuple[float, float] | None, t1: float, cpu1: float) -> float | None:
    if first is None or t1 - first[0] < 0.2:
        return None
    return round((cpu1 - first[1]) / (t1 - first[0]), 2)


def _measure(call: Callable[[Callable], encode.TokenizeStats]) -> Run:
    """Time a backend call; a backend that never reports progress (tiny input) gets load 0, steady = total."""
    clock = _Clock()
    cpu0, t0 = _cpu(), time.perf_counter()
    stats = call(clock)
    t1, cpu1 = time.perf_counter(), _cpu()
    ready = clock.ready if clock.ready is not None else t0
    return Run(ready - t0, t1 - ready, t1 - t0, cpu1 - cpu0, stats.documents, stats.tokens, stats.bytes_in,
               _cores_busy(clock.first, t1, cpu1))


def _same_files(prefix: Path, ref: Path) -> bool:
    return all(filecmp.cmp(f"{prefix}{ext}", f"{ref}{ext}", shallow=False) for ext in (".bin", ".idx"))


def _reference_docs(ref: Path) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(ref))
    return [ds[i].tolist() for i in range(len(ds))]


# ----------------------------------------------------------------------------- the process-pool lever

_POOL_ENGINE = None


def _pool_init(tokenizer_dir: str, engine: str) -> None:
    global _POOL_ENGINE
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _POOL_ENGINE = encode.load_engine(Path(tokenizer_dir), engine)


def _pool_ping(_: int) -> int:
    time.sleep(0.05)  # long enough that every worker gets one
    return os.getpid()


def _pool_encode(job: tuple[int, list[bytes]]):
    return encode._encode_lines(_POOL_ENGINE, job[0], job[1])  # arrays pickle as their raw bytes


def _tokenize_pool(jsonl: Path, prefix: Path, tokenizer_dir: Path, eos: int, workers: int, progress,
                   engine: str) -> encode.TokenizeStats:
    """The fast pipeline on a spawned process pool instead of threads (the design before the thread pool)."""
    from array import array

    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    t0 = time.perf_counter()
    stats = encode.TokenizeStats()
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    builder.sequence_lengths, builder.document_indices = array("i"), array("q", [0])
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_pool_init,
                             initargs=(str(tokenizer_dir), engine)) as pool:
        while len(set(pool.map(_pool_ping, range(2 * workers)))) < workers:
            pass
        ready = time.perf_counter()
        jobs = ((eos, lines) for lines in encode._batches(jsonl, encode.BATCH_BYTES))
        for ids, lengths, nbytes in encode._in_order(pool, _pool_encode, jobs, 2 * workers):
            encode._append(builder, ids, lengths)
            stats.documents, stats.tokens, stats.bytes_in = (stats.documents + len(lengths),
                                                             stats.tokens + len(ids), stats.bytes_in + nbytes)
            progress(stats, time.perf_counter() - ready)
    builder.finalize(str(prefix) + ".idx")
    stats.seconds = time.perf_counter() - t0
    return stats


# ----------------------------------------------------------------------------- raw engines

def _raw_hf(tok_dir: Path, texts: list[str], threads: int):
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    t = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    return lambda: [e.ids for e in t.encode_batch(texts, add_special_tokens=False)]


def _raw_tiktoken(tok_dir: Path, texts: list[str], threads: int):
    encode._ENGINE_CACHE.clear()
    eng = encode.load_engine(tok_dir, "tiktoken")
    chunks = [texts[i:i + 32] for i in range(0, len(texts), 32)]

    def run():
        with ThreadPoolExecutor(threads) as pool:
            return [ids for chunk in pool.map(eng.encode_batch, chunks) for ids in chunk]
    return run


def _raw_bpe_qwen(tok_dir: Path, texts: list[str], threads: int):
    import bpe_qwen

    t = bpe_qwen.QwenTokenizer(str(tok_dir))
    return lambda: [list(ids) for ids in t.encode_batch_parallel(texts)]


def _measure_raw(make: Callable, texts: list[str], nbytes: int, ref_docs: list[list[int]], eos: int) -> tuple[Run, int]:
    """Load (timed apart) then encode the parsed texts; returns the run and how many documents differ."""
    cpu0, t0 = _cpu(), time.perf_counter()
    encode_all = make()
    ready, cpu_ready = time.perf_counter(), _cpu()
    ids = encode_all()
    t1, cpu1 = time.perf_counter(), _cpu()
    differ = sum(1 for got, want in zip(ids, ref_docs) if got + [eos] != want) + abs(len(ids) - len(ref_docs))
    run = Run(ready - t0, t1 - ready, t1 - t0, cpu1 - cpu0, len(ids), sum(map(len, ids)) + len(ids), nbytes,
              _cores_busy((ready, cpu_ready), t1, cpu1), differ == 0)
    return run, differ


def _bpe_qwen_probe_note(tok_dir: Path) -> str:
    """How bpe-qwen does on the fast engine's self-check probes (NFC applied first, as the backends do)."""
    import unicodedata

    import bpe_qwen
    from tokenizers import Tokenizer

    bq, hf = bpe_qwen.QwenTokenizer(str(tok_dir)), Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    probes = [unicodedata.normalize("NFC", p) for p in encode._PROBES]
    bad = [p for p in probes if list(bq.encode(p)) != hf.encode(p, add_special_tokens=False).ids]
    return (f"{len(bad)} of {len(probes)} probe strings differ, e.g. {bad[0]!r}: not used" if bad
            else f"all {len(probes)} probe strings match")


# Peak RSS from /proc (VmHWM, this process's own): ru_maxrss of a child also counts its parent's pages at exec.
_MEMORY_SCRIPT = """
import re, resource, sys
from pathlib import Path
def peak_kib():
    try:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
import megatron.core.datasets.indexed_dataset
from jacpt import encode
jsonl, tok, prefix = (Path(a) for a in sys.argv[1:4])
eos, workers = int(sys.argv[4]), int(sys.argv[5])
rss = [peak_kib()]
encode.load_engine(tok)
rss.append(peak_kib())
encode.tokenize_fast(jsonl, prefix, tok, eos, workers)
rss.append(peak_kib())
print(*rss)
"""


def _memory(inputs: list[Path], tok_dir: Path, work: Path, eos: int, env: dict[str, str]) -> dict:
    """Peak RSS of a fresh process tokenising each input (fast, WORKERS): after imports, after the engine
    is loaded, at the end. `env` is the environment from before NeMo was imported here (it sets variables)."""
    import subprocess

    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(paths.KIT_ROOT / "py"), env.get("PYTHONPATH")]))}
    out: dict[str, list] = {"input_bytes": [], "peak_rss_mib_imported": [], "peak_rss_mib_loaded": [],
                            "peak_rss_mib_end": []}
    for jsonl in inputs:
        res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(jsonl), str(tok_dir), str(work / "mem"),
                              str(eos), str(WORKERS)], capture_output=True, text=True, env=env, check=True)
        imported, loaded, end = (int(x) / 1024 for x in res.stdout.split()[-3:])  # KiB
        out["input_bytes"].append(jsonl.stat().st_size)
        for key, v in (("imported", imported), ("loaded", loaded), ("end", end)):
            out[f"peak_rss_mib_{key}"].append(round(v, 1))
    return out


# ----------------------------------------------------------------------------- machine and report

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine() -> dict:
    versions = {"python": platform.python_version()}
    for dist in _PACKAGES:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_model": _cpu_model(), "cores": os.cpu_count(), "usable_cores": usable,
            "platform": platform.platform(), "loadavg_start": list(os.getloadavg()), "versions": versions}


def _table(rows: list[dict], title: str) -> str:
    head = (f"{'':40} {'workers':>7}  {'engine':<9} {'docs/s':>7} {'MB/s':>7} {'tokens/s':>10} {'x ref':>6} "
            f"{'load s':>6} {'cores':>5}  identical")
    lines = [title, head, "-" * len(head)]
    for r in rows:
        ident = "reference" if r["backend"] == "nemo" else {True: "yes", False: "NO", None: "-"}[r["identical"]]
        ratio = f"{r['ratio_vs_reference']:.1f}" if r["ratio_vs_reference"] is not None else "-"
        cores = f"{r['cores_busy']:.2f}" if r["cores_busy"] is not None else "-"
        lines.append(f"{r['name']:<40} {r['workers']:>7}  {r['engine']:<9} {r['docs_per_s']:>7,.0f} "
                     f"{r['mb_per_s']:>7.2f} {r['tokens_per_s']:>10,.0f} {ratio:>6} {r['load_s']:>6.2f} {cores:>5}  "
                     f"{ident}{'  (' + r['note'] + ')' if r['note'] else ''}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def main(mb: float = 8.0, out_dir: str = "bench/results", repeats: int = 3, levers: bool = True) -> Path:
    """Run the benchmark; returns the JSON's path. Raises click.ClickException when outputs differ."""
    tok_dir = paths.assets_dir() / "tokenizer"
    try:
        assets.check_tokenizer_dir(tok_dir)
    except assets.AssetError as e:
        raise click.ClickException(f"{e}\n(bench-data uses the kit's tokenizer at {tok_dir}; "
                                   "JACPT_ASSETS_DIR moves it)") from None
    eos = assets.EOS_ID
    machine = _machine()
    clean_env = dict(os.environ)
    old_env = {k: os.environ.get(k) for k in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    os.environ["RAYON_NUM_THREADS"] = str(WORKERS)  # Rayon reads it once, at first use, per library
    try:
        with tempfile.TemporaryDirectory(prefix="jacpt-bench-data-") as tmp:
            work = Path(tmp)
            jsonl = work / "synthetic.jsonl"
            log(f"writing {mb:g} MB of synthetic Japanese to {jsonl}")
            corpus = make_corpus(jsonl, mb)
            log("importing NeMo, megatron-core and the tokenizers once (not timed)")
            t = time.perf_counter()
            _import_all()
            import_s = time.perf_counter() - t
            rows, ref = _run_all(jsonl, work, tok_dir, eos, corpus["bytes"], repeats, levers)
            memory = None
            if levers:
                log(f"memory: fast, {WORKERS} workers, in fresh processes on {mb:g} MB and {4 * mb:g} MB")
                big = work / "synthetic-4x.jsonl"
                make_corpus(big, 4 * mb)
                memory = _memory([jsonl, big], tok_dir, work, eos, clean_env)
    finally:
        for k, v in old_env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)

    ref_row = next(r for r in rows if r.backend == "nemo")
    ref_mb_s = ref_row.figures(None)["mb_per_s"]
    figures = [r.figures(ref_mb_s) for r in rows]
    fast2 = next(f for f in figures if f["name"] == "fast" and f["workers"] == WORKERS)
    machine["loadavg_end"] = list(os.getloadavg())
    result = {
        "schema": 1,
        "date": datetime.now().strftime("%Y-%m-%d"),
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": f"jacpt bench-data --mb {mb:g}",
        "machine": machine,
        "input": {"mb_requested": mb, **corpus, "tokens": ref_row.median.tokens,
                  "generator": "jacpt.bench_data.make_corpus: embedded sample sentences, letter runs spliced"},
        "tokenizer": {"dir": str(tok_dir), "fingerprint": assets.tokenizer_fingerprint(tok_dir),
                      "fast_engine": fast2["engine"]},
        "method": {"rates": "steady state: bytes_in / (end - tokenizer loaded); load_s apart; imports excluded",
                   "repeats": repeats, "reference_repeats": 1, "median_of": "steady_s", "import_s": round(import_s, 2)},
        "reference": ref_row.name,
        "rows": figures,
        "memory": memory,
        "identical": all(f["identical"] is not False for f in figures if f["engine"] != "bpe-qwen"),
        "goal": {"target_ratio": GOAL, "cores": WORKERS, "fast_ratio": fast2["ratio_vs_reference"],
                 # the reference here is one process; NeMo's script spreads over --workers in the container
                 "fast_ratio_vs_reference_scaled_to_cores": round(fast2["ratio_vs_reference"] / WORKERS, 2),
                 "met": fast2["ratio_vs_reference"] / WORKERS >= GOAL},
    }
    out = paths.resolve(out_dir) / f"data-{result['date']}.json"
    write_json_atomic(out, result)

    desc = (f"{corpus['bytes'] / 1e6:.1f} MB synthetic Japanese JSONL ({corpus['documents']:,} docs, "
            f"{ref_row.median.tokens:,} tokens) on {machine['cpu_model']}, {machine['usable_cores']} cores")
    click.echo(_table([f for f in figures if f["table"] == "backends"], f"Tokenising {desc}; steady-state rates"))
    if levers:
        click.echo("\n" + _table([f for f in figures if f["table"] == "levers"], "Levers (same input)"))
    if memory:
        click.echo(f"\nmemory (fast, {WORKERS} workers, fresh process): peak RSS "
                   + ", ".join(f"{m:.0f} MiB on {b / 1e6:.0f} MB" for m, b in zip(memory["peak_rss_mib_end"],
                                                                             memory["input_bytes"]))
                   + f"; {memory['peak_rss_mib_imported'][0]:.0f} MiB after imports, "
                   f"{memory['peak_rss_mib_loaded'][0]:.0f} MiB with the engine loaded")
    g = result["goal"]
    click.echo(f"\nfast, {WORKERS} workers: {g['fast_ratio']:.1f}x the NeMo reference (one process); "
               f"{g['fast_ratio_vs_reference_scaled_to_cores']:.1f}x it scaled to {WORKERS} cores "
               f"(goal {GOAL:g}x: {'met' if g['met'] else 'NOT met'})")
    click.echo(f"load average {machine['loadavg_start'][0]:.2f} before the bench on {machine['usable_cores']} cores "
               "(above ~0.5 others share the machine: check the cores column and the repeats in the JSON)")
    bad = [f"{f['name']} ({f['workers']} workers, {f['engine']})" for f in figures
           if f["identical"] is False and f["engine"] != "bpe-qwen"]
    if bad:
        raise click.ClickException(f"output differs from the NeMo reference: {', '.join(bad)}; figures in {out}. "
                                   "A difference is a bug in the fast backend: rerun with TOKENIZE_ENGINE=hf (data.engine=hf) "
                                   "to see whether the engine is the cause")
    click.echo(f"all outputs byte-identical to the reference; figures in {out}")
    return out


def _import_all() -> None:
    import megatron.core.datasets.indexed_dataset  # noqa: F401
    import tokenizers  # noqa: F401
    from nemo.collections.nlp.data.language_modeling.megatron import indexed_dataset  # noqa: F401
    from nemo.collections.nlp.modules.common.tokenizer_utils import get_nmt_tokenizer  # noqa: F401

    try:
        import tiktoken  # noqa: F401
    except ImportError:
        pass


def _run_all(jsonl: Path, work: Path, tok_dir: Path, eos: int, nbytes: int, repeats: int,
             levers: bool) -> tuple[list[Row], Path]:
    """The reference once, then `repeats` rounds of every other row, interleaved so that a burst of load from
    elsewhere on the machine lands on one run of several rows rather than on every run of one."""
    ref = work / "nemo_text_document"
    nemo = Row("backends", "NeMo reference (slow HF tokenizer)", "nemo", "slow-hf", 1)
    log("NeMo reference: the slow tokenizer, one process (the longest part)")
    nemo.runs.append(_measure(lambda p: encode.tokenize_nemo(jsonl, ref, tok_dir, eos, WORKERS, progress=p)))
    texts = [json.loads(line)["text"] for line in open(jsonl, "rb")]
    ref_docs = _reference_docs(ref)
    plan: list[tuple[Row, Callable[[], Run]]] = []

    def fast(table: str, name: str, workers: int, engine: str | None = None, batch: int = encode.BATCH_BYTES,
             pool: bool = False) -> None:
        prefix = work / "fast_text_document"
        label = engine or encode.load_engine(tok_dir).name

        def once() -> Run:
            encode._ENGINE_CACHE.clear()  # cold: the engine is loaded and self-checked again, as in a new process
            if pool:
                run = _measure(lambda p: _tokenize_pool(jsonl, prefix, tok_dir, eos, workers, p, label))
                run.cores_busy = None  # the workers' CPU time is counted only once they exit
            else:
                run = _measure(lambda p: encode._tokenize_fast(jsonl, prefix, tok_dir, eos, workers, p,
                                                               engine=engine, batch_bytes=batch))
            run.identical = _same_files(prefix, ref)
            return run
        plan.append((Row(table, name, "fast", label, workers), once))

    def raw(table: str, name: str, engine: str, threads: int, make: Callable, note: str = "") -> None:
        row = Row(table, name, "raw", engine, threads, note=note)

        def once() -> Run:
            old = os.environ.get("TOKENIZERS_PARALLELISM")
            try:
                run, differ = _measure_raw(lambda: make(tok_dir, texts, threads), texts, nbytes, ref_docs, eos)
            finally:  # _raw_hf sets it for its row only
                os.environ.pop("TOKENIZERS_PARALLELISM", None) if old is None else os.environ.__setitem__(
                    "TOKENIZERS_PARALLELISM", old)
            if differ:
                row.note = "; ".join(filter(None, [f"not exact: {differ} of {len(texts)} documents differ", note]))
            return run
        plan.append((row, once))

    fast("backends", "fast", 1)
    fast("backends", "fast", WORKERS)
    fast("backends", "fast, HF engine", WORKERS, engine="hf")
    raw("backends", "raw tokenizers encode_batch", "hf", WORKERS, _raw_hf,
        note="parsed texts in memory, nothing written")
    if levers:
        fast("levers", "fast, 32 KiB batches", WORKERS, batch=32 * 1024)
        fast("levers", "fast, 2 MiB batches", WORKERS, batch=2 * 1024 * 1024)
        fast("levers", "fast, process pool instead of threads", WORKERS, pool=True)
        fast("levers", "fast, process pool + HF (old design)", WORKERS, engine="hf", pool=True)
        raw("levers", "raw tokenizers encode_batch, no Rayon", "hf", 1, _raw_hf)
        raw("levers", "raw tiktoken engine", "tiktoken", 1, _raw_tiktoken)
        raw("levers", "raw tiktoken engine", "tiktoken", WORKERS, _raw_tiktoken)
        try:
            import bpe_qwen  # noqa: F401
        except ImportError:
            log("bpe-qwen is not installed: its lever row is skipped (pip install bpe-qwen to measure it)")
        else:
            raw("levers", "raw bpe-qwen encode_batch_parallel", "bpe-qwen", WORKERS, _raw_bpe_qwen,
                note=_bpe_qwen_probe_note(tok_dir))
    for i in range(repeats):
        log(f"round {i + 1} of {repeats}: {len(plan)} configurations")
        for row, once in plan:
            row.runs.append(once())
    rows = [row for row, _ in plan]
    rows.insert(3, nemo)
    return rows, ref
