"""jacpt.evaluate: the base / CPT / LoRA evaluation table on the sample's held-out split, real tiny models.

The data is the session's `jacpt data` run on the embedded sample (conftest.sample_data); the
models are the tiny HF model and perturbed copies of it (conftest.make_hf_chain), whose export
directories get a model card and SHA256SUMS here, as `jacpt export` writes them. The tiny models
are random, so the scores are noise: the tests hold the table's shape and consistency, not values.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_hf_chain

from jacpt import config, evaluate, metrics, runs, train
from jacpt.export import write_sums
from jacpt.fsutil import sha256_file

TOKENS = 300  # two full windows of cpt.seq_length=128 (tiny-cpu) and a short one of 44
EXAMPLES = 4  # tiny-cpu's eval.max_examples, of the sample's 8 test examples
OFFLINE = {"WANDB_MODE": "offline"}  # the first eval logs to wandb, offline; the others run with wandb disabled
CARD = "# exported model\n\nThe card `jacpt export` writes.\n"
ANSWER_KEYS = {"text", "new_tokens", "latency_s", "chars", "ja_share", "kana", "japanese", "loop", "repeat", "exact",
               "chrf", "bleu"}


@pytest.fixture(scope="module")
def data_root(sample_data) -> Path:
    return Path(sample_data["megatron"]["validation"]["prefix_path"]).parents[2]  # <root>/tiny-cpu/megatron/...


def with_cards(root: Path) -> Path:
    """Give the fake export's model dirs the card and SHA256SUMS that `jacpt export` writes."""
    for d in (root / "tiny-cpu").glob("export-*/hf/*"):
        (d / "README.md").write_text(CARD, encoding="utf-8")
        write_sums(d)
    return root


@pytest.fixture(scope="module")
def chain_root(tmp_path_factory, tiny_model_dir) -> Path:
    return with_cards(make_hf_chain(tmp_path_factory.mktemp("eval-runs"), tiny_model_dir))


@pytest.fixture
def kit(monkeypatch, data_root, chain_root):
    monkeypatch.setenv("JACPT_DATA_DIR", str(data_root))
    monkeypatch.setenv("JACPT_RUNS_DIR", str(chain_root))
    return chain_root


def cfg_for(*overrides: str, env: dict | None = None) -> config.Config:
    """tiny-cpu with wandb off (fast) unless `env` says otherwise, as WANDB_MODE=offline does."""
    return config.load("tiny-cpu", [f"eval.max_val_tokens={TOKENS}", *overrides], env=env or {"WANDB_MODE": "disabled"})


def stream(sample_data) -> np.ndarray:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(sample_data["megatron"]["validation"]["prefix_path"])
    return np.concatenate([np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))])


@pytest.fixture(scope="module")
def first_eval(data_root, chain_root):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JACPT_DATA_DIR", str(data_root))
        mp.setenv("JACPT_RUNS_DIR", str(chain_root))
        marker = evaluate.eval_stage(cfg_for(env=OFFLINE), dry_run=False)
    return marker


def export_dirs(root: Path) -> list[Path]:
    return sorted((root / "tiny-cpu").glob("export-*/hf/*"))


def sums_ok(d: Path) -> bool:
    sums = dict(reversed(line.split("  ", 1)) for line in (d / "SHA256SUMS").read_text().splitlines())
    files = sorted(p.name for p in d.iterdir() if p.is_file() and p.name != "SHA256SUMS")
    return sorted(sums) == files and all(sha256_file(d / n) == h for n, h in sums.items())


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
    assert doc["format"] == 2 and doc["device"] == "cpu" and doc["dtype"] == "float32"
    assert doc["settings"] == {"max_val_tokens": TOKENS, "seq_length": 128, "max_examples": EXAMPLES,
                               "max_new_tokens": 24, "batch_size": 16, "ja_threshold": 0.5, "repeat_unit": 4,
                               "repeat_times": 3}
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


def test_eval_json_has_every_metric_for_every_model_and_the_examples(first_eval):
    doc = json.loads((first_eval.parent / "eval.json").read_text(encoding="utf-8"))
    keys = [k for k, _, _ in metrics.ROWS]
    assert [m["key"] for m in doc["metrics"]] == keys
    test = doc["data"]["test"]
    assert test["examples"] == 8 and test["used"] == EXAMPLES and test["sha256"] == sha256_file(test["path"])
    assert doc["decoding"]["greedy"] is True and doc["decoding"]["template"] == "{input} {output}"
    assert "tok:char" in doc["decoding"]["bleu"]
    for r in doc["results"]:
        assert all(isinstance(r[k], (int, float)) for k in keys), r
        assert r["examples"] == EXAMPLES
        for k in ("exact_match", "ja_rate", "repeat_rate"):
            assert 0 <= r[k] <= 1
        assert 0 <= r["chrf"] <= 100 and 0 <= r["bleu"] <= 100
        answers = [ex["answers"][r["key"]] for ex in doc["examples"]]
        # the row is the mean over the per-example records
        assert r["new_tokens"] == sum(a["new_tokens"] for a in answers) and 0 < r["new_tokens"] <= EXAMPLES * 24
        assert r["mean_chars"] == pytest.approx(sum(a["chars"] for a in answers) / EXAMPLES)
        assert r["ja_rate"] == sum(a["japanese"] for a in answers) / EXAMPLES
        assert r["repeat_rate"] == sum(a["repeat"] for a in answers) / EXAMPLES
        assert r["exact_match"] == sum(a["exact"] for a in answers) / EXAMPLES
        assert r["latency_s"] == pytest.approx(sum(a["latency_s"] for a in answers) / EXAMPLES, abs=1e-3)
        assert r["gen_tokens_per_s"] == pytest.approx(r["new_tokens"] / r["generate_s"], rel=1e-2)
    lines = [json.loads(x) for x in Path(test["path"]).read_text(encoding="utf-8").splitlines()]
    assert [ex["id"] for ex in doc["examples"]] == [1, 2, 3, 4]  # line numbers in test.jsonl
    for ex in doc["examples"]:
        assert ex["input"] == lines[ex["id"] - 1]["input"].strip(" ")
        assert ex["reference"] == lines[ex["id"] - 1]["output"].strip(" ")
        assert set(ex["answers"]) == {"base", "cpt", "lora"}
        for a in ex["answers"].values():
            assert set(a) == ANSWER_KEYS and a["chars"] == len(a["text"]) and a["text"] == a["text"].strip()
            assert a["repeat"] == (metrics.find_loop(a["text"], 4, 3) is not None)
    ref = doc["reference"]  # the test references are Japanese sentences: the classifier's sanity check
    assert ref["examples"] == EXAMPLES and ref["ja_rate"] == 1.0 and ref["repeat_rate"] == 0.0
    done = json.loads(first_eval.read_text(encoding="utf-8"))
    assert done["examples"] == EXAMPLES and done["wandb"] == "offline"
    assert done["metrics"]["lora"]["chrf"] == doc["results"][2]["chrf"]


def test_the_table_is_printed_and_in_eval_md(first_eval, kit, capsys):
    doc = json.loads((first_eval.parent / "eval.json").read_text(encoding="utf-8"))
    header, rows = metrics.table(doc)
    assert header == ["metric", "base", "CPT", "LoRA", "reference"] and len(rows) == len(metrics.ROWS)
    md = (first_eval.parent / "eval.md").read_text(encoding="utf-8")
    for line in metrics.markdown_table(header, rows):
        assert line in md
    assert "## Answers" in md and md.count("<sub>[") == EXAMPLES * 3
    evaluate.eval_stage(cfg_for(env=OFFLINE), dry_run=False)  # up to date: prints the stored table
    out = capsys.readouterr().out
    assert metrics.text_table(header, rows) in out and "tokenize=char" in out
    assert max(len(line) for line in out.splitlines()) <= 100


def test_wandb_offline_run_has_the_table(first_eval):
    wandb_dir = first_eval.parent / "wandb" / "wandb"
    offline = list(wandb_dir.glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))
    tables = list(offline[0].glob("files/media/table/eval/*.table.json"))
    assert len(tables) == 2  # the metrics table and the answers
    got = {len(json.loads(t.read_text())["data"]): json.loads(t.read_text()) for t in tables}
    summary = got[len(metrics.ROWS)]
    assert summary["columns"] == ["metric", "base", "CPT", "LoRA", "reference"]
    assert got[EXAMPLES]["columns"] == ["id", "input", "reference", "base", "CPT", "LoRA"]


def test_model_cards_get_the_table_and_checksums_stay_true(first_eval, chain_root, tiny_model_dir):
    doc = json.loads((first_eval.parent / "eval.json").read_text(encoding="utf-8"))
    header, rows = metrics.table(doc)
    dirs = export_dirs(chain_root)
    assert [d.name for d in dirs] == ["cpt", "lora"]
    for d, label in zip(dirs, ("CPT", "LoRA")):
        card = (d / "README.md").read_text(encoding="utf-8")
        assert card.startswith(CARD) and card.count(evaluate.CARD_BEGIN) == card.count(evaluate.CARD_END) == 1
        assert "## Evaluation" in card and f"This model is the {label} column" in card
        assert all(line in card for line in metrics.markdown_table(header, rows))
        assert str(first_eval.parent) in card and sums_ok(d)
    assert not (tiny_model_dir / "README.md").exists()  # the base model's directory is not written to


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
    cards = {d: (d / "README.md").read_text(encoding="utf-8") for d in export_dirs(kit)}
    assert all(evaluate.CARD_BEGIN in c for c in cards.values())  # written by the first run
    again = evaluate.eval_stage(cfg_for(env=OFFLINE), dry_run=False)
    cap = capsys.readouterr()
    assert again == first_eval and f"up to date: {first_eval.parent}" in cap.err  # the cards did not count
    assert "perplexity" in cap.out and "LoRA" in cap.out  # the stored table is shown again
    assert {d: (d / "README.md").read_text(encoding="utf-8") for d in cards} == cards
    other = evaluate.eval_stage(cfg_for("eval.max_val_tokens=64", env=OFFLINE), dry_run=False)
    assert other.parent != first_eval.parent
    assert json.loads((other.parent / "eval.json").read_text())["results"][0]["tokens"] == 64
    for d in cards:  # the newest eval replaced the section; the card around it is kept
        card = (d / "README.md").read_text(encoding="utf-8")
        assert card.startswith(CARD) and card.count("## Evaluation") == 1 and str(other.parent) in card
        assert str(first_eval.parent) not in card and sums_ok(d)
    # Back to the first settings: still up to date, and its table is put back into the cards.
    assert evaluate.eval_stage(cfg_for(env=OFFLINE), dry_run=False) == first_eval
    assert {d: (d / "README.md").read_text(encoding="utf-8") for d in cards} == cards
    assert all(sums_ok(d) for d in cards)


def test_dir_identity_ignores_the_card_and_checksums_only(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"w")
    (tmp_path / "README.md").write_text("card")
    (tmp_path / "SHA256SUMS").write_text("")
    before = evaluate.dir_identity(tmp_path)
    assert set(before["files"]) == {"model.safetensors"}
    (tmp_path / "README.md").write_text("card, longer")
    assert evaluate.dir_identity(tmp_path) == before
    (tmp_path / "model.safetensors").write_bytes(b"w2")
    assert evaluate.dir_identity(tmp_path) != before


def test_with_section_replaces_only_between_the_markers():
    section = f"{evaluate.CARD_BEGIN}\n## Evaluation\nnew\n{evaluate.CARD_END}\n"
    old = f"# card\n\n{evaluate.CARD_BEGIN}\n## Evaluation\nold\n{evaluate.CARD_END}\n\n## Later\n"
    assert evaluate.with_section(old, section) == f"# card\n\n{section}## Later\n"
    assert evaluate.with_section("# card\n", section) == f"# card\n\n{section}"
    assert evaluate.with_section("", section) == section


NEMO_SFT = """
import json, sys
from pathlib import Path
from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer
from nemo.collections.llm.gpt.data.core import create_sft_dataset

path, tok_dir, idx = sys.argv[1:]
ds = create_sft_dataset(Path(path), tokenizer=AutoTokenizer(tok_dir), seq_length=256, memmap_workers=1,
                        index_mapping_dir=idx)
print(json.dumps([{k: [int(t) for t in ds[i][k]] for k in ("context_ids", "answer_ids", "input_ids")}
                  for i in range(len(ds))]))
"""


def test_prompts_are_what_lora_training_saw(sample_data, tokenizer_dir, tmp_path):
    """NeMo's own GPTSFTDataset (FineTuningDataModule's defaults) on the sample's test.jsonl: its context is the
    eval's prompt, tokenised as the eval tokenises it, and its answer is " " + the eval's reference. In a child
    process: importing NeMo here would leave it in this one (test_preflight checks that nothing imports it)."""
    from transformers import AutoTokenizer

    src = Path(sample_data["lora"]["dir_path"]) / "test.jsonl"
    (tmp_path / "test.jsonl").write_bytes(src.read_bytes())  # NeMo writes its index beside the file
    proc = subprocess.run([sys.executable, "-c", NEMO_SFT, str(tmp_path / "test.jsonl"), str(tokenizer_dir),
                           str(tmp_path / "idx")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    nemo = json.loads(proc.stdout.strip().splitlines()[-1])
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    examples = evaluate.read_examples(src, 0)
    assert len(nemo) == len(examples) == 8
    for ex, sample in zip(examples, nemo):
        assert tok(ex["input"], add_special_tokens=False)["input_ids"] == sample["context_ids"]
        assert tok(" " + ex["reference"], add_special_tokens=False)["input_ids"] == sample["answer_ids"]
        assert sample["input_ids"][-1] == tok.eos_token_id  # and the answer ends in eos, where generation stops


def test_batched_answers_equal_one_at_a_time(sample_data, tiny_model_dir):
    from jacpt.generate import load_hf

    model, tok = load_hf(tiny_model_dir, "cpu")
    prompts = [ex["input"] for ex in evaluate.read_examples(Path(sample_data["lora"]["dir_path"]) / "test.jsonl", 3)]
    prompts.append("日本の首都は")  # a much shorter prompt: the most left padding
    one, _ = evaluate.generate_answers(model, tok, prompts, 8, 1, "cpu")
    batched, secs = evaluate.generate_answers(model, tok, prompts, 8, 4, "cpu")
    assert [a.text for a in one] == [a.text for a in batched]
    assert [a.new_tokens for a in one] == [a.new_tokens for a in batched] == [8] * 4  # random: no eos
    assert len({a.latency_s for a in batched}) == 1 and batched[0].latency_s == pytest.approx(secs)


def test_missing_test_set_names_the_file_and_make_data(tmp_path, monkeypatch, data_root, chain_root):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data_root, copy)
    monkeypatch.setenv("JACPT_DATA_DIR", str(copy))
    monkeypatch.setenv("JACPT_RUNS_DIR", str(chain_root))
    test = copy / "tiny-cpu" / "lora" / "test.jsonl"
    test.write_text('{"input": "x"}\n', encoding="utf-8")
    with pytest.raises(train.StageError, match=rf"{test}:1: needs non-empty string field\(s\) output.*"
                                               r"run `make data PROFILE=tiny-cpu` again"):
        evaluate.eval_stage(cfg_for(), dry_run=True)
    test.unlink()
    with pytest.raises(train.StageError, match=rf"no LoRA test set {test}: .*run `make data PROFILE=tiny-cpu`"):
        evaluate.eval_stage(cfg_for(), dry_run=True)


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
