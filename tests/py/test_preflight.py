"""`jacpt preflight`: estimate arithmetic, the MBS suggestion, verdicts on this CPU box (fake GPUs injected)."""

from __future__ import annotations

import json
import os
import sys

import pytest
from click.testing import CliRunner

from jacpt import config, preflight
from jacpt.cli import cli

GIB = 2**30


@pytest.fixture
def env(monkeypatch, tmp_path):
    """Data and runs dirs in tmp, none of the caller's knobs, no real GPU discovery."""
    monkeypatch.setenv("JACPT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("JACPT_RUNS_DIR", str(tmp_path / "runs"))
    for spec in config.KEYS.values():
        if spec.env:
            monkeypatch.delenv(spec.env, raising=False)
    for var in ("PROFILE", "DRY_RUN", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(preflight, "discover_gpus", lambda: [])
    monkeypatch.setattr(preflight, "_nvidia_smi", lambda: [])
    return tmp_path


def invoke(*args):
    return CliRunner().invoke(cli, ["preflight", *args])


@pytest.mark.parametrize("mbs", [1, 2, 4, 8])
def test_cpt_memory_formula_for_qwen25_05b(mbs):
    params = 494_032_768
    expected = params * 18 + mbs * 2048 * 2.8e6 + 2e9
    assert preflight.cpt_memory_bytes(params, mbs, 2048) == pytest.approx(expected)
    assert preflight.QWEN25_05B_PARAMS == params


def test_cpt_memory_formula_matches_the_measured_peaks():
    # make bench on an H100 (BENCHMARKS.md): peak allocated 29.62 / 50.85 GiB at micro-batch 4 / 8.
    # The estimate adds CUDA context and slack on top, so it must sit above each peak, by less than 3 GB.
    p = preflight.QWEN25_05B_PARAMS
    for mbs, gib in ((4, 29.62), (8, 50.85)):
        est = preflight.cpt_memory_bytes(p, mbs, 2048)
        assert 0 < est - gib * GIB < 3e9, (mbs, est / GIB)
    assert preflight.lora_memory_bytes(p, 4, 1024) == pytest.approx(p * 2 + 4 * 1024 * 2.8e6 + 2e9)


def test_measured_rate_interpolates_between_measured_micro_batches():
    t = preflight.MEASURED_TOKENS_PER_S
    assert preflight.measured_rate(4) == t[4]
    assert preflight.measured_rate(6) == pytest.approx((t[4] + t[8]) / 2)
    assert preflight.measured_rate(1) == pytest.approx(t[4] / 4)
    assert preflight.measured_rate(16) == t[8]


def test_largest_fitting_mbs():
    p = preflight.QWEN25_05B_PARAMS
    vram = preflight.cpt_memory_bytes(p, 4, 2048) + 1  # 4 fits, 5.. don't
    assert preflight.largest_fitting_mbs(p, 2048, vram, 16) == 4
    assert preflight.largest_fitting_mbs(p, 2048, vram - 2, 16) == 2  # 3 fits but does not divide 16
    assert preflight.largest_fitting_mbs(p, 2048, 5e9, 16) == 0


def test_mbs_too_large_for_the_gpu_fails_with_the_largest_that_fits(env, monkeypatch):
    gpu = preflight.Gpu("NVIDIA RTX 6000 Ada Generation", 24 * GIB, "8.9", "550.1")  # 25.8e9 bytes
    monkeypatch.setattr(preflight, "discover_gpus", lambda: [gpu])
    r = invoke("--profile", "h100-80g", "--json")  # mbs 8: ~56.8 GB
    assert r.exit_code == 1, r.output
    out = json.loads(r.output)
    want = preflight.largest_fitting_mbs(preflight.QWEN25_05B_PARAMS, 2048, 24 * GIB, 8)
    assert want == 2 and out["estimates"]["suggested_mbs"] == 2
    mem = next(c for c in out["checks"] if c["what"] == "memory")
    assert mem["status"] == "FAIL" and "make cpt MBS=2" in mem["detail"]
    # the time estimate scales the measured H100 figure (at the profile's mbs) by bf16 peak, labelled an estimate
    assert out["estimates"]["tokens_per_s"] == pytest.approx(64_377 * 364.2 / 989)
    assert "estimate" in out["estimates"]["tokens_per_s_source"]


def test_h100_fits_and_uses_the_measured_throughput(env, monkeypatch):
    gpu = preflight.Gpu("NVIDIA H100 80GB HBM3", 80 * GIB, "9.0", "570.1")
    monkeypatch.setattr(preflight, "discover_gpus", lambda: [gpu])
    r = invoke("--profile", "h100-80g", "--json")
    out = json.loads(r.output)
    assert {c["what"]: c["status"] for c in out["checks"]}["memory"] == "ok"
    assert out["estimates"]["tokens_per_s"] == pytest.approx(64_377) and "measured" in out["estimates"]["tokens_per_s_source"]
    assert out["estimates"]["cpt_seconds"] == pytest.approx(100 * 32 * 2048 / 64_377)
    assert out["estimates"]["lora_tokens_per_s"] == pytest.approx(0.76 * 47_226)  # lora mbs 4
    if out["versions"]["Transformer Engine"] == "absent":
        assert {c["what"]: c["status"] for c in out["checks"]}["transformer-engine"] == "warn"


def test_real_profile_without_a_gpu_fails(env):
    r = invoke("--profile", "rtx6000ada-48g")
    assert r.exit_code == 1, r.output
    assert "this profile needs a GPU; use PROFILE=tiny-cpu or run in the container on a GPU box" in r.output
    assert r.output.splitlines()[-1].startswith("FAIL")


def test_tiny_cpu_passes_here(env):
    r = invoke("--profile", "tiny-cpu")
    assert r.exit_code == 0, r.output
    for line in filter(None, r.output.splitlines()):
        assert line.split()[0] in ("ok", "warn"), line
    assert "make data PROFILE=tiny-cpu" in r.output  # the manifest is missing: a warning, not a failure


def test_json_has_the_keys(env):
    r = invoke("--profile", "tiny-cpu", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert {"profile", "ok", "verdict", "checks", "versions", "gpus", "disk", "estimates"} <= set(out)
    assert out["ok"] is True and out["profile"] == "tiny-cpu"
    assert {"NeMo", "Megatron-Core", "NeMo-Run", "torch", "Transformer Engine", "CUDA (torch)",
            "container"} <= set(out["versions"])
    assert set(out["disk"]) == {"data", "runs"}
    assert out["disk"]["runs"]["need_bytes"] == 2 * 16 * preflight.TINY_PARAMS + 4 * preflight.TINY_PARAMS


def test_unwritable_dir_fails_naming_it(env, monkeypatch):
    locked = env / "locked"
    locked.mkdir(mode=0o500)
    try:
        if os.access(locked, os.W_OK) or (hasattr(os, "geteuid") and os.geteuid() == 0):
            pytest.skip("running as root: chmod 0500 does not stop writes")
        monkeypatch.setenv("JACPT_RUNS_DIR", str(locked / "runs"))
        r = invoke("--profile", "tiny-cpu")
        assert r.exit_code == 1, r.output
        line = next(x for x in r.output.splitlines() if x.startswith("FAIL"))
        assert "runs dir" in line and str(locked / "runs") in line and "not writable" in line
    finally:
        locked.chmod(0o700)


def test_unwritable_data_dir_message(env, monkeypatch):
    # the same path as above without needing a non-root user: the writability probe says no for the data dir
    real = preflight.writable
    monkeypatch.setattr(preflight, "writable", lambda p: False if p == env / "data" else real(p))
    r = invoke("--profile", "tiny-cpu")
    assert r.exit_code == 1
    line = next(x for x in r.output.splitlines() if x.startswith("FAIL"))
    assert "data dir" in line and f"{env / 'data'} is not writable" in line and "JACPT_DATA_DIR" in line


def test_not_enough_disk_fails_with_the_need(env, monkeypatch):
    monkeypatch.setattr(preflight, "runs_need_bytes", lambda cfg: 10**18)
    r = invoke("--profile", "tiny-cpu")
    assert r.exit_code == 1
    assert "needs ~" in r.output and str(env / "runs") in r.output


@pytest.mark.parametrize("mode,expect", [("auto", "online"), ("offline", "offline"), ("disabled", "disabled")])
def test_wandb_mode_without_leaking_the_key(env, monkeypatch, mode, expect):
    monkeypatch.setenv("WANDB_API_KEY", "secret-value-123")
    r = invoke("--profile", "tiny-cpu", f"wandb.mode={mode}", "--json")
    assert "secret-value-123" not in r.output
    assert json.loads(r.output)["estimates"]["wandb_mode"] == expect
    r = invoke("--profile", "tiny-cpu", f"wandb.mode={mode}")
    assert "secret-value-123" not in r.output
    assert next(x.split() for x in r.output.splitlines() if x.split()[1:2] == ["wandb"])[2] == expect


def test_no_heavy_imports(env):
    invoke("--profile", "tiny-cpu")
    if "nemo.collections.llm" in sys.modules:
        pytest.skip("another test in this process imported NeMo already")
    assert "nemo.collections.llm" not in sys.modules
