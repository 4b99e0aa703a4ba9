"""jacpt.report: the offline HTML + Markdown report, on fake complete runs shaped like the real stages' outputs.

Fast, CPU only, no NeMo: the runs are written by hand (run.json + COMPLETE.json + each stage's own file,
in the layouts of callbacks.MetricsRecorder, evaluate.eval_stage, generate.demo_stage, export.export_stage).
"""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import write_run

from jacpt import config, metrics, report, runs, train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert('x')</script> & 東京"
SHA = "ab" * 32


def make_run(root: Path, stage: str, stamp: str, complete: dict | None, model_runs: dict | None = None) -> Path:
    return write_run(root, f"{stage}-{stamp}", complete, {"model_runs": model_runs} if model_runs else None)


def write_metrics(d: Path, n: int, first: float, gpu: bool) -> None:
    lines = []
    for i in range(1, n + 1):
        rec = {"step": i, "loss": first - 0.05 * i, "t": 10.0 + 0.5 * i + (3.0 if i > n // 2 else 0.0),
               "lr": 1e-3 * min(1.0, i / 3), "grad_norm": 1.0}
        if gpu:
            rec["mem_gib"] = 10.0 + i / 100
        lines.append(json.dumps(rec))
        if i in (n // 2, n):
            lines.append(json.dumps({"step": i, "val_loss": first - 0.04 * i}))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def eval_doc(answers: bool = True) -> dict:
    """eval.json as `jacpt eval` writes it (format 2); answers=False: a format 1 run, perplexity only."""
    rows = [("base", "base", 3.0), ("cpt", "CPT", 2.5), ("lora", "LoRA", 2.4)]
    doc = {"format": 1, "profile": "tiny-cpu", "device": "cpu", "dtype": "float32",
           "settings": {"max_val_tokens": 300, "seq_length": 128},
           "data": {"manifest": "/x/data_manifest.json", "manifest_sha256": SHA, "prefix": "/x/validation",
                    "documents": 3, "tokens": 301, "input_fingerprint": SHA},
           "models": [{"key": k, "label": lab, "path": f"/m/{k}", "run": "/r"} for k, lab, _ in rows],
           "results": [{"key": k, "label": lab, "path": f"/m/{k}", "tokens": 300, "mean_nll": nll,
                        "perplexity": math.exp(nll), "seconds": 1.5, "tokens_per_s": 200.0, "load_s": 0.3}
                       for k, lab, nll in rows]}
    if not answers:
        return doc
    doc["format"] = 2
    doc["settings"].update(max_examples=2, max_new_tokens=32, batch_size=16, ja_threshold=0.5, repeat_unit=4,
                           repeat_times=3)
    doc["decoding"] = {"greedy": True, "template": "{input} {output}", "prompt": "p", "answer": "a", "min_kana": 1,
                       "bleu": "nrefs:1|tok:char", "chrf": "nrefs:1|nc:6"}
    doc["data"]["test"] = {"path": "/x/lora/test.jsonl", "sha256": SHA, "examples": 8, "used": 2}
    for i, r in enumerate(doc["results"]):
        r.update(examples=2, exact_match=0.5 * (i > 0), chrf=10.0 + 11 * i, bleu=5.0 + 7 * i, ja_rate=0.5 + 0.25 * i,
                 repeat_rate=0.5 - 0.25 * i, mean_chars=40.0, new_tokens=64, generate_s=2.0, latency_s=1.0,
                 gen_tokens_per_s=32.0)
    doc["reference"] = {"examples": 2, "ja_rate": 1.0, "repeat_rate": 0.0, "mean_chars": 42.0}
    answer = {"new_tokens": 32, "latency_s": 1.0, "chars": 5, "ja_share": 1.0, "kana": 3, "japanese": True,
              "loop": None, "repeat": False, "exact": False, "chrf": 12.5, "bleu": 3.25}
    doc["examples"] = [{"id": n, "input": f"Title: 題{n}\nContinuation:", "reference": f"参照{n}です。",
                        "answers": {"base": {**answer, "text": "ランダム"}, "cpt": {**answer, "text": EVIL},
                                    "lora": {**answer, "text": f"答え{n}\n二行目 | pipe"}}} for n in (1, 2)]
    return doc


def demo_doc() -> dict:
    models = [{"key": k, "label": lab, "path": f"/m/{k}", "run": "/r", "load_s": 0.5, "startup_s": 0.6,
               "dtype": "float32", "batched": False, "new_tokens": 20, "generate_s": 2.0, "tokens_per_s": 10.0}
              for k, lab in (("base", "base"), ("cpt", "CPT"), ("lora", "LoRA"))]
    answers = {"base": "ランダムな出力です。", "cpt": "東京です。\n二行目 | pipe", "lora": EVIL}
    return {"format": 1, "profile": "tiny-cpu", "method": "transformers on CPU, float32", "backend": "hf",
            "device": "cpu", "note": "no CUDA: generating with transformers from the exported HF models",
            "settings": {"max_new_tokens": 32, "temperature": 0.0, "top_p": 0.0, "seed": 1234, "greedy": True},
            "prompts_file": "/c/demo-prompts.txt", "prompts_sha256": SHA, "prompts": ["日本の首都は"],
            "started_utc": "2026-01-01T00:00:00Z", "models": models,
            "results": [{"prompt": "日本の首都は", "answers": {k: {"text": t, "new_tokens": 10, "latency_s": 1.0,
                                                                "tokens_per_s": 10.0} for k, t in answers.items()}}]}


def export_complete() -> dict:
    files = {"config.json": SHA, "model.safetensors": "cd" * 32}
    fixes = {"max_window_layers": [28, 2], "bos_token_id": [None, 151643]}
    return {"models": {"cpt": "hf/cpt", "lora": "hf/lora"}, "sha256": {"cpt": files, "lora": files},
            "config_fixes": {"cpt": fixes, "lora": fixes}, "base_hf_dir": "/a/tiny-qwen2", "wandb": "offline"}


def build(root: Path, eval_: bool = True, demo: bool = True, lora: bool = True, gpu: bool = True,
          eval_answers: bool = True) -> dict:
    out = {"cpt": make_run(root, "cpt", "20260101-000001", {"checkpoint": "cpt/ckpt", "steps": 20, "tokens": 20 * 256,
                                                             "first_loss": 11.9, "last_loss": 10.9, "val_loss": 11.1})}
    write_metrics(out["cpt"], 20, 11.9, gpu)
    if lora:
        out["lora"] = make_run(root, "lora", "20260101-000002", {"checkpoint": "lora/ckpt", "steps": 10,
                                                                 "tokens": 10 * 512})
        write_metrics(out["lora"], 10, 3.0, gpu)
    out["export"] = make_run(root, "export", "20260101-000003", export_complete())
    model_runs = {"base": "/r/import", "cpt": str(out["export"]), "lora": str(out["export"])}
    if eval_:
        out["eval"] = make_run(root, "eval", "20260101-000004", {"eval_json": "eval.json"}, model_runs)
        (out["eval"] / "eval.json").write_text(json.dumps(eval_doc(eval_answers)), encoding="utf-8")
    if demo:
        out["demo"] = make_run(root, "demo", "20260101-000005", {"demo_json": "demo.json"}, model_runs)
        (out["demo"] / "demo.json").write_text(json.dumps(demo_doc(), ensure_ascii=False), encoding="utf-8")
    return out


@pytest.fixture
def kit(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("JACPT_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path / "runs"


def cfg() -> config.Config:
    return config.load("tiny-cpu", env={})


class Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        self.scripts += tag == "script"
        self.refs += [v for k, v in attrs if k in ("src", "href") and v is not None]


def test_full_report(kit):
    build(kit)
    path = report.report_stage(cfg(), dry_run=False)
    d = path.parent
    assert path.name == "report.html" and d.name.startswith("report-") and (d / runs.MARKER).is_file()
    assert runs.latest_complete("tiny-cpu", "report").dir == d
    page = path.read_text(encoding="utf-8")
    md = (d / "report.md").read_text(encoding="utf-8")

    for img in ("loss.png", "lr.png"):
        data = (d / img).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5000, img
    parser = Refs()
    parser.feed(page)
    assert sorted(parser.refs) == ["loss.png", "lr.png"] and parser.scripts == 0
    assert all((d / r).is_file() for r in parser.refs)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert '<meta charset="utf-8">' in page

    for ppl in (math.exp(3.0), math.exp(2.5), math.exp(2.4)):
        assert f"{ppl:.3f}" in page and f"{ppl:.3f}" in md
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; 東京" in page
    assert "<script>" not in page and "<script>" not in md
    assert "日本の首都は" in page and "ランダムな出力です。" in page
    assert SHA in page and SHA in md and "cd" * 32 in page
    assert "max_window_layers" in page and "151643" in page
    assert str(kit / "tiny-cpu" / "export-20260101-000003" / "hf" / "cpt") in page
    assert "no complete" not in page
    # throughput from metrics.jsonl: median step 0.5 s -> 512 tokens/s for CPT; peak memory from mem_gib
    assert "512" in page and "10.20" in page and "0.500" in page
    # the Markdown keeps a multi-line, piped answer in its cell
    assert "東京です。<br>二行目 \\| pipe" in md and "![loss](loss.png)" in md


def test_missing_eval_and_demo_sections_say_so(kit):
    build(kit, eval_=False, demo=False, lora=False, gpu=False)
    path = report.report_stage(cfg(), dry_run=False)
    page = path.read_text(encoding="utf-8")
    md = (path.parent / "report.md").read_text(encoding="utf-8")
    for stage in ("eval", "demo", "lora"):
        assert f"no complete {stage} run: run make {stage}" in page
        assert f"no complete {stage} run: run make {stage}" in md
    assert "n/a (no CUDA)" in page
    assert (path.parent / "loss.png").read_bytes()[:8] == PNG_SIGNATURE
    assert json.loads((path.parent / runs.MARKER).read_text())["missing"] == ["lora", "eval", "demo"]


def test_stale_eval_is_flagged(kit):
    made = build(kit)
    newer = make_run(kit, "export", "20260102-000000", export_complete())  # eval/demo still name the old export
    page = report.report_stage(cfg(), dry_run=False).read_text(encoding="utf-8")
    assert str(newer) in page and "run make eval again" in page and "run make demo again" in page
    assert str(made["export"]) in page


def test_incomplete_newest_run_is_skipped(kit):
    build(kit)
    make_run(kit, "eval", "20260105-000000", None)  # crashed: no COMPLETE.json
    page = report.report_stage(cfg(), dry_run=False).read_text(encoding="utf-8")
    assert "eval-20260101-000004" in page and "eval-20260105-000000" not in page


def test_no_cpt_run_is_a_stage_error(kit):
    with pytest.raises(train.StageError, match="run the chain first"):
        report.report_stage(cfg(), dry_run=False)
    make_run(kit, "cpt", "20260101-000001", None)  # incomplete only
    with pytest.raises(train.StageError, match="no complete cpt run"):
        report.report_stage(cfg(), dry_run=True)
    assert not list((kit / "tiny-cpu").glob("report-*"))


def test_dry_run_writes_no_report(kit, capsys):
    made = build(kit, demo=False)
    got = report.report_stage(cfg(), dry_run=True)
    out = capsys.readouterr().out
    assert str(made["cpt"]) in out and str(made["eval"]) in out and "no complete demo run" in out
    dirs = sorted(p.name for p in (kit / "tiny-cpu").iterdir() if p.name.startswith("report"))
    assert dirs == ["report-dry-run"] and got == kit / "tiny-cpu" / "report-dry-run" / "plan.json"
    assert not list((kit / "tiny-cpu" / "report-dry-run").glob("*.png"))
    assert not list((kit / "tiny-cpu" / "report-dry-run").glob("report.*"))
    with pytest.raises(runs.RunError):
        runs.latest_complete("tiny-cpu", "report")


def test_eval_table_and_answers(kit):
    build(kit)
    path = report.report_stage(cfg(), dry_run=False)
    page = path.read_text(encoding="utf-8")
    md = (path.parent / "report.md").read_text(encoding="utf-8")
    header, rows = metrics.table(eval_doc())
    assert header == ["metric", "base", "CPT", "LoRA", "reference"] and len(rows) == len(metrics.ROWS)
    for row in rows:  # the same table as eval.md and the model cards, every cell
        assert "| " + " | ".join(report._md(c) for c in row) + " |" in md
        assert "".join(f'<td class="n">{report._e(c)}</td>' for c in row[1:]) in page
    for line in metrics.definitions(eval_doc()):
        assert report._e(line) in page and report._md(line) in md
    assert "Answers on the LoRA test set" in page and "Answers on the LoRA test set" in md
    assert "参照1です。" in page and "答え2<br>二行目 \\| pipe" in md
    assert "chrF 12.5 · BLEU 3.2" in page and "Japanese · no loop · not exact" in page
    assert "<script>" not in page and "perplexity only" not in page


def test_a_perplexity_only_eval_still_shows_its_table(kit):
    build(kit, eval_answers=False)
    path = report.report_stage(cfg(), dry_run=False)
    page = path.read_text(encoding="utf-8")
    md = (path.parent / "report.md").read_text(encoding="utf-8")
    for ppl in (math.exp(3.0), math.exp(2.5), math.exp(2.4)):
        assert f"{ppl:.3f}" in page and f"{ppl:.3f}" in md
    assert report.OLD_EVAL in page and report.OLD_EVAL in md and "Answers on the LoRA test set" not in page


def test_hand_off_checksums_are_read_from_the_model_dirs(kit):
    made = build(kit)
    d = made["export"] / "hf" / "cpt"
    d.mkdir(parents=True)
    (d / "SHA256SUMS").write_text(f"{'ef' * 32}  README.md\n{'12' * 32}  model.safetensors\n", encoding="utf-8")
    page = report.report_stage(cfg(), dry_run=False).read_text(encoding="utf-8")
    assert "ef" * 32 in page and "12" * 32 in page  # cpt: as the directory says now (eval rewrote its card)
    assert "cd" * 32 in page  # lora: no directory here, so COMPLETE.json's table
