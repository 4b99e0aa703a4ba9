"""jacpt.generate: the demo of base / CPT / LoRA side by side, on real (tiny) HF models.

Fixture runs: an import run whose hf_dir is the session's tiny model, and an export run
whose CPT and LoRA are copies of it with perturbed weights; no NeMo import. The CUDA path
(NeMo workers) is planned here, and run by the `gpu` test on a GPU.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_hf_chain, perturbed_copy, write_run

from jacpt import config, generate, runs, train

REQUIRED_PROMPTS = ("日本の首都は", "富士山について説明してください。", "機械学習とは何ですか。")
PROMPTS = ["日本の首都は", "富士山は、", "機械学習とは何ですか。"]


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def chain_root(tmp_path_factory, tiny_model_dir) -> Path:
    return make_hf_chain(tmp_path_factory.mktemp("demo-runs"), tiny_model_dir)


@pytest.fixture
def kit(monkeypatch, chain_root):
    monkeypatch.setenv("JACPT_RUNS_DIR", str(chain_root))
    return chain_root


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("# a comment\n" + "\n".join(PROMPTS) + "\n\n", encoding="utf-8")
    return p


def cfg_for(prompts_file: Path, *overrides: str) -> config.Config:
    return config.load("tiny-cpu", [f"demo.prompts={prompts_file}", "demo.max_new_tokens=4", *overrides], env={})


@pytest.fixture(scope="module")
def greedy_demo(chain_root, prompts_file) -> dict:
    """The demo run twice with greedy decoding; returns both run dirs, documents and console outputs."""
    out = {"dirs": [], "docs": [], "stdout": []}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JACPT_RUNS_DIR", str(chain_root))
        for _ in range(2):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                marker = generate.demo_stage(cfg_for(prompts_file, "demo.temperature=0"), dry_run=False,
                                             interactive=False)
            out["dirs"].append(marker.parent)
            out["docs"].append(json.loads((marker.parent / "demo.json").read_text(encoding="utf-8")))
            out["stdout"].append(buf.getvalue())
    return out


# ----------------------------------------------------------------------------- prompts and settings

def test_shipped_prompts_are_japanese_openings():
    path, prompts = generate.load_prompts(config.load("tiny-cpu", env={}))
    assert path == generate.DEFAULT_PROMPTS and len(prompts) >= 6
    assert set(REQUIRED_PROMPTS) <= set(prompts)
    assert all(any("\u3040" <= c <= "\u30ff" or "\u4e00" <= c <= "\u9fff" for c in p) for p in prompts)


def test_empty_prompts_file_is_an_error(tmp_path):
    (tmp_path / "p.txt").write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(train.StageError, match="holds no prompts"):
        generate.load_prompts(cfg_for(tmp_path / "p.txt"))
    with pytest.raises(train.StageError, match="cannot read the demo prompts"):
        generate.load_prompts(cfg_for(tmp_path / "missing.txt"))


def test_nemo_inference_params_are_accepted_by_megatron():
    from megatron.core.inference.common_inference_params import CommonInferenceParams

    greedy = generate.nemo_inference_params({"max_new_tokens": 7, "temperature": 0.0, "top_p": 0.9, "greedy": True})
    assert greedy == {"temperature": 1.0, "top_k": 1, "top_p": 0.0, "num_tokens_to_generate": 7}
    sample = generate.nemo_inference_params({"max_new_tokens": 7, "temperature": 0.7, "top_p": 0.9, "greedy": False})
    assert sample["top_k"] == 0 and sample["top_p"] == 0.9 and sample["temperature"] == 0.7  # never both > 0
    for kw in (greedy, sample):
        assert CommonInferenceParams(**kw).num_tokens_to_generate == 7


# ----------------------------------------------------------------------------- the CPU demo

def test_demo_writes_a_row_per_prompt_and_a_column_per_model(greedy_demo, prompts_file):
    run_dir, doc, stdout = greedy_demo["dirs"][0], greedy_demo["docs"][0], greedy_demo["stdout"][0]
    done = json.loads((run_dir / runs.MARKER).read_text(encoding="utf-8"))
    assert done["demo_json"] == "demo.json" and done["prompts"] == len(PROMPTS)
    # demo.json
    assert doc["format"] == 1 and doc["backend"] == "hf" and doc["device"] == "cpu"
    assert doc["note"] == generate.NO_CUDA_NOTE and doc["prompts"] == PROMPTS
    assert doc["prompts_file"] == str(prompts_file)
    assert doc["settings"] == {"max_new_tokens": 4, "temperature": 0.0, "top_p": 0.9, "seed": 1234, "greedy": True}
    assert [m["key"] for m in doc["models"]] == ["base", "cpt", "lora"]
    assert [m["label"] for m in doc["models"]] == ["base", "CPT", "LoRA"]
    assert doc["models"][0]["path"].endswith("tiny-qwen2") and doc["models"][1]["path"].endswith("hf/cpt")
    for m in doc["models"]:
        assert 0 < m["load_s"] <= m["startup_s"] and m["generate_s"] > 0
        assert m["dtype"] == "float32" and m["batched"] is False
        assert 0 < m["new_tokens"] <= 4 * len(PROMPTS) and m["tokens_per_s"] > 0
    assert [r["prompt"] for r in doc["results"]] == PROMPTS
    for r in doc["results"]:
        assert set(r["answers"]) == {"base", "cpt", "lora"}
        for a in r["answers"].values():
            assert set(a) == {"text", "new_tokens", "latency_s", "tokens_per_s"}
            assert isinstance(a["text"], str) and 0 <= a["new_tokens"] <= 4 and a["latency_s"] > 0
    # the console table: the note, a header with the three models, one row per prompt
    assert generate.NO_CUDA_NOTE in stdout
    header = next(ln for ln in stdout.splitlines() if "prompt" in ln and "│" in ln)
    assert [c.strip() for c in header.strip("│").split("│")] == ["prompt", "base", "CPT", "LoRA"]
    for p in PROMPTS:
        assert sum(ln.startswith(f"│ {p}") for ln in stdout.splitlines()) == 1
    # demo.md: the same table in markdown
    md = (run_dir / "demo.md").read_text(encoding="utf-8")
    assert "| prompt | base | CPT | LoRA |" in md and generate.NO_CUDA_NOTE in md
    rows = [ln for ln in md.splitlines() if any(ln.startswith(f"| {p} |") for p in PROMPTS)]
    assert len(rows) == len(PROMPTS) and all(ln.count("<sub>[") == 3 for ln in rows)


def test_greedy_decoding_is_deterministic_and_every_demo_is_a_new_run(greedy_demo):
    (d1, d2), (a, b) = greedy_demo["dirs"], greedy_demo["docs"]
    assert d1 != d2 and d1.name.startswith("demo-") and d2.name.startswith("demo-")

    def texts(doc: dict) -> list:
        return [[r["answers"][k]["text"] for k in ("base", "cpt", "lora")] for r in doc["results"]]

    assert texts(a) == texts(b)
    assert texts(a) != [[t[0]] * 3 for t in texts(a)], "perturbed CPT/LoRA answer like the base: models mixed up?"


def test_seeded_sampling_repeats_per_prompt_and_skips_the_padded_vocabulary(tiny_model_dir):
    s = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 0.95, "seed": 7, "greedy": False}
    gen = generate.HFGenerator(tiny_model_dir, s)
    first = [a.text for a in gen.generate(PROMPTS)]
    assert [a.text for a in gen.generate(PROMPTS[::-1])] == first[::-1]  # seeded per prompt, not per run
    # embedding rows 151,665..151,935 are no tokens: never sampled (transformers), masked (NeMo)
    assert gen._config().suppress_tokens == list(range(151665, 151936))


def test_nemo_logits_are_masked_past_the_tokenizer():
    import torch

    class Wrapper:
        def run_one_forward_step(self, inference_input):
            return torch.zeros(2, 3, 10)

    w = Wrapper()
    generate.mask_padded_vocab(w, 7)
    logits = w.run_one_forward_step({"tokens": None})
    assert torch.isneginf(logits[..., 7:]).all() and (logits[..., :7] == 0).all()


def test_interactive_loop_answers_with_all_three_models(kit, prompts_file, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("京都は\n富士山は\n\nnot read\n"))
    marker = generate.demo_stage(cfg_for(prompts_file, "demo.temperature=0"), dry_run=False, interactive=True)
    out = capsys.readouterr().out
    turns = [json.loads(ln) for ln in (marker.parent / "chat.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [t["prompt"] for t in turns] == ["京都は", "富士山は"]  # the empty line ended the loop
    assert all(set(t["answers"]) == {"base", "cpt", "lora"} for t in turns)
    assert json.loads(marker.read_text(encoding="utf-8"))["chat_turns"] == 2
    assert "interactive:" in out and out.count("prompt> ") == 3


# ----------------------------------------------------------------------------- errors and dry runs

def test_missing_export_is_a_clear_error(tmp_path, monkeypatch, tiny_model_dir, prompts_file):
    monkeypatch.setenv("JACPT_RUNS_DIR", str(make_hf_chain(tmp_path, tiny_model_dir, export=False)))
    with pytest.raises(train.StageError, match=r"no complete export run .*run `make export PROFILE=tiny-cpu` first"):
        generate.demo_stage(cfg_for(prompts_file), dry_run=False, interactive=False)
    assert not list((tmp_path / "tiny-cpu").glob("demo-*")), "no run dir before the inputs are found"


def test_missing_import_names_its_fix(tmp_path, monkeypatch, prompts_file):
    monkeypatch.setenv("JACPT_RUNS_DIR", str(tmp_path))
    with pytest.raises(runs.RunError, match="make import PROFILE=tiny-cpu"):
        generate.demo_stage(cfg_for(prompts_file), dry_run=True, interactive=False)


def _no_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a dry run loaded a model")

    for name in ("load_hf", "HFGenerator", "NemoGenerator", "WorkerGenerator"):
        monkeypatch.setattr(generate, name, refuse)


def test_dry_run_loads_nothing_and_writes_the_plan(kit, prompts_file, monkeypatch, capsys):
    _no_loading(monkeypatch)
    out_path = generate.demo_stage(cfg_for(prompts_file), dry_run=True, interactive=True)
    out = capsys.readouterr().out
    assert out_path == kit / "tiny-cpu" / "demo-dry-run" / "plan.json"
    plan = json.loads(out_path.read_text(encoding="utf-8"))
    assert plan["backend"] == "hf" and plan["interactive"] is True and plan["prompts"] == PROMPTS
    for m in plan["models"]:
        assert m["path"] in out
    assert generate.NO_CUDA_NOTE in out and "temperature=0.7" in out and "chat loop" in out
    assert (out_path.parent / "plan.txt").is_file() and (out_path.parent / runs.RUN_JSON).is_file()
    assert not (out_path.parent / runs.MARKER).exists()


def test_dry_run_with_cuda_plans_nemo_workers_on_the_checkpoints(tmp_path, monkeypatch, tiny_model_dir, prompts_file,
                                                                 capsys):
    root = make_hf_chain(tmp_path, tiny_model_dir, export=False)
    (root / "tiny-cpu" / "import-20260101-000000" / "model" / "context").mkdir(parents=True)
    (root / "tiny-cpu" / "import-20260101-000000" / "model" / "weights").mkdir()
    for stage in ("cpt", "lora"):
        d = write_run(root, f"{stage}-20260101-000100", {"checkpoint": f"{stage}/checkpoints/step=9-last"})
        for sub in ("context", "weights"):
            (d / stage / "checkpoints" / "step=9-last" / sub).mkdir(parents=True)
    monkeypatch.setenv("JACPT_RUNS_DIR", str(root))
    monkeypatch.setattr(generate, "cuda_available", lambda: True)
    _no_loading(monkeypatch)
    plan = json.loads(generate.demo_stage(cfg_for(prompts_file), dry_run=True, interactive=False).read_text())
    out = capsys.readouterr().out
    assert plan["backend"] == "nemo" and plan["device"] == "cuda" and plan["note"] is None
    assert [Path(m["path"]).name for m in plan["models"]] == ["model", "step=9-last", "step=9-last"]
    assert out.count("-m jacpt.generate worker nemo") == 3 and generate.NO_CUDA_NOTE not in out

    # a checkpoint dir that is not one is refused, naming the stage to re-run
    shutil.rmtree(root / "tiny-cpu" / "lora-20260101-000100" / "lora" / "checkpoints" / "step=9-last" / "weights")
    with pytest.raises(train.StageError, match="make lora PROFILE=tiny-cpu"):
        generate.demo_stage(cfg_for(prompts_file), dry_run=True, interactive=False)


# ----------------------------------------------------------------------------- the worker process

def test_worker_process_answers_like_the_in_process_generator(tiny_model_dir, tmp_path):
    s = {"max_new_tokens": 4, "temperature": 0.0, "top_p": 0.9, "seed": 1234, "greedy": True}
    local = [a.text for a in generate.HFGenerator(tiny_model_dir, s).generate(PROMPTS)]
    worker = generate.WorkerGenerator("hf", tiny_model_dir, s, "cpu", tmp_path / "worker.log")
    try:
        assert worker.load_s > 0 and worker.dtype == "float32"
        assert [a.text for a in worker.generate(PROMPTS)] == local
        assert [a.text for a in worker.generate(PROMPTS[:1])] == local[:1]  # loaded once, asked twice
        # a failure in the worker comes back as a StageError with the end of its log
        with pytest.raises(train.StageError, match=r"(?s)hf worker for .*tiny-qwen2 failed: .*\(log .*Traceback"):
            worker.generate([None])
    finally:
        worker.close()
    assert worker.proc.returncode == 1
    assert "Traceback" in (tmp_path / "worker.log").read_text(encoding="utf-8")


def test_workers_started_together_answer_like_one_at_a_time(tiny_model_dir, tmp_path):
    """The demo's CUDA path (run_workers) with transformers workers on the CPU: three models, three
    processes started at once; each model's answers are those it gives alone, in the plan's order."""
    s = {"max_new_tokens": 4, "temperature": 0.0, "top_p": 0.9, "seed": 1234, "greedy": True}
    models = {"base": tiny_model_dir, "cpt": perturbed_copy(tiny_model_dir, tmp_path / "cpt", seed=1),
              "lora": perturbed_copy(tiny_model_dir, tmp_path / "lora", seed=2)}
    alone = {k: [a.text for a in generate.HFGenerator(d, s).generate(PROMPTS)] for k, d in models.items()}
    assert alone["base"] != alone["cpt"] != alone["lora"]  # distinct models, so a mix-up would show
    p = {"prompts": PROMPTS, "settings": s, "device": "cpu", "backend": "nemo", "profile": "tiny-cpu",
         "models": [{"key": k, "label": k, "path": str(d), "run": str(tmp_path)} for k, d in models.items()]}
    doc, kept = generate.run_workers(p, tmp_path / "run", keep=False, backend="hf")
    assert kept == {}
    assert [m["key"] for m in doc["models"]] == ["base", "cpt", "lora"]
    for i, prompt in enumerate(PROMPTS):
        assert doc["results"][i]["prompt"] == prompt
        assert {k: a["text"] for k, a in doc["results"][i]["answers"].items()} == {k: v[i] for k, v in alone.items()}
    for m in doc["models"]:
        assert m["startup_s"] >= m["load_s"] > 0 and m["new_tokens"] > 0
        assert (tmp_path / "run" / f"worker-{m['key']}.log").is_file()


def test_a_failing_worker_stops_the_others(tiny_model_dir, tmp_path, monkeypatch):
    s = {"max_new_tokens": 4, "temperature": 0.0, "top_p": 0.9, "seed": 1234, "greedy": True}
    p = {"prompts": PROMPTS, "settings": s, "device": "cpu", "backend": "nemo", "profile": "tiny-cpu",
         "models": [{"key": "base", "label": "base", "path": str(tiny_model_dir), "run": "-"},
                    {"key": "cpt", "label": "CPT", "path": str(tmp_path / "missing"), "run": "-"}]}
    procs = []
    real = generate.WorkerGenerator.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        procs.append(self.proc)

    monkeypatch.setattr(generate.WorkerGenerator, "__init__", spy)
    with pytest.raises(train.StageError, match=r"hf worker for .*missing failed"):
        generate.run_workers(p, tmp_path / "run", keep=False, backend="hf")
    assert len(procs) == 2 and all(pr.poll() is not None for pr in procs)  # none left running


def test_worker_entry_point_without_arguments_prints_usage():
    proc = subprocess.run([sys.executable, "-m", "jacpt.generate"], capture_output=True, text=True,
                          cwd=str(Path(generate.__file__).parents[1]))
    assert proc.returncode == 1 and "usage: python -m jacpt.generate worker" in proc.stderr


# ----------------------------------------------------------------------------- tables

def test_console_grid_keeps_columns_aligned_with_wide_characters():
    from jacpt.generate import grid, text_width

    table = grid(["prompt", "base"], [["日本の首都は", "東京です。\tタブ\x07と改行\nの混じる長い答えがここで折り返される"]], [8, 12])
    widths = {text_width(ln) for ln in table.splitlines()}
    assert len(widths) == 1, table
    assert "\t" not in table and "\x07" not in table and "\ufffd" in table


# ----------------------------------------------------------------------------- the GPU path

@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not __import__("torch").cuda.is_available(),
                    reason="needs a CUDA GPU: the demo generates with NeMo (llm.generate) only there")
def test_demo_on_gpu_generates_with_nemo_from_the_checkpoints(tiny_chain, chain_env, tmp_path):
    code = ("import sys; from jacpt import config, generate; "
            "cfg = config.load('tiny-cpu', ['demo.temperature=0', 'demo.max_new_tokens=8']); "
            "print(generate.demo_stage(cfg, dry_run=False, interactive=False))")
    docs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], env=chain_env, capture_output=True, text=True,
                              timeout=900, cwd=str(Path(generate.__file__).parents[2]))
        assert proc.returncode == 0, proc.stderr[-4000:]
        marker = Path(proc.stdout.strip().splitlines()[-1])
        docs.append(json.loads((marker.parent / "demo.json").read_text(encoding="utf-8")))
    doc = docs[0]
    assert doc["backend"] == "nemo" and doc["device"] == "cuda" and doc["note"] is None
    assert [Path(m["path"]) for m in doc["models"]] == [
        tiny_chain["import"]["dir"] / "model", tiny_chain["cpt"]["dir"] / tiny_chain["cpt"]["checkpoint"],
        tiny_chain["lora"]["dir"] / tiny_chain["lora"]["checkpoint"]]
    assert all(m["batched"] and m["dtype"] == "bfloat16" and m["load_s"] > 0 for m in doc["models"])
    assert len(doc["results"]) == len(doc["prompts"]) >= 6
    assert all(0 < r["answers"][k]["new_tokens"] <= 8 for r in doc["results"] for k in ("base", "cpt", "lora"))
    texts = [[[r["answers"][k]["text"] for k in ("base", "cpt", "lora")] for r in d["results"]] for d in docs]
    assert texts[0] == texts[1]
    assert not math.isnan(doc["models"][0]["tokens_per_s"])
