"""`jacpt preflight`: estimate arithmetic, the MBS suggestion, verdicts on this CPU box (fake GPUs injected),
and what each stage's `--stage` block checks and lets fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from jacpt import config, paths, preflight
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


@pytest.mark.parametrize("mbs", [1, 2, 4, 8, 16])
def test_cpt_memory_formula_for_qwen25_05b(mbs):
    params = 494_032_768
    tokens = mbs * 2048
    silu = 24 * 4864 * 2  # bytes a token the fused SwiGLU does not keep
    chunked = params * 18 + tokens * (1.26e6 - silu) + min(4096, tokens) * 151_936 * 7 + 2e9
    assert preflight.cpt_memory_bytes(params, mbs, 2048) == pytest.approx(chunked)
    assert preflight.cpt_memory_bytes(params, mbs, 2048, 4096) == pytest.approx(chunked)
    assert preflight.cpt_memory_bytes(params, mbs, 2048, 4096, fused_swiglu=False) == pytest.approx(
        chunked + tokens * silu)
    whole = params * 18 + tokens * (2.8e6 - silu) + 2e9
    assert preflight.cpt_memory_bytes(params, mbs, 2048, loss_chunk_tokens=0) == pytest.approx(whole)
    assert preflight.QWEN25_05B_PARAMS == params


def test_cpt_memory_formula_matches_the_measured_peaks():
    # make bench on an H100 (BENCHMARKS.md): peak allocated memory in GiB, loss in chunks of 4,096 tokens
    # (the kit) and whole (loss_chunk_tokens=0), SwiGLU fused (the kit) and Megatron-Core's. The estimate adds
    # CUDA context and slack on top, so it must sit above each peak, by less than 3 GB.
    p = preflight.QWEN25_05B_PARAMS
    for chunk, fused, peaks in ((4096, True, ((4, 20.22), (8, 28.06), (12, 35.92), (16, 43.76))),
                                (4096, False, ((4, 22.0), (8, 31.6), (16, 50.89))),
                                (0, False, ((4, 29.62), (8, 50.85)))):
        for mbs, gib in peaks:
            est = preflight.cpt_memory_bytes(p, mbs, 2048, chunk, fused)
            assert 0 < est - gib * GIB < 3e9, (chunk, fused, mbs, est / GIB)
    # LoRA, micro-batch 4 / 16 x 2048, loss in chunks, SwiGLU fused: 12.62 / 36.27 GiB (14.4 / 43.4 unfused)
    for mbs, fused, gib in ((4, True, 12.62), (16, True, 36.27), (4, False, 14.4), (16, False, 43.4)):
        assert 0 < preflight.lora_memory_bytes(p, mbs, 2048, 4096, fused) - gib * GIB < 3e9, (mbs, fused)
    assert preflight.lora_memory_bytes(p, 4, 1024, 0, False) == pytest.approx(p * 2 + 4 * 1024 * 2.8e6 + 2e9)


def test_the_profiles_micro_batches_fit_their_cards_with_headroom_and_twice_would_not():
    # 48 GB card: the RTX 6000 Ada's 47.5 GiB; 80 GB: the H100's 79.2 GiB. The profiles take the largest power of
    # two whose estimate stays within 90% of the card (room for fragmentation and a desktop's own use).
    p = preflight.QWEN25_05B_PARAMS
    for profile, vram in (("rtx6000ada-48g", 47.5 * GIB), ("h100-80g", 79.2 * GIB)):
        cfg = config.load(profile, env={})
        mbs, chunk, fused = cfg["cpt.micro_batch_size"], cfg["cpt.loss_chunk_tokens"], cfg["cpt.fused_swiglu"]
        assert preflight.cpt_memory_bytes(p, mbs, 2048, chunk, fused) < 0.9 * vram, profile
        assert preflight.cpt_memory_bytes(p, 2 * mbs, 2048, chunk, fused) > 0.9 * vram, profile


def test_measured_rates_are_the_committed_benchmarks_kit_rows():
    """The rates the estimates use are the kit's CPT rows at the kit's global batch in the results JSON that
    BENCHMARKS.md cites, not figures typed in separately."""
    from jacpt import paths

    doc = json.loads((paths.KIT_ROOT / "bench" / "results" / "2026-11-23-nvidia-h100-80gb-hbm3-loss-in-forward.json")
                     .read_text(encoding="utf-8"))
    rows = {r["mbs"]: round(r["tokens_per_s"]) for r in doc["cases"] if r["kind"] == "cpt" and r.get("ok")
            and r.get("variant") == "kit" and r["mbs"] * r.get("accum", 1) == 32}
    assert preflight.MEASURED_TOKENS_PER_S == rows
    lora = {r["mbs"]: r["tokens_per_s"] for r in doc["cases"] if r["kind"] == "lora" and r.get("ok")
            and r["mbs"] * r.get("accum", 1) == 32}
    assert preflight.MEASURED_LORA_FACTOR == {m: round(t / rows[m], 3) for m, t in lora.items()}
    assert doc["gpu"]["name"].startswith("NVIDIA H100")
    assert preflight.MEASURED_PEAK == doc["summary"]["peak_tflops"] * 1e12


def test_a_stage_at_another_sequence_length_takes_the_rate_of_as_many_tokens():
    assert preflight.equivalent_mbs(32, 1024) == 16 and preflight.equivalent_mbs(4, 1024) == 2
    f = preflight.MEASURED_LORA_FACTOR
    assert preflight.lora_factor(4) == f[4] and preflight.lora_factor(16) == f[16]
    assert preflight.lora_factor(10) == pytest.approx((f[4] + f[16]) / 2)
    assert preflight.lora_factor(1) == f[4] and preflight.lora_factor(64) == f[16]  # the ends past the ends


def test_measured_rate_interpolates_between_measured_micro_batches():
    t = preflight.MEASURED_TOKENS_PER_S
    assert preflight.measured_rate(4) == t[4]
    assert preflight.measured_rate(6) == pytest.approx((t[4] + t[8]) / 2)
    assert preflight.measured_rate(12) == pytest.approx((t[8] + t[16]) / 2)
    assert preflight.measured_rate(2) == t[2] and preflight.measured_rate(3) == pytest.approx((t[2] + t[4]) / 2)
    assert preflight.measured_rate(1) == pytest.approx(t[2] / 2)
    assert preflight.measured_rate(32) == t[16]


def test_largest_fitting_mbs():
    p = preflight.QWEN25_05B_PARAMS
    vram = preflight.cpt_memory_bytes(p, 4, 2048) + 1  # 4 fits, 5.. don't
    assert preflight.largest_fitting_mbs(p, 2048, vram, 16) == 4
    assert preflight.largest_fitting_mbs(p, 2048, vram - 2, 16) == 2  # 3 fits but does not divide 16
    assert preflight.largest_fitting_mbs(p, 2048, 5e9, 16) == 0


def test_mbs_too_large_for_the_gpu_fails_with_the_largest_that_fits(env, monkeypatch):
    gpu = preflight.Gpu("NVIDIA RTX 6000 Ada Generation", 24 * GIB, "8.9", "550.1")  # 25.8e9 bytes
    monkeypatch.setattr(preflight, "discover_gpus", lambda: [gpu])
    r = invoke("--profile", "h100-80g", "--json")  # mbs 16: ~48.9 GB
    assert r.exit_code == 1, r.output
    out = json.loads(r.output)
    want = preflight.largest_fitting_mbs(preflight.QWEN25_05B_PARAMS, 2048, 24 * GIB, 16)
    assert want == 4 and out["estimates"]["suggested_mbs"] == 4  # ~23.7 GB of the 25.8
    mem = next(c for c in out["checks"] if c["what"] == "memory")
    assert mem["status"] == "FAIL" and "make cpt MBS=4" in mem["detail"]
    # the time estimate scales the measured H100 figure (at the profile's mbs) by bf16 peak, labelled an estimate
    assert out["estimates"]["tokens_per_s"] == pytest.approx(preflight.MEASURED_TOKENS_PER_S[16] * 364.2 / 989)
    assert "estimate" in out["estimates"]["tokens_per_s_source"]


def test_h100_fits_and_uses_the_measured_throughput(env, monkeypatch):
    gpu = preflight.Gpu("NVIDIA H100 80GB HBM3", 80 * GIB, "9.0", "570.1")
    monkeypatch.setattr(preflight, "discover_gpus", lambda: [gpu])
    r = invoke("--profile", "h100-80g", "--json")
    out = json.loads(r.output)
    assert {c["what"]: c["status"] for c in out["checks"]}["memory"] == "ok"
    assert out["estimates"]["tokens_per_s"] == pytest.approx(preflight.MEASURED_TOKENS_PER_S[16])
    assert "measured" in out["estimates"]["tokens_per_s_source"]
    assert out["estimates"]["cpt_seconds"] == pytest.approx(100 * 32 * 2048 / preflight.MEASURED_TOKENS_PER_S[16])
    # the profile's LoRA micro-batch, 32 x 1024 tokens, holds the tokens of the measured 16 x 2048
    lora_rate = preflight.MEASURED_LORA_FACTOR[16] * preflight.MEASURED_TOKENS_PER_S[16]
    assert out["estimates"]["lora_tokens_per_s"] == pytest.approx(lora_rate)
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
    # the whole chain's runs: import (1 checkpoint) + CPT (last + save_top_k 1) + LoRA (2 adapter checkpoints of
    # dim 8, each 0.8% of the model + 16 MB of context) + export (2 HF models + the merged checkpoint, bf16)
    p = preflight.TINY_PARAMS
    lora = 2 * (16 * p * 0.008 + 16e6)
    assert out["disk"]["runs"]["need_bytes"] == int(16 * p + 2 * 16 * p + lora) + 6 * p


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
    # In a fresh interpreter: other tests in this one import NeMo.
    code = ("import sys; from click.testing import CliRunner; from jacpt.cli import cli; "
            "r = CliRunner().invoke(cli, ['preflight', '--profile', 'tiny-cpu']); "
            "print(r.exit_code, sorted(m for m in ('nemo', 'megatron.core') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(paths.KIT_ROOT / "py")})
    assert out.returncode == 0, out.stderr[-2000:]
    code, imported = out.stdout.strip().split(" ", 1)
    assert code in ("0", "1") and "nemo" not in imported and "megatron.core" not in imported, out.stdout


# ----------------------------------------------------------------------------- --stage: what each Make stage checks

STAGES = ("data", "import", "cpt", "lora", "export", "demo", "eval")


@pytest.fixture
def built(env, monkeypatch):
    """A tokenizer dir, as `make assets` leaves; a test adds the profile's data manifest with `manifest`."""
    tok = env / "tokenizer"
    tok.mkdir()
    monkeypatch.setenv("TOKENIZER_DIR", str(tok))
    return env


def manifest(env, profile):
    m = env / "data" / profile / "data_manifest.json"
    m.parent.mkdir(parents=True, exist_ok=True)
    m.write_text("{}")
    return m


def stage(name, *args):
    return invoke("--stage", name, *args)


def status_of(output, what):
    return next(x.split()[0] for x in output.splitlines() if x.split()[1:2] == [what])


def whats(output):
    """The check names of a report: its second column."""
    return {x.split()[1] for x in output.splitlines() if len(x.split()) > 1}


def test_stages_are_the_makefile_chain_and_a_bad_one_is_a_usage_error(env):
    chain = next(ln for ln in (paths.KIT_ROOT / "Makefile").read_text().splitlines()
                 if ln.startswith("CHAIN :="))
    assert preflight.STAGES == STAGES == tuple(chain.split(":=")[1].split())
    r = stage("train")
    assert r.exit_code == 2
    assert "'train' is not one of" in r.output and "'import'" in r.output


@pytest.mark.parametrize("name", STAGES)
def test_no_gpu_on_a_gpu_profile_is_fatal_only_for_training(built, name):
    manifest(built, "rtx6000ada-48g")
    r = stage(name, "--profile", "rtx6000ada-48g")
    gpu = next(x for x in r.output.splitlines() if x.split()[1:2] == ["gpu"])
    if name in ("cpt", "lora"):
        assert r.exit_code == 1, r.output
        assert gpu.startswith("FAIL") and f"make {name} on PROFILE=rtx6000ada-48g needs a GPU" in gpu
        assert "use PROFILE=tiny-cpu or run in the container on a GPU box" in gpu
    else:
        assert r.exit_code == 0, r.output
        # demo and eval fall back to transformers on the CPU: said, and a warning on a GPU profile
        assert gpu.split()[0] == ("warn" if name in ("demo", "eval") else "ok"), gpu
        assert ("transformers on the CPU" in gpu) == (name in ("demo", "eval")), gpu
        if name == "demo":
            assert "make export PROFILE=rtx6000ada-48g must have run" in gpu
    assert r.output.splitlines()[-1].split()[:2] == ["FAIL" if r.exit_code else "ok", "preflight"]


def test_no_gpu_is_fine_for_every_stage_on_tiny_cpu(built):
    manifest(built, "tiny-cpu")
    for name in STAGES:
        r = stage(name, "--profile", "tiny-cpu")
        assert r.exit_code == 0, (name, r.output)
        assert status_of(r.output, "gpu") == "ok"
        assert r.output.splitlines()[-1] == f"ok    preflight  ready for make {name} PROFILE=tiny-cpu"


def test_no_gpu_under_slurm_only_warns_the_submitting_host(built, monkeypatch):
    manifest(built, "h100-80g")
    monkeypatch.setenv("EXECUTOR", "slurm")
    r = stage("cpt", "--profile", "h100-80g")
    assert r.exit_code == 0, r.output
    assert status_of(r.output, "gpu") == "warn" and "launch.executor=slurm" in r.output
    monkeypatch.setenv("EXECUTOR", "local")
    assert stage("cpt", "--profile", "h100-80g").exit_code == 1


@pytest.mark.parametrize("name", STAGES)
def test_a_missing_data_manifest_is_fatal_only_where_the_stage_reads_it(built, name):
    r = stage(name, "--profile", "tiny-cpu")
    path = built / "data" / "tiny-cpu" / "data_manifest.json"
    if name in ("cpt", "lora", "eval"):
        assert r.exit_code == 1, r.output
        line = next(x for x in r.output.splitlines() if x.startswith("FAIL  data"))
        assert f"{path} missing" in line and f"make {name} reads" in line and "run make data PROFILE=tiny-cpu" in line
    else:
        assert r.exit_code == 0, r.output
        if name == "data":  # its own output: reported, never fatal
            assert status_of(r.output, "data") == "ok" and "this stage builds it" in r.output
        else:
            assert "data" not in whats(r.output)


def test_the_data_stage_needs_the_tokenizer_the_others_do_not(env, monkeypatch):
    monkeypatch.setenv("JACPT_ASSETS_DIR", str(env / "no-assets"))
    manifest(env, "tiny-cpu")
    r = stage("data")
    assert r.exit_code == 1, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("FAIL  tokenizer"))
    assert str(env / "no-assets" / "tokenizer") in line and "run make assets" in line
    monkeypatch.setenv("TOKENIZER_DIR", str(env / "nowhere"))
    assert "point TOKENIZER_DIR at a Qwen2.5 tokenizer directory" in stage("data").output
    for name in ("cpt", "lora", "eval"):
        assert stage(name).exit_code == 0


def _free(monkeypatch, free):
    usage = type(preflight.shutil.disk_usage("/"))
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(10**15, 10**15 - free, free))


@pytest.mark.parametrize("name", STAGES)
def test_each_stage_checks_its_own_disk_need_in_its_own_dir(built, monkeypatch, name):
    manifest(built, "rtx6000ada-48g")
    p = preflight.QWEN25_05B_PARAMS
    cfg = config.load("rtx6000ada-48g", ("cpt.save_top_k=2", "lora.dim=16"))
    expect = {"import": 16 * p, "cpt": 3 * 16 * p, "lora": int(2 * (16 * p * 0.016 + 16e6)), "export": 6 * p,
              "demo": 0, "eval": 0, "data": 0}[name]  # data: the manifest is built, nothing new to write
    need, why = preflight.stage_need_bytes(cfg, name)
    assert need == pytest.approx(expect) and why
    where = built / ("data" if name == "data" else "runs")
    monkeypatch.setattr(preflight, "discover_gpus", lambda: [preflight.Gpu("NVIDIA H100 80GB HBM3", 80 * GIB)])
    args = ("--profile", "rtx6000ada-48g", "cpt.save_top_k=2", "lora.dim=16", "--json")
    _free(monkeypatch, need)
    out = json.loads(stage(name, *args).output)
    assert out["ok"], out["checks"]
    assert out["stage"] == name and out["disk"] == {where.name: {"dir": str(where), "need_bytes": need,
                                                                 "free_bytes": need, "writable": True}}
    if not need:
        return
    _free(monkeypatch, need - 1)
    r = stage(name, *args[:-1])
    assert r.exit_code == 1, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("FAIL  disk"))
    assert f"make {name} needs ~" in line and str(where) in line
    assert ("JACPT_DATA_DIR" if name == "data" else "JACPT_RUNS_DIR") in line and "free space" in line


def test_the_data_stage_needs_the_download_until_the_data_is_built(built, monkeypatch):
    env = built
    cfg = config.load("rtx6000ada-48g", ("data.shards=0-13",))
    assert preflight.stage_need_bytes(cfg, "data") == (preflight.LLMJP_BYTES_ALL, "the ja_wiki download and its tokens")
    _free(monkeypatch, 10**9)
    r = stage("data", "--profile", "rtx6000ada-48g", "data.shards=0-13")
    assert r.exit_code == 1 and "make data needs ~5.0 GB free in " + str(env / "data") in r.output
    assert "not ready for make data PROFILE=rtx6000ada-48g: fix the FAIL line above" in r.output
    manifest(env, "rtx6000ada-48g")
    assert stage("data", "--profile", "rtx6000ada-48g").exit_code == 0


@pytest.mark.parametrize("name", STAGES)
def test_an_unwritable_dir_fails_only_the_stages_that_write_there(built, monkeypatch, name):
    manifest(built, "tiny-cpu")
    real = preflight.writable
    for locked, var in (("data", "JACPT_DATA_DIR"), ("runs", "JACPT_RUNS_DIR")):
        monkeypatch.setattr(preflight, "writable", lambda p, d=built / locked: False if p == d else real(p))
        r = stage(name)
        writes_there = (name == "data") == (locked == "data")
        assert r.exit_code == (1 if writes_there else 0), (locked, r.output)
        if writes_there:
            line = next(x for x in r.output.splitlines() if x.startswith("FAIL"))
            assert f"{locked} dir" in line and f"{built / locked} is not writable" in line and var in line


@pytest.mark.parametrize("name,other", [("cpt", "lora"), ("lora", "cpt")])
def test_gpu_memory_is_checked_for_the_training_stage_that_runs(built, monkeypatch, name, other):
    manifest(built, "h100-80g")
    p = preflight.QWEN25_05B_PARAMS
    # between LoRA's estimate at micro-batch 1 and CPT's at 1: LoRA fits at a smaller micro-batch, CPT not at all
    vram = (preflight.lora_memory_bytes(p, 2, 1024) + preflight.cpt_memory_bytes(p, 1, 2048)) / 2
    assert preflight.lora_memory_bytes(p, 4, 1024) > vram  # the profile's LoRA micro-batch 4 does not fit
    monkeypatch.setattr(preflight, "discover_gpus", lambda: [preflight.Gpu("NVIDIA H100 80GB HBM3", int(vram))] * 2)
    r = stage(name, "--profile", "h100-80g", "--json")
    assert r.exit_code == 1
    out = json.loads(r.output)
    mem = next(c for c in out["checks"] if c["what"] == "memory")
    assert mem["status"] == "FAIL" and mem["detail"].startswith("CPT" if name == "cpt" else "LoRA")
    if name == "cpt":
        assert "even micro-batch 1 does not fit" in mem["detail"] and "cpt.seq_length" in mem["detail"]
        assert out["estimates"]["suggested_mbs"] == 0
    else:
        assert 'make lora OVERRIDES="lora.micro_batch_size=2"' in mem["detail"]
        assert out["estimates"]["suggested_mbs"] == 2
    assert f"{other}_memory_bytes" not in out["estimates"]
    for rest in ("data", "import", "export", "demo", "eval"):  # the same GPU does not stop the other stages
        r = stage(rest, "--profile", "h100-80g")
        assert r.exit_code == 0 and "memory" not in whats(r.output), r.output


def test_training_stage_time_estimate_is_the_stages_own(built, monkeypatch):
    manifest(built, "h100-80g")
    monkeypatch.setattr(preflight, "discover_gpus", lambda: [preflight.Gpu("NVIDIA H100 80GB HBM3", 80 * GIB)])
    cpt = json.loads(stage("cpt", "--profile", "h100-80g", "--json").output)["estimates"]
    assert cpt["cpt_tokens_per_s"] == pytest.approx(preflight.MEASURED_TOKENS_PER_S[16]) and "lora_seconds" not in cpt
    assert cpt["cpt_seconds"] == pytest.approx(100 * 32 * 2048 / preflight.MEASURED_TOKENS_PER_S[16])
    lora = json.loads(stage("lora", "--profile", "h100-80g", "--json").output)["estimates"]
    lora_rate = preflight.MEASURED_LORA_FACTOR[16] * preflight.MEASURED_TOKENS_PER_S[16]  # 32 x 1024 tokens
    assert lora["lora_tokens_per_s"] == pytest.approx(lora_rate) and "cpt_seconds" not in lora


def test_a_stage_block_is_short_and_the_full_report_is_unchanged(built):
    manifest(built, "tiny-cpu")
    full = invoke("--profile", "tiny-cpu")
    assert full.exit_code == 0
    assert full.output.splitlines()[-2:] == ["", "ok    ready: this box can run PROFILE=tiny-cpu"]
    assert "stage" not in json.loads(invoke("--profile", "tiny-cpu", "--json").output)
    for name in STAGES:
        lines = stage(name, "--profile", "tiny-cpu").output.splitlines()
        assert 3 <= len(lines) <= 7 and "" not in lines, lines
        assert all(x.split()[0] in ("ok", "warn") for x in lines), lines
        assert not whats("\n".join(lines)) & {"memory", "time", "transformer-engine"}, lines
        assert ("wandb" in whats("\n".join(lines))) == (name in ("cpt", "lora", "export", "eval"))
