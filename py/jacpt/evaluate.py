"""Validation perplexity of base, CPT and LoRA on the held-out split the data stage wrote.

    jacpt eval [--dry-run]   ->  runs/<profile>/eval-<stamp>/{eval.json, eval.md}

The validation .bin/.idx (read with megatron-core's IndexedDataset, as training reads it)
is one token stream: documents concatenated, each ending in the eos the data stage
appended. The first `eval.max_val_tokens` predictions (0: all) are scored in windows of
`cpt.seq_length` predicted tokens (seq_length + 1 tokens in, as a Megatron GPT sample),
consecutive windows sharing one token, so every token after the first is predicted once,
each window with no context from the one before. Scoring is transformers on the same HF
models as the CPU demo (base = the import's HF dir, CPT and LoRA = the export's): bf16
on CUDA with the output layer and the loss in fp32, fp32 on CPU.

A run is skipped ("up to date") when a complete one has the same key: the three model
directories' identity (path, file names, sizes, mtimes), the data manifest's input
fingerprint and the eval settings.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Iterator

from jacpt import log
from jacpt import data as data_mod
from jacpt import runs
from jacpt.config import Config
from jacpt.fsutil import sha256_file, write_json_atomic, write_text_atomic
from jacpt.generate import cuda_available, hf_models, load_hf
from jacpt.train import StageError

FORMAT = 1
# Tokens per forward pass (windows x seq_length) and per output-layer chunk. They bound memory: the
# logits of a chunk take chunk x 151,936 x 4 bytes (2048 tokens: 1.2 GB on the GPU; 512: 311 MB on CPU).
BATCH_TOKENS = {"cuda": 16384, "cpu": 4096}
CHUNK_TOKENS = {"cuda": 2048, "cpu": 512}



def dir_identity(d: Path) -> dict:
    """What identifies a model directory without reading gigabytes: its path and each file's size and mtime."""
    d = d.resolve()
    return {"path": str(d), "files": {str(p.relative_to(d)): [p.stat().st_size, p.stat().st_mtime_ns]
                                      for p in sorted(d.rglob("*")) if p.is_file()}}


# ----------------------------------------------------------------------------- tokens

def token_windows(prefix: str | Path, seq_length: int, limit: int = 0) -> Iterator["numpy.ndarray"]:  # noqa: F821
    """int64 windows of at most seq_length + 1 tokens over the concatenated documents.

    Consecutive windows overlap by one token, so the windows predict every token after the first exactly
    once; at most `limit` predictions in all (0: the whole split). Memory: one document plus one window.
    """
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    left = limit or math.inf
    buf = np.empty(0, dtype=np.int64)
    for i in range(len(ds)):
        buf = np.concatenate([buf, np.asarray(ds[i], dtype=np.int64)])
        while len(buf) > seq_length:
            n = int(min(seq_length, left))
            yield buf[:n + 1]
            buf, left = buf[n:], left - n
            if left <= 0:
                return
    if len(buf) > 1:
        yield buf[:int(min(len(buf) - 1, left)) + 1]


def batches(windows: Iterator, seq_length: int, per_batch: int) -> Iterator[list]:
    """Full windows in groups of `per_batch`; a shorter (last) window alone."""
    pending = []
    for w in windows:
        if len(w) == seq_length + 1:
            pending.append(w)
            if len(pending) == per_batch:
                yield pending
                pending = []
        else:
            if pending:
                yield pending
                pending = []
            yield [w]
    if pending:
        yield pending


# ----------------------------------------------------------------------------- scoring

def score(model, windows: Iterator, seq_length: int, device: str, progress=None) -> dict:
    """Sum of next-token NLL (nats) over the windows, and the count of predicted tokens."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    decoder, head = model.get_decoder(), model.get_output_embeddings()
    weight = head.weight.float()  # fp32 logits: bf16 logits would round away ~1e-2 of each log-prob
    bias = head.bias.float() if getattr(head, "bias", None) is not None else None
    chunk = CHUNK_TOKENS[device]
    per_batch = max(1, BATCH_TOKENS[device] // seq_length)
    nll, count, t0 = 0.0, 0, time.perf_counter()
    with torch.inference_mode():
        for group in batches(windows, seq_length, per_batch):
            x = torch.from_numpy(np.stack(group)).to(device)
            h = decoder(input_ids=x[:, :-1], use_cache=False).last_hidden_state
            h, y = h.reshape(-1, h.shape[-1]), x[:, 1:].reshape(-1)
            for i in range(0, y.numel(), chunk):
                logits = F.linear(h[i:i + chunk].float(), weight, bias)
                nll += F.cross_entropy(logits, y[i:i + chunk], reduction="sum").item()
            count += y.numel()
            if progress:
                progress(count, time.perf_counter() - t0)
    if count == 0:
        raise StageError("the validation split has fewer than 2 tokens: nothing to score; check `make data`")
    return {"tokens": count, "nll_sum": nll, "seconds": time.perf_counter() - t0}


def result_row(key: str, label: str, path: str, s: dict) -> dict:
    mean = s["nll_sum"] / s["tokens"]
    return {"key": key, "label": label, "path": path, "tokens": s["tokens"], "mean_nll": mean,
            "perplexity": math.exp(mean), "seconds": round(s["seconds"], 3),
            "tokens_per_s": round(s["tokens"] / s["seconds"], 1) if s["seconds"] > 0 else None}


def _progress(label: str, total: int):
    state = {"next": 0.0}

    def report(done: int, secs: float) -> None:
        if done / max(total, 1) >= state["next"]:
            log(f"eval {label}: {done:,}/{total:,} tokens, {secs:.1f} s")
            state["next"] += 0.25
    return report


# ----------------------------------------------------------------------------- tables

def render_table(doc: dict) -> str:
    rows = [("model", "tokens scored", "mean NLL", "perplexity", "seconds")]
    rows += [(r["label"], f"{r['tokens']:,}", f"{r['mean_nll']:.4f}", f"{r['perplexity']:.3f}", f"{r['seconds']:.1f}")
             for r in doc["results"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    def fmt(r: tuple) -> str:  # model name left, numbers right
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]])


def render_markdown(doc: dict) -> str:
    out = [f"# Validation perplexity ({doc['profile']})", "",
           f"- data: `{doc['data']['prefix']}` ({doc['data']['documents']:,} documents, "
           f"{doc['data']['tokens']:,} tokens; input fingerprint {doc['data']['input_fingerprint'][:12]})",
           f"- windows of {doc['settings']['seq_length']} predicted tokens, at most "
           f"{doc['settings']['max_val_tokens'] or 'all'} tokens; transformers on {doc['device']}, {doc['dtype']}",
           "", "| model | tokens scored | mean NLL | perplexity | seconds | path |", "|---|---:|---:|---:|---:|---|"]
    for r in doc["results"]:
        out.append(f"| {r['label']} | {r['tokens']:,} | {r['mean_nll']:.4f} | {r['perplexity']:.3f} | "
                   f"{r['seconds']:.1f} | `{r['path']}` |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- the stage

def plan(cfg: Config, cuda: bool) -> dict:
    mpath = data_mod.out_dir(cfg) / data_mod.MANIFEST
    if not mpath.is_file():
        raise StageError(f"no data for profile {cfg.profile} ({mpath} missing): run `make data PROFILE={cfg.profile}`")
    try:
        manifest = data_mod.load_manifest(mpath)
    except data_mod.DataError as e:
        raise StageError(str(e)) from None
    val = manifest["megatron"]["validation"]
    models = hf_models(cfg.profile)
    device = "cuda" if cuda else "cpu"
    return {
        "format": FORMAT, "profile": cfg.profile, "device": device, "dtype": "bfloat16" if cuda else "float32",
        "settings": {"max_val_tokens": cfg["eval.max_val_tokens"], "seq_length": cfg["cpt.seq_length"]},
        "data": {"manifest": str(mpath), "manifest_sha256": sha256_file(mpath), "prefix": val["prefix_path"],
                 "documents": val["documents"], "tokens": val["tokens"],
                 "input_fingerprint": manifest["input_fingerprint"]},
        "models": [m.as_dict() for m in models],
    }


def plan_text(p: dict) -> str:
    s, d = p["settings"], p["data"]
    scored = min(s["max_val_tokens"] or d["tokens"], max(d["tokens"] - 1, 0))
    lines = [f"profile      {p['profile']}", f"method       transformers on {p['device']}, {p['dtype']}",
             f"data         {d['prefix']} ({d['documents']:,} documents, {d['tokens']:,} tokens)",
             f"scoring      up to {scored:,} tokens in windows of {s['seq_length']} (eval.max_val_tokens="
             f"{s['max_val_tokens']}, cpt.seq_length={s['seq_length']})", "models"]
    for m in p["models"]:
        lines += [f"  {m['label']:<5} {m['path']}", f"        from {m['run']}"]
    lines.append(f"output       {runs.runs_root() / p['profile']}/eval-<stamp>/eval.json, eval.md")
    return "\n".join(lines)


def evaluate(p: dict) -> dict:
    """Score every model of the plan; returns the eval document (eval.json)."""
    s, d = p["settings"], p["data"]
    total = min(s["max_val_tokens"] or d["tokens"], max(d["tokens"] - 1, 0))
    results = []
    for m in p["models"]:
        t0 = time.perf_counter()
        model, _ = load_hf(Path(m["path"]), p["device"])
        load_s = time.perf_counter() - t0
        log(f"eval {m['label']}: loaded {m['path']} in {load_s:.1f} s")
        got = score(model, token_windows(d["prefix"], s["seq_length"], s["max_val_tokens"]), s["seq_length"],
                    p["device"], progress=_progress(m["label"], total))
        del model
        if p["device"] == "cuda":
            import torch

            torch.cuda.empty_cache()
        results.append({**result_row(m["key"], m["label"], m["path"], got), "load_s": round(load_s, 3)})
    return {**{k: v for k, v in p.items() if k != "models"}, "models": p["models"], "results": results}


def eval_stage(cfg: Config, dry_run: bool) -> Path:
    """`make eval`: perplexity of base, CPT and LoRA on the validation split; eval.json + eval.md.

    Returns the run's COMPLETE.json (the dry run: its plan.json). Raises StageError / RunError naming the fix.
    """
    p = plan(cfg, cuda_available())
    key = {"models": {m["key"]: dir_identity(Path(m["path"])) for m in p["models"]},
           "data": p["data"]["input_fingerprint"], "settings": p["settings"], "dtype": p["dtype"], "format": FORMAT}
    inputs = {"models": {m["key"]: m["path"] for m in p["models"]}, "model_runs": {m["key"]: m["run"]
                                                                                   for m in p["models"]},
              "data_manifest": p["data"]["manifest"], "data_manifest_sha256": p["data"]["manifest_sha256"]}
    run, state = runs.open_run(cfg, "eval", key, inputs=inputs, dry_run=dry_run)
    if state == "done":
        log(f"up to date: {run.dir} (same models, data and settings; delete it to evaluate again)")
        doc = json.loads((run.dir / "eval.json").read_text(encoding="utf-8"))
        print(render_table(doc), flush=True)
        return run.dir / runs.MARKER
    if dry_run:
        text = plan_text(p)
        print(text)
        write_json_atomic(run.dir / "plan.json", p)
        write_text_atomic(run.dir / "plan.txt", text + "\n")
        return run.dir / "plan.json"

    doc = evaluate(p)
    write_json_atomic(run.dir / "eval.json", doc)
    write_text_atomic(run.dir / "eval.md", render_markdown(doc))
    print(render_table(doc), flush=True)
    run.mark_complete({"eval_json": "eval.json", "eval_md": "eval.md",
                       "perplexity": {r["key"]: r["perplexity"] for r in doc["results"]},
                       "mean_nll": {r["key"]: r["mean_nll"] for r in doc["results"]},
                       "tokens": doc["results"][0]["tokens"]})
    return run.dir / runs.MARKER
