"""`jacpt report`: an offline HTML + Markdown report of the last good runs, the backup if the GPU or wandb fails.

    jacpt report [--dry-run]   ->  runs/<profile>/report-<stamp>/{report.html, report.md, loss.png, lr.png}

From the newest complete run of each stage (`runs.latest_complete`):

    cpt, lora   metrics.jsonl -> loss.png (train loss, val loss markers), lr.png, step time, tokens/s, peak memory
    eval        eval.json     -> the evaluation table (jacpt.metrics.table: one row per metric, base / CPT /
                                 LoRA columns), the perplexity detail, every test answer with its metrics
    demo        demo.json     -> the generations side by side, load time and tokens/s
    export      COMPLETE.json -> the hand-off manifest: model dirs, sha256 of every file (each model dir's
                                 SHA256SUMS as it is now, since `jacpt eval` adds to the model cards), config fixes

Missing pieces are not fatal: their section says which `make` target makes them. Only a missing CPT
run is (StageError): there is nothing to report before the chain has run. The HTML has no external
CSS, JS, fonts or links; the images are PNG files beside it, so it opens with no GPU and no network.
Every text is HTML-escaped (generated text may contain anything).
"""

from __future__ import annotations

import html
import json
import re
import secrets
import statistics
from datetime import datetime, timezone
from pathlib import Path

from jacpt import log
from jacpt import metrics, runs
from jacpt.config import Config
from jacpt.fsutil import atomic_path, write_json_atomic, write_text_atomic
from jacpt.train import StageError

FORMAT = 1
STAGES = ("cpt", "lora", "eval", "demo", "export")  # the runs a report reads, in section order
TRAIN_STAGES = (("cpt", "CPT"), ("lora", "LoRA"))
IMAGES = ("loss.png", "lr.png")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # C0 controls but \t and \n: not valid in HTML text



def missing_text(stage: str, profile: str) -> str:
    return f"no complete {stage} run: run make {stage} PROFILE={profile}"


# ----------------------------------------------------------------------------- reading the runs

def find_runs(profile: str) -> dict[str, runs.Run | None]:
    """The newest complete run of each stage (None where there is none); StageError without a CPT run."""
    found: dict[str, runs.Run | None] = {}
    for stage in STAGES:
        try:
            found[stage] = runs.latest_complete(profile, stage)
        except runs.RunError:
            found[stage] = None
    if found["cpt"] is None:
        raise StageError(f"no complete cpt run for profile {profile} under {runs.runs_root() / profile}: nothing to "
                         f"report yet; run the chain first (`make quickstart`, or `make data import cpt lora export "
                         f"demo eval PROFILE={profile}`)")
    return found


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(per-step records, per-validation records) of a metrics.jsonl; a torn last line is skipped."""
    steps, vals = [], []
    if not path.is_file():
        return steps, vals
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or "step" not in rec:
            continue
        if "val_loss" in rec:
            vals.append(rec)
        elif rec.get("loss") is not None:
            steps.append(rec)
    return steps, vals


def train_summary(run: runs.Run, steps: list[dict], vals: list[dict]) -> dict:
    """Step time (median of consecutive steps, so validation and checkpoint pauses don't count), tokens/s,
    peak memory and the losses of one training run."""
    out = run.outputs()
    dts = [b["t"] - a["t"] for a, b in zip(steps, steps[1:])
           if b["step"] == a["step"] + 1 and "t" in a and "t" in b and b["t"] > a["t"]]
    step_s = statistics.median(dts) if dts else None
    tokens_per_step = out["tokens"] / out["steps"] if out.get("tokens") and out.get("steps") else None
    mems = [r["mem_gib"] for r in steps if r.get("mem_gib") is not None]
    return {
        "steps": out.get("steps"), "tokens": out.get("tokens"), "steps_logged": len(steps),
        "first_loss": steps[0]["loss"] if steps else out.get("first_loss"),
        "last_loss": steps[-1]["loss"] if steps else out.get("last_loss"),
        "val_loss": vals[-1]["val_loss"] if vals else out.get("val_loss"),
        "step_s": step_s, "tokens_per_s": tokens_per_step / step_s if step_s and tokens_per_step else None,
        "wall_s": steps[-1].get("t") if steps else None, "peak_mem_gib": max(mems) if mems else None,
    }


def read_json(run: runs.Run, key: str, default: str) -> dict:
    """The JSON file a run's COMPLETE.json names under `key`."""
    path = run.dir / run.outputs().get(key, default)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise StageError(f"cannot read {path} ({e}): the {run.stage} run at {run.dir} is damaged; "
                         f"run `make {run.stage}` again") from None


def stale_note(run: runs.Run, found: dict) -> str | None:
    """A warning when an eval/demo run used models from runs other than the ones this report shows."""
    used = {str(r.dir) for r in (found["cpt"], found["lora"], found["export"]) if r is not None}
    model_runs = (run.info().get("inputs") or {}).get("model_runs") or {}
    other = sorted({v for k, v in model_runs.items() if k != "base" and v not in used})
    if other:
        return (f"its CPT/LoRA models came from {', '.join(other)}, not from the runs above: "
                f"run make {run.stage} again for the current models")
    return None


def current_sums(run: runs.Run) -> dict:
    """The export's COMPLETE.json with each model's sha256 table read from its SHA256SUMS where that exists:
    `jacpt eval` writes an Evaluation section into the model cards and rewrites SHA256SUMS after the export."""
    out = run.outputs()
    sums = dict(out.get("sha256") or {})
    for kind, rel in (out.get("models") or {}).items():
        path = run.dir / rel / "SHA256SUMS"
        if path.is_file():
            lines = [ln.split("  ", 1) for ln in path.read_text(encoding="utf-8").splitlines() if "  " in ln]
            sums[kind] = {name: digest for digest, name in lines}
    return {**out, "sha256": sums}


def collect(cfg: Config, found: dict) -> dict:
    """Everything the report shows, as plain data (also saved as report.json)."""
    doc: dict = {"format": FORMAT, "profile": cfg.profile,
                 "generated_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                 "runs": {s: (str(r.dir) if r else None) for s, r in found.items()},
                 "finished": {s: r.outputs().get("finished_utc") for s, r in found.items() if r},
                 "missing": [s for s, r in found.items() if r is None], "train": {}, "notes": {}}
    for stage, _ in TRAIN_STAGES:
        run = found[stage]
        if run is None:
            continue
        steps, vals = read_metrics(run.dir / "metrics.jsonl")
        doc["train"][stage] = {"summary": train_summary(run, steps, vals), "steps": steps, "vals": vals}
        if not steps:
            doc["notes"][stage] = f"{run.dir / 'metrics.jsonl'} is missing or empty: no curves for this run"
    doc["eval"] = read_json(found["eval"], "eval_json", "eval.json") if found["eval"] else None
    doc["demo"] = read_json(found["demo"], "demo_json", "demo.json") if found["demo"] else None
    doc["export"] = current_sums(found["export"]) if found["export"] else None
    for stage in ("eval", "demo"):
        if found[stage] is not None and (note := stale_note(found[stage], found)):
            doc["notes"][stage] = note
    return doc


# ----------------------------------------------------------------------------- the plots

def _ema(ys: list[float], span: int) -> list[float]:
    a, out, m = 2 / (span + 1), [], None
    for y in ys:
        m = y if m is None else a * y + (1 - a) * m
        out.append(m)
    return out


def plot(doc: dict, what: str, dest: Path) -> None:
    """loss.png or lr.png: one panel per training stage. Matplotlib's Agg canvas, no pyplot (no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stages = [(s, label) for s, label in TRAIN_STAGES if s in doc["train"]]
    fig = Figure(figsize=(5.5 * len(stages), 4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(stages), squeeze=False)[0]
    for ax, (stage, label) in zip(axes, stages):
        steps, vals = doc["train"][stage]["steps"], doc["train"][stage]["vals"]
        if what == "loss":
            xs, ys = [r["step"] for r in steps], [r["loss"] for r in steps]
            if len(xs) > 50:  # long runs: the raw loss faint, a moving average on top
                ax.plot(xs, ys, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss")
                ax.plot(xs, _ema(ys, max(5, len(xs) // 50)), color="tab:blue", linewidth=1.6,
                        label="train loss (EMA)")
            else:
                ax.plot(xs, ys, color="tab:blue", linewidth=1.6, marker=".", label="train loss")
            if vals:
                ax.plot([r["step"] for r in vals], [r["val_loss"] for r in vals], linestyle="none", marker="o",
                        markersize=7, color="tab:orange", label="val loss")
            ax.set_ylabel("loss (nats/token)")
            ax.set_title(f"{label}: loss")
        else:
            pts = [(r["step"], r["lr"]) for r in steps if r.get("lr") is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:green", linewidth=1.6, label="learning rate")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
            if pts:
                ax.set_ylim(bottom=0)  # from 0: a warmup that starts near 0 should look like one
            ax.set_ylabel("learning rate")
            ax.set_title(f"{label}: learning rate")
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
        if ax.has_data():
            ax.legend(loc="best")
        else:
            ax.text(0.5, 0.5, "no data in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png")


# ----------------------------------------------------------------------------- formatting

def _num(v, fmt: str, none: str = "n/a") -> str:
    return none if v is None else format(v, fmt)


def clean(s) -> str:
    return _CONTROL.sub("\ufffd", str(s))


def train_rows(doc: dict) -> list[list[str]]:
    rows = []
    for stage, label in TRAIN_STAGES:
        if stage not in doc["train"]:
            continue
        s = doc["train"][stage]["summary"]
        rows.append([label, _num(s["steps"], ","), _num(s["tokens"], ","), _num(s["first_loss"], ".4f"),
                     _num(s["last_loss"], ".4f"), _num(s["val_loss"], ".4f"), _num(s["step_s"], ".3f"),
                     _num(s["tokens_per_s"], ",.0f"), _num(s["peak_mem_gib"], ".2f", "n/a (no CUDA)"),
                     _num(s["wall_s"], ",.1f")])
    return rows


TRAIN_HEADER = ["stage", "steps", "tokens", "first loss", "last loss", "val loss", "step s (median)", "tokens/s",
                "peak GiB", "wall s"]
EVAL_HEADER = ["model", "tokens scored", "mean NLL", "perplexity", "seconds", "tokens/s"]


def eval_rows(ev: dict) -> list[list[str]]:
    return [[r["label"], _num(r["tokens"], ","), _num(r["mean_nll"], ".4f"), _num(r["perplexity"], ".3f"),
             _num(r.get("seconds"), ".1f"), _num(r.get("tokens_per_s"), ",.0f")] for r in ev["results"]]


OLD_EVAL = "this eval run has perplexity only (eval.json format 1): run make eval again for the answer metrics"


def eval_answer_stats(a: dict) -> str:
    return (f"{a['chars']} chars · {'Japanese' if a['japanese'] else 'not Japanese'} · "
            f"{'loop' if a['repeat'] else 'no loop'} · {'exact' if a['exact'] else 'not exact'} · "
            f"chrF {a['chrf']:.1f} · BLEU {a['bleu']:.1f} · {a['new_tokens']} tok · {a['latency_s']:.2f} s")


def demo_settings(demo: dict) -> str:
    s = demo["settings"]
    sampling = f"temperature={s['temperature']}, top_p={s['top_p']}, seed={s['seed']}"
    return f"max_new_tokens={s['max_new_tokens']}, " + ("greedy" if s.get("greedy") else sampling)


DEMO_MODEL_HEADER = ["model", "dtype", "load s", "answer tokens", "generate s", "tokens/s"]


def demo_model_rows(demo: dict) -> list[list[str]]:
    return [[m["label"], str(m.get("dtype", "")), _num(m.get("load_s"), ".2f"), _num(m.get("new_tokens"), ","),
             _num(m.get("generate_s"), ".2f"), _num(m.get("tokens_per_s"), ".1f")] for m in demo["models"]]


def answer_stats(a: dict) -> str:
    return f"{a['new_tokens']} tok · {a['latency_s']:.2f} s · {_num(a.get('tokens_per_s'), '.1f', '-')} tok/s"


def fix_rows(exp: dict) -> list[list[str]]:
    rows = []
    for kind, fixes in (exp.get("config_fixes") or {}).items():
        for k, v in fixes.items():
            old, new = v if isinstance(v, list) and len(v) == 2 else (None, v)
            rows.append([kind, k, json.dumps(old), json.dumps(new)])
    return rows


def sha_rows(exp: dict) -> list[list[str]]:
    return [[kind, name, h] for kind, files in (exp.get("sha256") or {}).items() for name, h in files.items()]


# ----------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", "Noto Sans", "Noto Sans CJK JP", "Hiragino Sans",
       "Yu Gothic", Meiryo, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #1a1a1a;
       line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.6em 0; } th, td { border: 1px solid #ccc; padding: 4px 8px;
       vertical-align: top; text-align: left; } th { background: #f2f2f2; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
td.gen { white-space: pre-wrap; overflow-wrap: anywhere; min-width: 14em; }
.stats { color: #666; font-size: 0.85em; white-space: nowrap; }
.missing { background: #fff4e5; border-left: 4px solid #f0a030; padding: 0.5em 0.8em; }
.note { color: #8a5a00; } code, .mono { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace;
       font-size: 0.9em; overflow-wrap: anywhere; }
img { max-width: 100%; border: 1px solid #ddd; }
"""


def _e(s) -> str:
    return html.escape(clean(s), quote=True)


def _gen_cell(text: str, stats: str | None = None) -> str:
    extra = f'\n<span class="stats">[{_e(stats)}]</span>' if stats is not None else ""
    return f'<td class="gen" lang="ja">{_e(text)}{extra}</td>'


def _answers_table(lead: list[str], models: list[dict], stats, rows: list[tuple[list[str], dict]]) -> str:
    """Answers side by side: the lead cells of each row, then each model's answer with its stats."""
    head = "".join(f"<th>{_e(h)}</th>" for h in lead + [m["label"] for m in models])
    body = "".join("<tr>" + "".join(cells) + "".join(_gen_cell(answers[m["key"]]["text"], stats(answers[m["key"]]))
                                                     for m in models) + "</tr>" for cells, answers in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset(), mono: set[int] = frozenset(),
           ) -> str:
    def td(i: int, c: str) -> str:
        cls = "n" if i in numeric else ("mono" if i in mono else "")
        return f'<td class="{cls}">{_e(c)}</td>' if cls else f"<td>{_e(c)}</td>"
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(td(i, c) for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _missing(text: str) -> str:
    return f'<p class="missing">{_e(text)}</p>'


def render_html(doc: dict) -> str:
    p = doc["profile"]
    out = [f"<h1>jacpt report: {_e(p)}</h1>",
           f"<p>generated {_e(doc['generated_utc'])} from the newest complete run of each stage. "
           "Offline: no external resources; the images are the PNG files beside this page.</p>",
           "<h2>Runs used</h2>",
           _table(["stage", "run", "finished (UTC)"],
                  [[s, doc["runs"][s] or "(none)", doc["finished"].get(s, "")] for s in STAGES], mono={1})]

    out.append("<h2>Training curves</h2>")
    for stage, _ in TRAIN_STAGES:
        if stage not in doc["train"]:
            out.append(_missing(missing_text(stage, p)))
        elif stage in doc["notes"]:
            out.append(f'<p class="note">{_e(doc["notes"][stage])}</p>')
    out.append('<p><img src="loss.png" alt="training loss and validation loss per optimizer step"></p>')
    out.append('<p><img src="lr.png" alt="learning rate per optimizer step"></p>')

    out.append("<h2>Evaluation: base vs CPT vs LoRA</h2>")
    ev = doc["eval"]
    if ev is None:
        out.append(_missing(missing_text("eval", p)))
    else:
        if "eval" in doc["notes"]:
            out.append(f'<p class="note">{_e(doc["notes"]["eval"])}</p>')
        header, rows = metrics.table(ev)
        out.append(_table(header, rows, numeric=set(range(1, len(header)))))
        out.append("<ul>" + "".join(f"<li>{_e(x)}</li>" for x in metrics.definitions(ev)) + "</ul>")
        if "examples" not in ev:
            out.append(_missing(OLD_EVAL))
        out.append("<h3>Validation perplexity</h3>")
        out.append(f"<p>{_e(ev['data']['prefix'])}: windows of {_e(ev['settings']['seq_length'])} tokens, "
                   f"transformers on {_e(ev['device'])}, {_e(ev['dtype'])}</p>")
        out.append(_table(EVAL_HEADER, eval_rows(ev), numeric={1, 2, 3, 4, 5}))
        if ev.get("examples"):
            out.append("<h3>Answers on the LoRA test set</h3>")
            out.append(_answers_table(
                ["id", "prompt", "reference"], ev["models"], eval_answer_stats,
                [([f'<td class="n">{_e(ex["id"])}</td>', _gen_cell(ex["input"]), _gen_cell(ex["reference"])],
                  ex["answers"]) for ex in ev["examples"]]))

    out.append("<h2>Generations</h2>")
    demo = doc["demo"]
    if demo is None:
        out.append(_missing(missing_text("demo", p)))
    else:
        out.append(f"<p>{_e(demo['method'])}; {_e(demo_settings(demo))}</p>")
        if demo.get("note"):
            out.append(f"<p>{_e(demo['note'])}</p>")
        if "demo" in doc["notes"]:
            out.append(f'<p class="note">{_e(doc["notes"]["demo"])}</p>')
        out.append(_answers_table(["prompt"], demo["models"], answer_stats,
                                  [([_gen_cell(r["prompt"])], r["answers"]) for r in demo["results"]]))

    out.append("<h2>Throughput and memory</h2>")
    out.append("<p>Training: step time is the median of consecutive steps (validation and checkpoint pauses "
               "excluded); tokens/s = tokens per step / step time; peak GiB = torch.cuda.max_memory_allocated.</p>")
    out.append(_table(TRAIN_HEADER, train_rows(doc), numeric=set(range(1, 10))))
    if demo is not None:
        out.append("<p>Generation (demo):</p>")
        out.append(_table(DEMO_MODEL_HEADER, demo_model_rows(demo), numeric={2, 3, 4, 5}))
    else:
        out.append(_missing(missing_text("demo", p)))

    out.append("<h2>Hand-off manifest</h2>")
    exp = doc["export"]
    if exp is None:
        out.append(_missing(missing_text("export", p)))
    else:
        exp_dir = Path(doc["runs"]["export"])
        out.append(_table(["model", "directory"], [[k, str(exp_dir / v)] for k, v in exp.get("models", {}).items()],
                          mono={1}))
        out.append(f"<p>base HF dir: <code>{_e(exp.get('base_hf_dir', ''))}</code>; wandb: "
                   f"{_e(exp.get('wandb', ''))}; finished {_e(exp.get('finished_utc', ''))}</p>")
        out.append("<h3>Config fixes (exported config.json → base architecture)</h3>")
        fixes = fix_rows(exp)
        out.append(_table(["model", "key", "exported", "fixed to"], fixes, mono={2, 3}) if fixes
                   else "<p>none</p>")
        out.append("<h3>sha256</h3>")
        out.append(_table(["model", "file", "sha256"], sha_rows(exp), mono={2}))
    body = "\n".join(out)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>jacpt report: {_e(p)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


# ----------------------------------------------------------------------------- Markdown

def _md(s) -> str:
    """A Markdown table cell: HTML-escaped (Markdown passes raw HTML through), pipes and newlines kept in the cell."""
    return html.escape(clean(s), quote=False).replace("|", "\\|").replace("\n", "<br>")


def _md_table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> list[str]:
    out = ["| " + " | ".join(_md(h) for h in header) + " |",
           "|" + "|".join("---:" if i in numeric else "---" for i in range(len(header))) + "|"]
    return out + ["| " + " | ".join(_md(c) for c in r) + " |" for r in rows] + [""]


def render_markdown(doc: dict) -> str:
    p = doc["profile"]
    out = [f"# jacpt report: {p}", "", f"generated {doc['generated_utc']} from the newest complete run of each stage.",
           "", "## Runs used", ""]
    out += _md_table(["stage", "run", "finished (UTC)"],
                     [[s, doc["runs"][s] or "(none)", doc["finished"].get(s, "")] for s in STAGES])
    out += ["## Training curves", ""]
    for stage, _ in TRAIN_STAGES:
        if stage not in doc["train"]:
            out += [f"> {missing_text(stage, p)}", ""]
        elif stage in doc["notes"]:
            out += [f"> {_md(doc['notes'][stage])}", ""]
    out += ["![loss](loss.png)", "", "![learning rate](lr.png)", "", "## Evaluation: base vs CPT vs LoRA", ""]
    ev = doc["eval"]
    if ev is None:
        out += [f"> {missing_text('eval', p)}", ""]
    else:
        if "eval" in doc["notes"]:
            out += [f"> {_md(doc['notes']['eval'])}", ""]
        header, rows = metrics.table(ev)
        out += _md_table(header, rows, numeric=set(range(1, len(header))))
        out += [f"- {_md(x)}" for x in metrics.definitions(ev)] + [""]
        if "examples" not in ev:
            out += [f"> {OLD_EVAL}", ""]
        out += ["### Validation perplexity", ""]
        out += _md_table(EVAL_HEADER, eval_rows(ev), numeric={1, 2, 3, 4, 5})
        if ev.get("examples"):
            models = ev["models"]
            out += ["### Answers on the LoRA test set", ""]
            out += _md_table(["id", "prompt", "reference"] + [m["label"] for m in models],
                             [[str(ex["id"]), ex["input"], ex["reference"]]
                              + [f"{ex['answers'][m['key']]['text']}\n[{eval_answer_stats(ex['answers'][m['key']])}]"
                                 for m in models] for ex in ev["examples"]], numeric={0})
    out += ["## Generations", ""]
    demo = doc["demo"]
    if demo is None:
        out += [f"> {missing_text('demo', p)}", ""]
    else:
        out += [f"{_md(demo['method'])}; {_md(demo_settings(demo))}", ""]
        if "demo" in doc["notes"]:
            out += [f"> {_md(doc['notes']['demo'])}", ""]
        models = demo["models"]
        rows = [[r["prompt"]] + [r["answers"][m["key"]]["text"] + f"\n[{answer_stats(r['answers'][m['key']])}]"
                                 for m in models] for r in demo["results"]]
        out += _md_table(["prompt"] + [m["label"] for m in models], rows)
    out += ["## Throughput and memory", ""]
    out += _md_table(TRAIN_HEADER, train_rows(doc), numeric=set(range(1, 10)))
    if demo is not None:
        out += _md_table(DEMO_MODEL_HEADER, demo_model_rows(demo), numeric={2, 3, 4, 5})
    out += ["## Hand-off manifest", ""]
    exp = doc["export"]
    if exp is None:
        out += [f"> {missing_text('export', p)}", ""]
    else:
        exp_dir = Path(doc["runs"]["export"])
        out += _md_table(["model", "directory"], [[k, str(exp_dir / v)] for k, v in exp.get("models", {}).items()])
        out += [f"base HF dir: `{exp.get('base_hf_dir', '')}`; wandb: {exp.get('wandb', '')}", ""]
        out += _md_table(["model", "key", "exported", "fixed to"], fix_rows(exp)) if fix_rows(exp) else ["none", ""]
        out += _md_table(["model", "file", "sha256"], sha_rows(exp))
    return "\n".join(out)


# ----------------------------------------------------------------------------- the stage

def plan_text(profile: str, found: dict) -> str:
    lines = [f"profile      {profile}", "runs"]
    for s in STAGES:
        lines.append(f"  {s:<7} {found[s].dir if found[s] else '(none: ' + missing_text(s, profile) + ')'}")
    lines.append(f"output       {runs.runs_root() / profile}/report-<stamp>/report.html, report.md, "
                 + ", ".join(IMAGES))
    return "\n".join(lines)


def report_stage(cfg: Config, dry_run: bool) -> Path:
    """`make report`: the offline report of the newest complete runs in a new run dir.

    Returns the path of report.html (the dry run: its plan.json, in the report-dry-run dir; nothing else is
    written). Raises StageError when there is no complete CPT run.
    """
    found = find_runs(cfg.profile)
    inputs = {s: str(r.dir) for s, r in found.items() if r is not None}
    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    # Like the demo, a report is always made again: a nonce in the key, so open_run never finds it "done".
    key = {"nonce": f"{started}-{secrets.token_hex(4)}", "inputs": inputs, "format": FORMAT}
    run, _ = runs.open_run(cfg, "report", key, inputs=inputs, dry_run=dry_run)
    if dry_run:
        text = plan_text(cfg.profile, found)
        print(text)
        write_json_atomic(run.dir / "plan.json", {"profile": cfg.profile, "runs": inputs,
                                                  "missing": [s for s, r in found.items() if r is None]})
        write_text_atomic(run.dir / "plan.txt", text + "\n")
        return run.dir / "plan.json"

    doc = collect(cfg, found)
    for img in IMAGES:
        plot(doc, img.removesuffix(".png"), run.dir / img)
    write_text_atomic(run.dir / "report.html", render_html(doc))
    write_text_atomic(run.dir / "report.md", render_markdown(doc))
    summary = {k: v for k, v in doc.items() if k not in ("train",)}
    summary["train"] = {s: t["summary"] for s, t in doc["train"].items()}
    write_json_atomic(run.dir / "report.json", summary)
    run.mark_complete({"report_html": "report.html", "report_md": "report.md", "report_json": "report.json",
                       "images": list(IMAGES), "runs": inputs, "missing": doc["missing"]})
    for s in doc["missing"]:
        log(missing_text(s, cfg.profile))
    log(f"report written: {run.dir / 'report.html'}")
    return run.dir / "report.html"
