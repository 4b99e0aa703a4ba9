"""The evaluation table: base vs CPT vs LoRA on validation perplexity and on the LoRA test set's answers.

    jacpt eval [--dry-run]   ->  runs/<profile>/eval-<stamp>/{eval.json, eval.md}, wandb/

Each model (base = the import's HF dir, CPT and LoRA = the export's; the same HF models as the CPU
demo) is loaded once with transformers, bf16 on CUDA (output layer and loss in fp32), fp32 on CPU,
and then:

1. **Perplexity.** The validation .bin/.idx (read with megatron-core's IndexedDataset, as training
   reads it) is one token stream: documents concatenated, each ending in the eos the data stage
   appended. The first `eval.max_val_tokens` predictions (0: all) are scored in windows of
   `cpt.seq_length` predicted tokens (seq_length + 1 tokens in, as a Megatron GPT sample),
   consecutive windows sharing one token, so every token after the first is predicted once, each
   window with no context from the one before.
2. **Answers.** The first `eval.max_examples` examples of the LoRA data's test.jsonl are answered,
   with the prompt LoRA training saw: NeMo's FineTuningDataModule builds each example with
   GPTSFTDataset's default template "{input} {output}", each field stripped of spaces; for the Qwen
   tokenizer (space-sensitive) that is context = tokens("input"), answer = tokens(" output"), with
   no BOS, no separator token and eos after the answer. So the prompt is `input` stripped of spaces,
   tokenised alone with no special tokens; the answer is the generated tokens up to the first eos
   (at most `eval.max_new_tokens`), decoded, surrounding whitespace (the template's space) stripped.
   Greedy decoding, the same for all three models; `eval.batch_size` prompts at a time, left-padded.
   The metrics (jacpt.metrics): exact match, chrF, BLEU (char tokens), Japanese-answer rate,
   repetition loops, answer length, latency per answer and generated tokens/s.

The table (one row per metric, one column per model) is printed, written to eval.json and eval.md,
logged to wandb (`wandb.mode`; offline without WANDB_API_KEY) as a wandb.Table with summary scalars,
and written as an "## Evaluation" section between markers into the exported models' README.md
(model cards), whose SHA256SUMS are then rewritten. The offline report reads eval.json.

eval.json (FORMAT 2):

    format, profile, device, dtype, started_utc
    settings     max_val_tokens, seq_length, max_examples, max_new_tokens, batch_size, ja_threshold,
                 repeat_unit, repeat_times
    decoding     greedy, template, prompt, answer, min_kana, bleu / chrf (sacrebleu signatures)
    data         manifest, manifest_sha256, prefix, documents, tokens, input_fingerprint,
                 test {path, sha256, examples (in the file), used}
    models       [{key, label, path, run}]
    metrics      [{key, label}]: the table's rows, in order
    results      one per model: key, label, path, load_s;
                 perplexity: tokens, mean_nll, perplexity, seconds, tokens_per_s (scoring);
                 answers: examples, exact_match, ja_rate, repeat_rate (fractions), chrf, bleu (0-100,
                 corpus-level), mean_chars, new_tokens, generate_s, latency_s (mean per answer; with
                 batches an answer's latency is its batch's), gen_tokens_per_s
    reference    examples, ja_rate, repeat_rate, mean_chars of the references themselves
    examples     [{id (line in test.jsonl), input, reference, answers {model key: {text, new_tokens,
                 latency_s, chars, ja_share, kana, japanese, loop, repeat, exact, chrf, bleu}}}]

A run is skipped ("up to date") when a complete one has the same key: the three model
directories' identity (path, file names, sizes, mtimes; README.md and SHA256SUMS left out, since
this stage writes them), the data manifest's input fingerprint, the test file's sha256, the eval
settings and the wandb mode.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from jacpt import log
from jacpt import data as data_mod
from jacpt import lora_data, metrics, runs
from jacpt.config import Config
from jacpt.fsutil import sha256_file, write_json_atomic, write_text_atomic
from jacpt.generate import Answer, cuda_available, generation_kwargs, hf_models, load_hf, printable
from jacpt.train import StageError

if TYPE_CHECKING:
    import numpy

FORMAT = 2
# Tokens per forward pass (windows x seq_length) and per output-layer chunk. They bound memory: the
# logits of a chunk take chunk x 151,936 x 4 bytes (2048 tokens: 1.2 GB on the GPU; 512: 311 MB on CPU).
BATCH_TOKENS = {"cuda": 16384, "cpu": 4096}
CHUNK_TOKENS = {"cuda": 2048, "cpu": 512}
SETTINGS = ("max_val_tokens", "max_examples", "max_new_tokens", "batch_size", "ja_threshold", "repeat_unit",
            "repeat_times")
TEMPLATE = "{input} {output}"  # GPTSFTDataset's default prompt_template, which FineTuningDataModule keeps
WRITTEN_HERE = ("README.md", "SHA256SUMS")  # files of an exported model dir this stage rewrites
CARD_BEGIN = "<!-- jacpt eval: begin (written by `jacpt eval`, replaced by the next one) -->"
CARD_END = "<!-- jacpt eval: end -->"


def dir_identity(d: Path) -> dict:
    """What identifies a model directory without reading gigabytes: its path and each file's size and mtime.

    The model card and the checksum file are left out: `jacpt eval` itself rewrites them.
    """
    d = d.resolve()
    return {"path": str(d), "files": {str(p.relative_to(d)): [p.stat().st_size, p.stat().st_mtime_ns]
                                      for p in sorted(d.rglob("*"))
                                      if p.is_file() and str(p.relative_to(d)) not in WRITTEN_HERE}}


# ----------------------------------------------------------------------------- tokens

def token_windows(prefix: str | Path, seq_length: int, limit: int = 0) -> Iterator["numpy.ndarray"]:
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


# ----------------------------------------------------------------------------- the test set

def lora_test_set(manifest: dict, profile: str) -> dict:
    """The LoRA test file the data stage wrote: path, sha256 and example count; StageError naming the fix."""
    path = Path(manifest["lora"]["dir_path"]) / "test.jsonl"
    if not path.is_file():
        raise StageError(f"no LoRA test set {path}: the data stage writes it; run `make data PROFILE={profile}`")
    try:
        n = lora_data.validate_file(path)
    except lora_data.LoraDataError as e:
        raise StageError(f"{e}; then run `make data PROFILE={profile}` again") from None
    return {"path": str(path), "sha256": sha256_file(path), "examples": n}


def read_examples(path: str | Path, limit: int) -> list[dict]:
    """The first `limit` examples (0: all) as {id: line number, input: the prompt, reference}, stripped of
    spaces as GPTSFTDataset strips them (`lora_test_set` has validated the file)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit and len(out) >= limit:
                break
            rec = json.loads(line)
            out.append({"id": lineno, "input": rec["input"].strip(" "), "reference": rec["output"].strip(" ")})
    return out


# ----------------------------------------------------------------------------- answers

def generate_answers(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int, device: str,
                     label: str = "") -> tuple[list[Answer], float]:
    """Greedy answers, `batch_size` prompts at a time (left-padded), each cut at its first eos; and the
    seconds spent generating. An answer's latency is its batch's wall time (batch_size 1: its own).

    In fp32 a batched answer equals the one-at-a-time answer (a test holds it to that); in bf16 on a GPU
    it can drift after some tokens, as padding changes the rounding (seen on an H100 with a random
    Qwen2.5-0.5B-shaped model after 100-700 characters). Every model gets the same batches.
    """
    import torch
    from transformers import GenerationConfig

    eos = tok.eos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # every row then continues right after its own last prompt token
    gc = GenerationConfig(do_sample=False, **generation_kwargs(model, tok, max_new_tokens))
    if prompts:
        # One untimed 2-token call first: the first generate pays for kernel loading and, on a GPU, cuBLAS
        # set-up (5.7 s against 0.1 s for the tiny model on an H100), which would land on the first model.
        with torch.inference_mode():
            model.generate(**tok(prompts[:1], return_tensors="pt", add_special_tokens=False).to(device),
                           generation_config=GenerationConfig(do_sample=False, **generation_kwargs(model, tok, 2)))
        if device == "cuda":
            torch.cuda.synchronize()
    out: list[Answer] = []
    total = 0.0
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i:i + batch_size], return_tensors="pt", add_special_tokens=False, padding=True).to(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            ids = model.generate(**enc, generation_config=gc)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        total += dt
        for row in ids[:, enc["input_ids"].shape[1]:].tolist():
            if eos in row:
                row = row[:row.index(eos)]
            out.append(Answer(tok.decode(row, skip_special_tokens=True).strip(), len(row), dt))
        log(f"eval {label}: {len(out)}/{len(prompts)} answers, {total:.1f} s")
    return out, total


def answers_row(answers: list[Answer], gen_s: float, refs: list[str], s: dict) -> dict:
    """One model's answer metrics, for its results row."""
    n, new = len(answers), sum(a.new_tokens for a in answers)
    return {**metrics.summarize([a.text for a in answers], refs, s["ja_threshold"], s["repeat_unit"],
                                s["repeat_times"]),
            "new_tokens": new, "generate_s": round(gen_s, 3),
            "latency_s": round(sum(a.latency_s for a in answers) / n, 4) if n else None,
            "gen_tokens_per_s": round(new / gen_s, 2) if gen_s > 0 else None}


def answer_records(examples: list[dict], answers: dict[str, list[Answer]], s: dict) -> list[dict]:
    """Per-example records: the prompt, the reference and each model's answer with its metrics."""
    out = []
    for i, ex in enumerate(examples):
        rec = {"id": ex["id"], "input": ex["input"], "reference": ex["reference"], "answers": {}}
        for key, got in answers.items():
            a = got[i]
            rec["answers"][key] = {"text": a.text, "new_tokens": a.new_tokens, "latency_s": round(a.latency_s, 4),
                                   **metrics.answer_record(a.text, ex["reference"], s["ja_threshold"],
                                                           s["repeat_unit"], s["repeat_times"])}
        out.append(rec)
    return out


# ----------------------------------------------------------------------------- tables

def render_table(doc: dict) -> str:
    """The console table: one row per metric, one column per model, then the definitions."""
    head = f"eval ({doc['profile']}): base vs CPT vs LoRA"
    notes = [textwrap.fill(x, width=100, initial_indent="  ", subsequent_indent="      ", break_on_hyphens=False)
             for x in metrics.definitions(doc)]
    return "\n".join([head, metrics.text_table(*metrics.table(doc)), ""] + notes)


def _md(s) -> str:
    return printable(str(s)).replace("|", "\\|").replace("\n", "<br>")


def render_markdown(doc: dict) -> str:
    d = doc["data"]
    out = [f"# Evaluation: base vs CPT vs LoRA ({doc['profile']})", "",
           f"- data: `{d['prefix']}` ({d['documents']:,} documents, {d['tokens']:,} tokens; input fingerprint "
           f"{d['input_fingerprint'][:12]}); test set `{d['test']['path']}`",
           f"- transformers on {doc['device']}, {doc['dtype']}; started {doc['started_utc']}", "",
           *metrics.markdown_table(*metrics.table(doc)), ""]
    out += [f"- {_md(x)}" for x in metrics.definitions(doc)]
    out += ["", "## Perplexity", "", "| model | tokens scored | mean NLL | perplexity | seconds | path |",
            "|---|---:|---:|---:|---:|---|"]
    for r in doc["results"]:
        out.append(f"| {r['label']} | {r['tokens']:,} | {r['mean_nll']:.4f} | {r['perplexity']:.3f} | "
                   f"{r['seconds']:.1f} | `{r['path']}` |")
    models = doc["models"]
    out += ["", "## Answers", "", "Each answer: its text, then [characters · Japanese or not · loop · chrF].", "",
            "| id | reference | " + " | ".join(m["label"] for m in models) + " |",
            "|---:|---|" + "---|" * len(models)]
    for ex in doc["examples"]:
        cells = []
        for m in models:
            a = ex["answers"][m["key"]]
            cells.append(f"{_md(a['text'])}<br><sub>[{a['chars']} chars · {'ja' if a['japanese'] else 'not ja'} · "
                         f"{'loop' if a['repeat'] else 'no loop'} · chrF {a['chrf']:.1f}]</sub>")
        out.append(f"| {ex['id']} | {_md(ex['reference'])} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- model cards

def card_section(doc: dict, run_dir: Path, labels: list[str]) -> str:
    """The model card's "## Evaluation" section, between the markers."""
    lines = [CARD_BEGIN, "## Evaluation", "",
             f"This model is the {' and '.join(labels)} column. Measured by `jacpt eval` (profile `{doc['profile']}`, "
             f"run `{run_dir}`, started {doc['started_utc']}); per-example answers are in its `eval.json`.", "",
             *metrics.markdown_table(*metrics.table(doc)), ""]
    lines += [f"- {_md(x)}" for x in metrics.definitions(doc)]
    return "\n".join(lines + [CARD_END]) + "\n"


def with_section(card: str, section: str) -> str:
    """`card` with its marked section replaced by `section`, or with `section` appended."""
    b, e = card.find(CARD_BEGIN), card.find(CARD_END)
    if b >= 0 and e > b:
        return card[:b] + section + card[e + len(CARD_END):].lstrip("\n")
    return card.rstrip("\n") + "\n\n" + section if card.strip() else section


def update_cards(doc: dict, run_dir: Path) -> dict[str, str]:
    """Write the evaluation into the exported models' README.md (atomically) and rewrite their SHA256SUMS.

    The base model's directory is not ours to change. Returns {model dir: "written" | "unchanged" | error}.
    """
    from jacpt.export import write_sums

    dirs: dict[str, list[str]] = {}
    for m in doc["models"]:
        if m["key"] != "base":
            dirs.setdefault(m["path"], []).append(m["label"])
    done = {}
    for path, labels in dirs.items():
        card = Path(path) / "README.md"
        try:
            old = card.read_text(encoding="utf-8") if card.is_file() else ""
            new = with_section(old, card_section(doc, run_dir, labels))
            if new == old:
                done[path] = "unchanged"
                continue
            write_text_atomic(card, new)
            write_sums(Path(path))
            done[path] = "written"
        except OSError as e:
            log(f"warning: could not write the evaluation into {card} ({e}); the table is in {run_dir / 'eval.md'}")
            done[path] = f"error: {e}"
    return done


# ----------------------------------------------------------------------------- wandb

def wandb_mode(cfg: Config) -> str:
    mode = cfg["wandb.mode"]
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


def log_wandb(cfg: Config, run_dir: Path, doc: dict) -> str:
    """The table as a wandb.Table, the answers as another, each model's metrics as summary scalars.

    Returns the mode used, or "failed: ..." (a wandb failure is reported, not fatal: eval.json has it all).
    """
    mode = wandb_mode(cfg)
    if mode == "disabled":
        return mode
    try:
        import wandb

        (run_dir / "wandb").mkdir(exist_ok=True)
        tags = ["eval", cfg.profile] + [t.strip() for t in cfg["wandb.tags"].split(",") if t.strip()]
        run = wandb.init(project=cfg["wandb.project"], entity=cfg["wandb.entity"] or None, job_type="eval",
                         name=f"eval-{run_dir.name}", dir=str(run_dir / "wandb"), mode=mode, tags=tags,
                         config={"settings": doc["settings"], "decoding": doc["decoding"],
                                 "models": {m["key"]: m["path"] for m in doc["models"]}},
                         settings=wandb.Settings(console="off", quiet=True))
        header, rows = metrics.table(doc)
        models = doc["models"]
        answers = wandb.Table(columns=["id", "input", "reference"] + [m["label"] for m in models],
                              data=[[ex["id"], ex["input"], ex["reference"]]
                                    + [ex["answers"][m["key"]]["text"] for m in models] for ex in doc["examples"]])
        run.log({"eval/table": wandb.Table(columns=header, data=rows), "eval/answers": answers})
        for r in doc["results"]:
            for key, _, _ in metrics.ROWS:
                if isinstance(r.get(key), (int, float)):
                    run.summary[f"{r['key']}/{key}"] = r[key]
        where = run.dir
        run.finish()
    except Exception as e:  # noqa: BLE001 (wandb raises many kinds; none should lose a finished eval)
        log(f"warning: wandb logging failed ({type(e).__name__}: {e}); the results are in {run_dir / 'eval.json'}")
        return f"failed: {type(e).__name__}: {e}"
    log(f"wandb ({mode}): {where}" + ("; `wandb sync` that directory's parent to upload it" if mode == "offline"
                                      else ""))
    return mode


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
    test = lora_test_set(manifest, cfg.profile)
    models = hf_models(cfg.profile)
    device = "cuda" if cuda else "cpu"
    s = {k: cfg[f"eval.{k}"] for k in SETTINGS}
    s["seq_length"] = cfg["cpt.seq_length"]
    used = min(s["max_examples"] or test["examples"], test["examples"])
    return {
        "format": FORMAT, "profile": cfg.profile, "device": device, "dtype": "bfloat16" if cuda else "float32",
        "settings": s,
        "decoding": {"greedy": True, "template": TEMPLATE, "prompt": "input stripped of spaces, no BOS",
                     "answer": "new tokens up to the first eos, decoded, whitespace stripped",
                     "min_kana": metrics.MIN_KANA, **metrics.signatures()},
        "data": {"manifest": str(mpath), "manifest_sha256": sha256_file(mpath), "prefix": val["prefix_path"],
                 "documents": val["documents"], "tokens": val["tokens"],
                 "input_fingerprint": manifest["input_fingerprint"], "test": {**test, "used": used}},
        "models": [m.as_dict() for m in models],
    }


def plan_text(p: dict) -> str:
    s, d = p["settings"], p["data"]
    scored = min(s["max_val_tokens"] or d["tokens"], max(d["tokens"] - 1, 0))
    lines = [f"profile      {p['profile']}", f"method       transformers on {p['device']}, {p['dtype']}",
             f"data         {d['prefix']} ({d['documents']:,} documents, {d['tokens']:,} tokens)",
             f"scoring      up to {scored:,} tokens in windows of {s['seq_length']} (eval.max_val_tokens="
             f"{s['max_val_tokens']}, cpt.seq_length={s['seq_length']})",
             f"answers      {d['test']['used']} of {d['test']['examples']} examples of {d['test']['path']} "
             f"(eval.max_examples={s['max_examples']}), greedy, at most {s['max_new_tokens']} new tokens, "
             f"batches of {s['batch_size']}",
             f"metrics      exact match, chrF, BLEU (char), Japanese answers (share >= {s['ja_threshold']} and kana), "
             f"loops (unit >= {s['repeat_unit']} x {s['repeat_times']}), length, latency, tokens/s", "models"]
    for m in p["models"]:
        lines += [f"  {m['label']:<5} {m['path']}", f"        from {m['run']}"]
    lines.append(f"output       {runs.runs_root() / p['profile']}/eval-<stamp>/eval.json, eval.md; "
                 "an Evaluation section in the CPT and LoRA model cards")
    return "\n".join(lines)


def evaluate(p: dict) -> dict:
    """Score and question every model of the plan; returns the eval document (eval.json)."""
    s, d = p["settings"], p["data"]
    total = min(s["max_val_tokens"] or d["tokens"], max(d["tokens"] - 1, 0))
    examples = read_examples(d["test"]["path"], s["max_examples"])
    prompts, refs = [ex["input"] for ex in examples], [ex["reference"] for ex in examples]
    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    results, answers = [], {}
    for m in p["models"]:
        t0 = time.perf_counter()
        model, tok = load_hf(Path(m["path"]), p["device"])
        load_s = time.perf_counter() - t0
        log(f"eval {m['label']}: loaded {m['path']} in {load_s:.1f} s")
        got = score(model, token_windows(d["prefix"], s["seq_length"], s["max_val_tokens"]), s["seq_length"],
                    p["device"], progress=_progress(m["label"], total))
        answers[m["key"]], gen_s = generate_answers(model, tok, prompts, s["max_new_tokens"], s["batch_size"],
                                                    p["device"], m["label"])
        del model
        if p["device"] == "cuda":
            import torch

            torch.cuda.empty_cache()
        results.append({**result_row(m["key"], m["label"], m["path"], got), "load_s": round(load_s, 3),
                        **answers_row(answers[m["key"]], gen_s, refs, s)})
    reference = {"examples": len(refs), **metrics.text_stats(refs, s["ja_threshold"], s["repeat_unit"],
                                                            s["repeat_times"])}
    return {**{k: v for k, v in p.items() if k != "models"}, "started_utc": started, "models": p["models"],
            "metrics": [{"key": k, "label": label} for k, label, _ in metrics.ROWS], "results": results,
            "reference": reference, "examples": answer_records(examples, answers, s)}


def eval_stage(cfg: Config, dry_run: bool) -> Path:
    """`make eval`: base vs CPT vs LoRA on perplexity and the LoRA test set; eval.json + eval.md, wandb, cards.

    Returns the run's COMPLETE.json (the dry run: its plan.json). Raises StageError / RunError naming the fix.
    """
    p = plan(cfg, cuda_available())
    key = {"models": {m["key"]: dir_identity(Path(m["path"])) for m in p["models"]},
           "data": p["data"]["input_fingerprint"], "test": p["data"]["test"]["sha256"], "settings": p["settings"],
           "dtype": p["dtype"], "wandb": cfg["wandb.mode"], "format": FORMAT}
    inputs = {"models": {m["key"]: m["path"] for m in p["models"]}, "model_runs": {m["key"]: m["run"]
                                                                                   for m in p["models"]},
              "data_manifest": p["data"]["manifest"], "data_manifest_sha256": p["data"]["manifest_sha256"],
              "test_file": p["data"]["test"]["path"], "test_sha256": p["data"]["test"]["sha256"]}
    run, state = runs.open_run(cfg, "eval", key, inputs=inputs, dry_run=dry_run)
    if state == "done":
        log(f"up to date: {run.dir} (same models, data and settings; delete it to evaluate again)")
        doc = json.loads((run.dir / "eval.json").read_text(encoding="utf-8"))
        update_cards(doc, run.dir)  # a no-op unless a card lost its section
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
    cards = update_cards(doc, run.dir)
    mode = log_wandb(cfg, run.dir, doc)
    run.mark_complete({"eval_json": "eval.json", "eval_md": "eval.md",
                       "perplexity": {r["key"]: r["perplexity"] for r in doc["results"]},
                       "mean_nll": {r["key"]: r["mean_nll"] for r in doc["results"]},
                       "tokens": doc["results"][0]["tokens"], "examples": len(doc["examples"]),
                       "metrics": {r["key"]: {k: r.get(k) for k, _, _ in metrics.ROWS} for r in doc["results"]},
                       "model_cards": cards, "wandb": mode})
    return run.dir / runs.MARKER
