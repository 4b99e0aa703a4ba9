"""`jacpt bench`: its arithmetic, its plan and its tables (the measurements themselves need a GPU)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from jacpt import bench, config, paths
from jacpt.cli import cli

RESULTS = paths.KIT_ROOT / "bench" / "results"


def test_non_embedding_params_match_transformers_count():
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    s = bench.SHAPE
    cfg = Qwen2Config(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["groups"], tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())  # tied: the embedding counted once
    assert total == 494_032_768
    assert bench.non_embedding_params() == total - s["vocab"] * s["hidden"] == 357_898_112


def test_flops_per_token_is_the_stated_formula():
    assert bench.flops_per_token(2048) == 6 * 357_898_112 + 6 * 151_936 * 896 + 12 * 24 * 896 * 2048
    assert bench.flops_per_token(2048) == pytest.approx(3.49e9, rel=2e-3)
    assert bench.mfu(66_754, 989.0) == pytest.approx(66_754 * 3.4927e9 / 989e12, rel=1e-4)
    assert bench.mfu(None, 989.0) is None and bench.mfu(1000.0, None) is None


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA RTX 6000 Ada Generation", 364.2),
                                        ("NVIDIA L40S", 362.1), ("NVIDIA L40", 181.0), ("Tesla T4", None)])
def test_peak_lookup_by_gpu_name(name, peak):
    assert bench.peak_tflops(name) == peak


def test_summarize_takes_the_median_after_the_warmup():
    times = [9.0, 9.0] + [0.2, 0.1, 0.3, 0.25, 0.15]
    s = bench.summarize(times, tokens_per_step=4096, warmup=2)
    assert s["steps_timed"] == 5 and s["step_s"] == 0.2 and s["tokens_per_s"] == 20480.0
    assert s["step_s_min"] == 0.1 and s["step_s_max"] == 0.3
    with pytest.raises(bench.BenchError, match="no timed steps"):
        bench.summarize([1.0, 1.0], 10, warmup=2)


def test_the_plan_prepares_first_and_measures_levers_at_one_micro_batch(tmp_path):
    plan = bench.cases(["hf", "cpt"], [2, 4, 8], ["local", "kit"], steps=20, warmup=10, work=tmp_path,
                       lora_mbs=4, hf_modes=["bf16"])
    assert plan[0]["kind"] == "prep" and plan[0]["checkpoint"] is False  # no LoRA or generation: no import
    names = [c["name"] for c in plan[1:]]
    assert names == ["hf", "cpt-local-mbs4", "cpt-kit-mbs2", "cpt-kit-mbs4", "cpt-kit-mbs8"]
    local = next(c for c in plan if c["name"] == "cpt-local-mbs4")
    assert local["env"]["JACPT_NO_TE_ATTENTION"] == "local"
    # enough documents of 4,096 tokens for every timed and warm-up step of the largest micro-batch
    assert plan[0]["documents"] * 4096 >= (20 + 10) * 8 * 2048
    full = bench.cases(["lora", "gen"], [4], ["kit"], 20, 10, tmp_path, 4, ["bf16"])
    assert full[0]["checkpoint"] is True and [c["kind"] for c in full] == ["prep", "lora", "gen"]


def test_whole_logits_is_swept_like_the_kit_and_sets_the_loss_chunk(tmp_path):
    plan = bench.cases(["cpt", "lora"], [4, 8], ["whole-logits", "kit", "sdpa", "megatron-rope"], 20, 10, tmp_path,
                       4, ["bf16"])
    names = [c["name"] for c in plan[1:]]
    # sdpa changes a model field, which LoRA (loading its checkpoint's config) cannot: no LoRA case for it.
    assert names == ["cpt-whole-logits-mbs4", "cpt-whole-logits-mbs8", "cpt-kit-mbs4", "cpt-kit-mbs8",
                     "cpt-sdpa-mbs4", "cpt-megatron-rope-mbs4", "cpt-megatron-rope-mbs8", "lora-mbs4",
                     "lora-whole-logits-mbs4", "lora-megatron-rope-mbs4"]
    by = {c["name"]: c for c in plan}
    assert by["lora-megatron-rope-mbs4"]["env"] == by["cpt-megatron-rope-mbs8"]["env"] == {"JACPT_NO_TE_ROPE": "eager"}
    lora_only = bench.cases(["cpt", "lora"], [16], ["kit", "unfused-lora"], 20, 10, tmp_path, 4, ["bf16"])
    assert [c["name"] for c in lora_only[1:]] == ["cpt-kit-mbs16", "lora-mbs4", "lora-unfused-lora-mbs4"]
    assert lora_only[-1]["task"] == {"fused_lora_update": False}
    assert bench._task_arg(lora_only[-1], "fused_lora_update", "lora.fused_update") is False
    assert bench._task_arg(lora_only[-2], "fused_lora_update", "lora.fused_update") is True  # the kit's default
    assert by["cpt-whole-logits-mbs8"]["task"] == {"loss_chunk_tokens": 0}
    assert by["cpt-sdpa-mbs4"]["task"] == {"loss_chunk_tokens": 0}  # the earlier levers were measured so
    assert by["cpt-kit-mbs4"]["task"] == {}
    kit, whole = SimpleNamespace(), SimpleNamespace()
    bench._task_args(kit, by["cpt-kit-mbs4"], "cpt")
    bench._task_args(whole, by["lora-whole-logits-mbs4"], "lora")
    assert kit.loss_chunk_tokens == config.KEYS["cpt.loss_chunk_tokens"].default > 0
    assert whole.loss_chunk_tokens == 0
    assert "loss_chunk_tokens=0" in bench.plan_text(plan, 989.0)


def test_unfused_swiglu_is_a_cpt_and_a_lora_case_at_the_lever_micro_batch(tmp_path):
    plan = bench.cases(["cpt", "lora"], [4, 16], ["kit", "unfused-swiglu"], 20, 10, tmp_path, 16, ["bf16"])
    assert [c["name"] for c in plan[1:]] == ["cpt-kit-mbs4", "cpt-kit-mbs16", "cpt-unfused-swiglu-mbs16",
                                             "lora-mbs16", "lora-unfused-swiglu-mbs16"]
    by = {c["name"]: c for c in plan}
    for stage in ("cpt", "lora"):
        key = f"{stage}.fused_swiglu"
        assert config.KEYS[key].default is True
        assert bench._task_arg(by[f"{stage}-unfused-swiglu-mbs16"], "fused_swiglu", key) is False
        assert bench._task_arg(by[f"{stage}-kit-mbs16" if stage == "cpt" else "lora-mbs16"], "fused_swiglu",
                               key) is True
    assert "fused_swiglu=False" in bench.plan_text(plan, None)


def test_eager_decode_is_a_generation_case_only(tmp_path):
    plan = bench.cases(["cpt", "lora", "gen"], [8], ["kit", "eager-decode"], 20, 10, tmp_path, 4, ["bf16"])
    assert [c["name"] for c in plan[1:]] == ["cpt-kit-mbs8", "lora-mbs4", "gen", "gen-eager-decode"]
    assert plan[-1]["env"] == {"JACPT_NO_TE_DECODE": "eager"} and "env" not in plan[-2]
    assert "JACPT_NO_TE_DECODE=eager" in bench.plan_text(plan, None).splitlines()[-1]
    gen = {"ok": True, "load_s": 2.5, "batched_s": 1.0, "batched_tokens_per_s": 768.0, "batch1_s": 2.4,
           "batch1_tokens_per_s": 320.0}
    doc = {"gpu": {"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.2}, "data": None,
           "cases": [{"case": "gen", "kind": "gen", "decode": "cuda-graph", **gen},
                     {"case": "gen-eager-decode", "kind": "gen", "variant": "eager-decode", "decode": "eager",
                      **gen, "batched_s": 10.5}]}
    doc["summary"] = bench.collect(doc["cases"], doc["gpu"], 989.0, te_present=False)
    assert doc["summary"]["gen_3x256_s"] == 1.0  # the kit's case, not the lever's
    lines = [x for x in bench.render(doc).splitlines() if x.startswith("generation")]
    assert len(lines) == 2 and "decode cuda-graph" in lines[0] and "batched 1.00 s" in lines[0]
    assert lines[1].startswith("generation [eager-decode]") and "batched 10.50 s" in lines[1]


def test_the_committed_results_are_consistent_and_render():
    """The JSON BENCHMARKS.md cites: its summary is what `collect` makes of its cases, and it renders."""
    files = sorted(p for p in RESULTS.glob("*-nvidia-*.json") if "levers" not in p.name)
    assert files, "no GPU benchmark results committed under bench/results"
    for f in files:
        doc = json.loads(f.read_text(encoding="utf-8"))
        for key in ("gpu", "te_present", "cpt_tokens_per_s", "cpt_mfu", "cpt_peak_mem_gib", "hf_tokens_per_s",
                    "lora_tokens_per_s", "lora_peak_mem_gib", "gen_load_s", "gen_3x256_s"):
            assert key in doc["summary"], (f.name, key)
        assert doc["versions"]["nemo-toolkit"] and doc["versions"]["megatron-core"]
        again = bench.collect(doc["cases"], doc["gpu"], doc["summary"]["peak_tflops"],
                              te_present="transformer-engine" in doc["versions"])
        for key in ("cpt_tokens_per_s", "cpt_mfu", "hf_tokens_per_s", "lora_vs_cpt_speed", "gen_3x256_s"):
            assert again[key] == doc["summary"][key], (f.name, key)
        text = bench.render(doc)
        assert "NeMo CPT [kit]" in text and "transformers [bf16]" in text and "MFU" in text


def test_render_marks_an_out_of_memory_case():
    doc = {"gpu": {"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.2}, "data": None,
           "cases": [{"case": "cpt-kit-mbs16", "kind": "cpt", "variant": "kit", "mbs": 16, "ok": False,
                      "error": "OOM"},
                     {"case": "cpt-kit-mbs4", "kind": "cpt", "variant": "kit", "mbs": 4, "ok": True,
                      "tokens_per_s": 40000.0, "step_s": 0.2, "peak_mem_gib": 28.0, "params": 10, "trainable": 10}]}
    doc["summary"] = bench.collect(doc["cases"], doc["gpu"], 989.0, te_present=False)
    assert doc["summary"]["cpt_mbs"] == 4 and doc["summary"]["te_present"] is False
    lines = bench.render(doc).splitlines()
    assert any("16" in line and "OOM" in line for line in lines)
    assert any(line.startswith("NeMo CPT [kit]") and "40,000" in line and "14.1%" in line for line in lines)


def test_bench_without_a_gpu_says_so(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = CliRunner().invoke(cli, ["bench", "--only", "hf"])
    assert r.exit_code == 1 and "needs a CUDA GPU" in r.output and "bench-data" in r.output


def test_bench_rejects_unknown_parts():
    r = CliRunner().invoke(cli, ["bench", "--only", "cpt,tpu"])
    assert r.exit_code == 2 and "choose from hf, cpt, lora, gen" in r.output
    r = CliRunner().invoke(cli, ["bench", "--mbs", "4,x"])
    assert r.exit_code == 2 and "comma-separated integers" in r.output
    assert set(bench.LEVERS) == {"kit", "whole-logits", "local", "sdpa", "sdpa+adamw+swiglu", "megatron-rope",
                                "megatron-rope+norm", "unfused-lora", "unfused-swiglu", "eager-decode",
                                "megatron-zero-count"}


def test_benchmarks_md_cites_the_committed_figures():
    text = (paths.KIT_ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    for f in RESULTS.glob("*-nvidia-*.json"):
        assert f"bench/results/{f.name}" in text
        doc = json.loads(f.read_text(encoding="utf-8"))
        if "summary" in doc and doc["summary"].get("cpt_tokens_per_s"):
            assert f"{doc['summary']['cpt_tokens_per_s']:,.0f}" in text
    assert "make bench" in text


def test_dry_run_lists_the_cases_without_a_gpu(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["bench", "--dry-run", "--only", "cpt,lora", "--variants", "local,kit", "--mbs", "4,8"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith("4 case(s)")
    # the levers and LoRA at --lever-mbs, 16 by default
    assert any("cpt-local-mbs16x2" in x and "JACPT_NO_TE_ATTENTION=local" in x for x in lines)
    assert any(x.strip().startswith("lora-mbs16x2") for x in lines)
    assert any("cpt-kit-mbs8" in x and "10 + 20 steps" in x for x in lines)
    assert any(x.strip().startswith("prep") and "imported to NeMo" in x for x in lines)  # LoRA needs a checkpoint
    assert not any(tmp_path.iterdir()) and not list(RESULTS.glob("*-cpu*.json"))
    # `make bench DRY_RUN=1` reaches it through the environment
    r = CliRunner().invoke(cli, ["bench", "--only", "hf"], env={"DRY_RUN": "1"})
    assert r.exit_code == 0 and "transformers bf16, amp at micro-batch 2 x 16, 4 x 8, 8 x 4, 16 x 2" in r.output
    # the kit's global batch by default (32 samples: micro-batches accumulate); 0 for one micro-batch a step
    r = CliRunner().invoke(cli, ["bench", "--dry-run", "--only", "cpt", "--mbs", "8", "--global-batch", "0"])
    assert r.exit_code == 0 and "cpt-kit-mbs8 " in r.output and "micro-batch 8 x 1;" in r.output
    assert "cpt-kit-mbs8x4 " in CliRunner().invoke(cli, ["bench", "--dry-run", "--only", "cpt", "--mbs", "8"]).output
    assert config.KEYS["cpt.global_batch_size"].default == config.KEYS["lora.global_batch_size"].default == 32


@pytest.mark.parametrize("mbs, global_batch, n", [(16, 32, 2), (12, 32, 3), (8, 0, 1), (64, 32, 1), (2, 32, 16)])
def test_micro_batches_accumulate_to_the_global_batch(mbs, global_batch, n):
    assert bench.accumulation(mbs, global_batch) == n


def test_a_plan_at_the_kits_global_batch_accumulates_and_names_it(tmp_path):
    plan = bench.cases(["hf", "cpt", "lora"], [8, 16], ["kit", "megatron-zero-count"], 20, 10, tmp_path, 16,
                       ["bf16"], global_batch=32)
    assert [c["name"] for c in plan[1:]] == ["hf-global32", "cpt-kit-mbs8x4", "cpt-kit-mbs16x2",
                                             "cpt-megatron-zero-count-mbs16x2", "lora-mbs16x2",
                                             "lora-megatron-zero-count-mbs16x2"]
    by = {c["name"]: c for c in plan}
    assert by["cpt-kit-mbs8x4"]["accum"] == 4 and by["lora-mbs16x2"]["accum"] == 2
    assert plan[0]["documents"] * 4096 >= (20 + 10) * 32 * 2048  # every step's 32 samples
    text = bench.plan_text(plan, None)
    assert "micro-batch 8 x 4, 16 x 2" in text and "NeMo CPT [kit] micro-batch 16 x 2" in text
    # the lever: Megatron-Core 0.12's count of gradient zeros at every step
    for stage, kit in (("cpt", "cpt-kit-mbs16x2"), ("lora", "lora-mbs16x2")):
        assert by[f"{stage}-megatron-zero-count-mbs16x2"]["task"] == {"megatron_zero_count": True}
        assert by[kit]["task"] == {}
    assert bench.cases(["cpt"], [16], ["kit"], 20, 10, tmp_path, 4, ["bf16"])[1]["accum"] == 1  # the default: none
    # the task function's arguments: the kit's defaults, or the lever's

    for name, stage, zero_count in (("cpt-kit-mbs16x2", "cpt", False),
                                    ("lora-megatron-zero-count-mbs16x2", "lora", True)):
        recipe = SimpleNamespace()
        bench._task_args(recipe, by[name], stage)
        assert vars(recipe) == {"loss_chunk_tokens": config.KEYS[f"{stage}.loss_chunk_tokens"].default,
                                "fused_swiglu": True, "megatron_zero_count": zero_count}


def test_summary_pairs_lora_with_cpt_at_the_same_batches_and_renders_the_global_batch():
    def rec(case, kind, mbs, accum, tps, mem=40.0, **kw):
        return {"case": case, "kind": kind, "ok": True, "variant": "kit", "mbs": mbs, "accum": accum,
                "tokens_per_s": tps, "step_s": mbs * accum * 2048 / tps, "peak_mem_gib": mem, **kw}
    recs = [rec("cpt-kit-mbs16", "cpt", 16, 1, 100_000.0), rec("cpt-kit-mbs16x2", "cpt", 16, 2, 120_000.0),
            rec("lora-mbs16x2", "lora", 16, 2, 132_000.0, mem=30.0, trainable=1, params=2),
            {"case": "hf-global32", "kind": "hf", "ok": True, "results": {
                "bf16-mbs8x4": {"mode": "bf16", "mbs": 8, "accum": 4, "tokens_per_s": 80_000.0, "step_s": 0.8,
                                "peak_mem_gib": 30.0}}}]
    s = bench.collect(recs, {"name": "NVIDIA H100 80GB HBM3"}, 989.0, te_present=False)
    assert s["cpt_tokens_per_s"] == 120_000.0 and s["cpt_global_batch"] == 32 and s["lora_global_batch"] == 32
    assert s["lora_vs_cpt_speed"] == 1.1 and s["lora_vs_cpt_memory"] == 0.75  # against 16 x 2, not 16 x 1
    assert s["hf_tokens_per_s"] == 80_000.0 and s["hf_global_batch"] == 32 and s["cpt_vs_hf"] == 1.5
    doc = {"gpu": {"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.2}, "data": None, "cases": recs, "summary": s}
    rows = [line.split() for line in bench.render(doc).splitlines() if line.startswith(("NeMo", "transformers"))]
    assert [r[3:5] for r in rows if r[:2] == ["NeMo", "CPT"]] == [["16", "16"], ["16", "32"]]  # mbs, global
    assert [r[4:6] for r in rows if r[1] == "LoRA"] == [["16", "32"]]
    assert [r[2:4] for r in rows if r[0] == "transformers"] == [["8", "32"]]
    # A LoRA case at another batch listed first (a merged run): the summary still takes the one at CPT's batch.
    recs = [rec("lora-mbs4x8", "lora", 4, 8, 60_000.0, mem=12.0), rec("cpt-kit-mbs4x8", "cpt", 4, 8, 50_000.0)] + recs
    s = bench.collect(recs, {"name": "NVIDIA H100 80GB HBM3"}, 989.0, te_present=False)
    assert s["lora_mbs"] == 16 and s["lora_vs_cpt_speed"] == 1.1
    s = bench.collect(recs[:2], {"name": "NVIDIA H100 80GB HBM3"}, 989.0, te_present=False)
    assert s["lora_mbs"] == 4 and s["lora_vs_cpt_speed"] == 1.2  # no LoRA at CPT's best batch: the first one


def test_a_merged_run_keeps_earlier_cases_and_the_baselines_other_micro_batches():
    def hf(results):
        return {"case": "hf-global32", "kind": "hf", "ok": True, "results": results}
    earlier = [{"case": "cpt-kit-mbs8x4", "kind": "cpt", "ok": True, "tokens_per_s": 1.0},
               {"case": "cpt-kit-mbs16x2", "kind": "cpt", "ok": True, "tokens_per_s": 2.0},
               hf({"bf16-mbs8x4": {"tokens_per_s": 75.0}, "bf16-mbs16x2": {"error": "OOM"}})]
    now = [{"case": "cpt-kit-mbs16x2", "kind": "cpt", "ok": True, "tokens_per_s": 3.0},
           hf({"bf16-mbs16x2": {"tokens_per_s": 80.0}, "bf16-mbs2x16": {"tokens_per_s": 36.0}})]
    merged = bench.merge_cases(earlier, now)
    assert [r["case"] for r in merged] == ["cpt-kit-mbs8x4", "cpt-kit-mbs16x2", "hf-global32"]
    assert merged[1]["tokens_per_s"] == 3.0  # measured again: this run's figure
    assert merged[2]["results"] == {"bf16-mbs8x4": {"tokens_per_s": 75.0}, "bf16-mbs16x2": {"tokens_per_s": 80.0},
                                    "bf16-mbs2x16": {"tokens_per_s": 36.0}}
    assert bench.merge_cases([], now) == now
