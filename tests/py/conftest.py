"""Shared fixtures: the embedded assets and one prepared sample data set, built once per session."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from jacpt import assets, config, data, paths, runs


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
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JACPT_DATA_DIR", str(root))
        mp.setenv("JACPT_ASSETS_DIR", str(tokenizer_dir.parent))
        return data.load_manifest(data.run(config.load("tiny-cpu", env={})))


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


def run_kit(args: list[str], env: dict, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m jacpt.cli ARGS` in a fresh process (NeMo stages never share a test process)."""
    proc = subprocess.run([sys.executable, "-m", "jacpt.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=str(paths.KIT_ROOT))
    if check and proc.returncode != 0:
        raise AssertionError(f"jacpt {' '.join(args)} exited {proc.returncode}\n--- stderr (tail) ---\n"
                             + "\n".join(proc.stderr.splitlines()[-40:]))
    return proc


@pytest.fixture(scope="session")
def chain_env(tmp_path_factory, tiny_model_dir) -> dict:
    """Environment of an isolated kit: its own data, runs and NeMo-Run dirs; offline; the session's assets."""
    root = tmp_path_factory.mktemp("chain")
    # WANDB_MODE survives: where wandb is not installed, WANDB_MODE=disabled runs the chain without it.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JACPT_", "WANDB_")) or k == "WANDB_MODE"}
    for spec in config.KEYS.values():
        if spec.env and spec.env != "WANDB_MODE":
            env.pop(spec.env, None)
    env.update(JACPT_ASSETS_DIR=str(tiny_model_dir.parent), JACPT_DATA_DIR=str(root / "data"),
               JACPT_RUNS_DIR=str(root / "runs"), NEMORUN_HOME=str(root / "nemorun"), NEMO_HOME=str(root / "nemo"),
               HF_HOME=str(root / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PROFILE="tiny-cpu",
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.pop("DRY_RUN", None)
    return env


@pytest.fixture(scope="session")
def tiny_chain(chain_env) -> dict:
    """data -> import -> cpt -> lora -> export on the tiny model, once per session, offline.

    Returns {stage: COMPLETE.json contents + "dir"}.
    """
    out = {}
    for stage in ("data", "import", "cpt", "lora", "export"):
        proc = run_kit([stage], chain_env)
        marker = Path(proc.stdout.strip().splitlines()[-1])
        out[stage] = {"path": marker, "dir": marker.parent, "stderr": proc.stderr}
        if marker.name == "COMPLETE.json":
            out[stage].update(json.loads(marker.read_text(encoding="utf-8")))
    return out


# ----------------------------------------------------------------------------- HF-only chains (demo, eval)


def write_run(root: Path, name: str, outputs: dict | None, inputs: dict | None = None) -> Path:
    """A fake run dir `root/tiny-cpu/<name>` (name: <stage>-<stamp>); complete when `outputs` is given."""
    d = root / "tiny-cpu" / name
    d.mkdir(parents=True)
    stage = name.split("-")[0]
    (d / runs.RUN_JSON).write_text(json.dumps({"stage": stage, "profile": "tiny-cpu", "key": f"fixture-{stage}",
                                               "inputs": inputs or {}}), encoding="utf-8")
    if outputs is not None:
        (d / runs.MARKER).write_text(json.dumps({"stage": stage, "finished_utc": "2026-01-01T00:00:00Z",
                                                 **outputs}), encoding="utf-8")
    return d


def perturbed_copy(src: Path, dst: Path, seed: int) -> Path:
    """The tiny HF model with N(0, 0.02) added to every weight: another model, same architecture and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), torch_dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    model.to(torch.bfloat16).save_pretrained(str(dst), safe_serialization=True)
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copyfile(f, dst / f.name)
    return dst


def make_hf_chain(root: Path, tiny_model_dir: Path, export: bool = True, lora_same_as_cpt: bool = False) -> Path:
    """A runs root with a complete import (hf_dir = the tiny model) and, when `export`, a complete export."""
    write_run(root, "import-20260101-000000",
               {"stage": "import", "checkpoint": "model", "hf_dir": str(tiny_model_dir)})
    if export:
        d = write_run(root, "export-20260101-000200", {"stage": "export", "models": {
            "cpt": "hf/cpt", "lora": "hf/cpt" if lora_same_as_cpt else "hf/lora"}})
        perturbed_copy(tiny_model_dir, d / "hf" / "cpt", seed=1)
        if not lora_same_as_cpt:
            perturbed_copy(tiny_model_dir, d / "hf" / "lora", seed=2)
    return root


# ----------------------------------------------------------------------------- Megatron modules in-process

@pytest.fixture(scope="module")
def megatron_tp1(tmp_path_factory):
    """A one-process model-parallel world, as Megatron's modules expect; torn down afterwards."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    own = not dist.is_initialized()
    if own:  # a file rendezvous: no port to collide with another process
        store = tmp_path_factory.mktemp("dist") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    if own:
        dist.destroy_process_group()


@pytest.fixture
def no_cuda_rng(monkeypatch):
    """What Megatron's stock modules take from CUDA, on the CPU, where these comparisons run (GPU or not).

    Core attention forks the model-parallel CUDA RNG tracker around its (p=0) dropout: nothing random happens at
    p=0, so a null context is exact. Its score buffer comes from a global buffer on the current CUDA
    device: a plain CPU tensor of the same shape instead. Without a mask it builds the causal one
    on "cuda": the same triangle on the CPU.
    """
    import megatron.core.fusions.fused_softmax as fs
    import torch
    from megatron.core import parallel_state, tensor_parallel

    monkeypatch.setattr(fs, "get_default_causal_mask",
                        lambda sq: torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1))

    tracker = types.SimpleNamespace(fork=lambda *a, **k: contextlib.nullcontext())
    buffer = types.SimpleNamespace(get_tensor=lambda shape, dtype, name: torch.empty(shape, dtype=dtype))
    monkeypatch.setattr(tensor_parallel, "get_cuda_rng_tracker", lambda: tracker)
    monkeypatch.setattr(parallel_state, "get_global_memory_buffer", lambda: buffer)
