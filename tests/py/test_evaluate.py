"""jacpt.evaluate: validation perplexity of base / CPT / LoRA on the sample's held-out split, real tiny models.

The data is the session's `jacpt data` run on the embedded sample (conftest.sample_data); the
models are the tiny HF model and perturbed copies of it (conftest.make_hf_chain).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import make_hf_chain

from jacpt import config, evaluate, runs, train

TOKENS = 300  # two full windows of cpt.seq_length=128 (tiny-cpu) and a short one of 44


@pytest.fixture(scope="module")
def data_root(sample_data) -> Path:
    return Path(sample_data["megatron"]["validation"]["prefix_path"]).parents[2]  # <root>/tiny-cpu/megatron/...


@pytest.fixture(scope="module")
def chain_root(tmp_path_factory, tiny_model_dir) -> Path:
    return make_hf_chain(tmp_path_factory.mktemp("eval-runs"), tiny_model_dir)


@pytest.fixture
def kit(monkeypatch, data_root, chain_root):
    monkeypatch.setenv("JACPT_DATA_DIR", str(data_root))
    monkeypatch.setenv("JACPT_RUNS_DIR", str(chain_root))
    return chain_root


def cfg_for(*overrides: str) -> config.Config:
    return config.load("tiny-cpu", [f"eval.max_val_tokens={TOKENS}", *overrides], env={})


def stream(sample_data) -> np.ndarray:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(sample_data["megatron"]["validation"]["prefix_path"])
    return np.concatenate([np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))])


@pytest.fixture(scope="module")
def first_eval(data_root, chain_root):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JACPT_DATA_DIR", str(data_root))
        mp.setenv("JACPT_RUNS_DIR", str(chain_root))
        marker = evaluate.eval_stage(cfg_for(), dry_run=False)
    return marker


# ----------------------------------------------------------------------------- windows

@pytest.mark.parametrize("limit", [0, 1, 128, 129, TOKENS])
def test_windows_predict_every_token_once_in_order(sample_data, limit):
    prefix = sample_data["megatron"]["validation"]["prefix_path"]
    toks = stream(sample_data)
    assert toks[-1] == sample_data["tokenizer"]["eos_id"]  # documents keep their eos
    wins = list(evaluate.token_windows(prefix, 128, limit))
    assert all(2 <= len(w) <= 129 for w in wins) and all(len(w) == 129 for w in wins[:-1])
    n = limit or len(toks) - 1
    assert sum(len(w) - 1 for w in wins) == n
    assert np.array_equal(np.concatenate([w[1:] for w in wins]), toks[1:n + 1])  # targets: each token once
    assert np.array_equal(np.concatenate([w[:-1] for w in wins]), toks[:n])


def test_batches_group_full_windows_and_keep_a_short_one_alone():
    wins = [np.zeros(5)] * 5 + [np.zeros(3)]
    assert [len(b) for b in evaluate.batches(iter(wins), 4, 2)] == [2, 2, 1, 1]


# ----------------------------------------------------------------------------- the stage

def test_eval_writes_a_row_per_model_with_perplexity_exp_mean_nll(first_eval, chain_root, capsys):
    done = json.loads(first_eval.read_text(encoding="utf-8"))
    doc = json.loads((first_eval.parent / "eval.json").read_text(encoding="utf-8"))
    assert doc["format"] == 1 and doc["device"] == "cpu" and doc["dtype"] == "float32"
    assert doc["settings"] == {"max_val_tokens": TOKENS, "seq_length": 128}
    assert [r["label"] for r in doc["results"]] == ["base", "CPT", "LoRA"]
    for r in doc["results"]:
        assert r["tokens"] == TOKENS and r["seconds"] > 0
        assert math.isclose(r["perplexity"], math.exp(r["mean_nll"]), rel_tol=1e-12)
        assert 5 < r["mean_nll"] < 20  # a random tiny model over a 151,936-token vocabulary: ~ln(151936) = 11.9
        assert done["perplexity"][r["key"]] == r["perplexity"]
    assert len({r["perplexity"] for r in doc["results"]}) == 3  # three different models
    md = (first_eval.parent / "eval.md").read_text(encoding="utf-8")
    assert "| model | tokens scored | mean NLL | perplexity |" in md
    assert sum(md.count(f"| {label} | 300 |") for label in ("base", "CPT", "LoRA")) == 3


def test_perplexity_matches_transformers_own_loss(sample_data, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from jacpt.generate import load_hf

    prefix = sample_data["megatron"]["validation"]["prefix_path"]
    toks = torch.from_numpy(stream(sample_data))
    model, _ = load_hf(tiny_model_dir, "cpu")
    got = evaluate.score(model, evaluate.token_windows(prefix, 128, TOKENS), 128, "cpu")
    ref_model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32)
    with torch.no_grad():  # transformers' own shifted mean loss, window by window
        ref = sum(ref_model(toks[s:e + 1][None], labels=toks[s:e + 1][None]).loss.item() * (e - s)
                  for s, e in ((0, 128), (128, 256), (256, TOKENS)))
    assert got["tokens"] == TOKENS
    assert math.isclose(got["nll_sum"] / TOKENS, ref / TOKENS, rel_tol=1e-5)


def test_same_model_twice_gives_the_same_perplexity(tmp_path, monkeypatch, data_root, tiny_model_dir, capsys):
    monkeypatch.setenv("JACPT_DATA_DIR", str(data_root))
    monkeypatch.setenv("JACPT_RUNS_DIR", str(make_hf_chain(tmp_path, tiny_model_dir, lora_same_as_cpt=True)))
    doc = json.loads((evaluate.eval_stage(cfg_for("eval.max_val_tokens=128"), dry_run=False).parent
                      / "eval.json").read_text(encoding="utf-8"))
    cpt, lora = doc["results"][1], doc["results"][2]
    assert cpt["path"] == lora["path"]
    assert cpt["perplexity"] == lora["perplexity"] and cpt["mean_nll"] == lora["mean_nll"]


def test_second_eval_is_up_to_date_and_settings_make_a_new_run(first_eval, kit, capsys):
    again = evaluate.eval_stage(cfg_for(), dry_run=False)
    cap = capsys.readouterr()
    assert again == first_eval and f"up to date: {first_eval.parent}" in cap.err
    assert "perplexity" in cap.out and "LoRA" in cap.out  # the stored table is shown again
    other = evaluate.eval_stage(cfg_for("eval.max_val_tokens=64"), dry_run=False)
    assert other.parent != first_eval.parent
    assert json.loads((other.parent / "eval.json").read_text())["results"][0]["tokens"] == 64


def test_missing_export_is_a_clear_error(tmp_path, monkeypatch, data_root, tiny_model_dir):
    monkeypatch.setenv("JACPT_DATA_DIR", str(data_root))
    monkeypatch.setenv("JACPT_RUNS_DIR", str(make_hf_chain(tmp_path, tiny_model_dir, export=False)))
    with pytest.raises(train.StageError, match=r"no complete export run .*run `make export PROFILE=tiny-cpu` first"):
        evaluate.eval_stage(cfg_for(), dry_run=False)


def test_missing_data_names_make_data(tmp_path, monkeypatch, chain_root):
    monkeypatch.setenv("JACPT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("JACPT_RUNS_DIR", str(chain_root))
    with pytest.raises(train.StageError, match="run `make data PROFILE=tiny-cpu`"):
        evaluate.eval_stage(cfg_for(), dry_run=True)


def test_dry_run_loads_nothing_and_writes_the_plan(kit, monkeypatch, capsys):
    def refuse(*a, **k):
        raise AssertionError("a dry run loaded a model")

    monkeypatch.setattr(evaluate, "load_hf", refuse)
    monkeypatch.setattr(evaluate, "score", refuse)
    out_path = evaluate.eval_stage(cfg_for(), dry_run=True)
    out = capsys.readouterr().out
    assert out_path == kit / "tiny-cpu" / "eval-dry-run" / "plan.json"
    plan = json.loads(out_path.read_text(encoding="utf-8"))
    assert [m["key"] for m in plan["models"]] == ["base", "cpt", "lora"]
    for m in plan["models"]:
        assert m["path"] in out
    assert plan["data"]["prefix"] in out and f"up to {TOKENS} tokens in windows of 128" in out
    assert not (out_path.parent / runs.MARKER).exists()


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU: eval scores in bf16 there")
def test_eval_on_gpu_is_bf16_and_close_to_fp32(kit, sample_data, tiny_model_dir):
    from jacpt.generate import load_hf

    doc = json.loads((evaluate.eval_stage(cfg_for("eval.max_val_tokens=256"), dry_run=False).parent
                      / "eval.json").read_text(encoding="utf-8"))
    assert doc["device"] == "cuda" and doc["dtype"] == "bfloat16"
    prefix = sample_data["megatron"]["validation"]["prefix_path"]
    ref = evaluate.score(load_hf(tiny_model_dir, "cpu")[0], evaluate.token_windows(prefix, 128, 256), 128, "cpu")
    base = doc["results"][0]
    assert base["tokens"] == ref["tokens"] == 256
    assert math.isclose(base["mean_nll"], ref["nll_sum"] / 256, rel_tol=2e-2)  # bf16 body, fp32 head and loss
