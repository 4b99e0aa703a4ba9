"""Shared fixtures: the embedded assets and one prepared sample data set, built once per session."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from jacpt import assets, config, data, paths


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return assets.build_tokenizer(tmp_path_factory.mktemp("assets") / "tokenizer")


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer_dir) -> Path:
    return assets.build_tiny_model(tokenizer_dir.parent / "tiny-qwen2", tokenizer_dir)


@pytest.fixture
def kit_env(monkeypatch, tmp_path, tokenizer_dir):
    """Data dir in tmp, assets from the session, and none of the caller's knobs leaking in."""
    monkeypatch.setenv("JACPT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("JACPT_ASSETS_DIR", str(tokenizer_dir.parent))
    for spec in config.KEYS.values():
        if spec.env:
            monkeypatch.delenv(spec.env, raising=False)
    monkeypatch.delenv("PROFILE", raising=False)
    monkeypatch.delenv("DRY_RUN", raising=False)
    return tmp_path


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory, tokenizer_dir) -> dict:
    """`jacpt data` on the embedded sample (profile tiny-cpu), run once; returns the loaded manifest."""
    root = tmp_path_factory.mktemp("sample-data")
    old = {k: os.environ.get(k) for k in ("JACPT_DATA_DIR", "JACPT_ASSETS_DIR")}
    os.environ["JACPT_DATA_DIR"], os.environ["JACPT_ASSETS_DIR"] = str(root), str(tokenizer_dir.parent)
    try:
        cfg = config.load("tiny-cpu", env={})
        manifest = data.load_manifest(data.run(cfg))
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return manifest


def sample_texts() -> list[str]:
    out = []
    for name in ("validation_0.jsonl.gz", "train_0.jsonl.gz", "train_1.jsonl.gz"):
        with gzip.open(paths.SAMPLE_DIR / name, "rt", encoding="utf-8") as f:
            out += [json.loads(line)["text"] for line in f]
    return out


def write_jsonl(path: Path, records, gz: bool = False) -> Path:
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(body) if gz else body)
    return path
