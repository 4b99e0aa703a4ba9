"""`jacpt preflight`: can this box run PROFILE? Versions, GPUs, disk, wandb, data; then a verdict.

Every line is `ok|warn|FAIL  <what>  <detail>`; a FAIL's detail names the fix. Without a stage it
checks the whole profile (`make preflight`). With `--stage NAME` (each Make stage target runs that
first) it prints a short block of the checks that stage depends on, and only those can fail it: a
CUDA GPU and its memory for cpt and lora on a GPU profile, the stage's own directory and free space,
the tokenizer for data, the data manifest for cpt, lora and eval. It imports nothing heavy (no
nemo.collections.llm): versions come from package metadata, GPUs from torch.cuda and nvidia-smi.
The memory and time figures are estimates from formulas fitted to `make bench` on an H100 without
Transformer Engine (BENCHMARKS.md); other GPUs are scaled by their bf16 peak and labelled as
estimates.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from jacpt import paths, runs
from jacpt.config import Config, data_parallel, parse_shards

# jacpt.data (numpy) is imported where it is used: the CLI imports this module at start for --stage's choices.

GB = 1e9
MB = 1e6

# Parameter counts (embeddings tied, as the import stage builds them).
QWEN25_05B_PARAMS = 494_032_768
TINY_PARAMS = 9_798_208

# Memory and throughput of Qwen2.5-0.5B (tied), seq 2048, bf16, one H100 without Transformer Engine, the
# kit's own path (SDPA attention, fused AdamW, loss in chunks of 4,096 tokens, compiled RoPE, the gradient
# norm without syncs, SwiGLU fused): `make bench`, BENCHMARKS.md and
# bench/results/2026-11-23-nvidia-h100-80gb-hbm3-swiglu.json. Peak allocated memory was 20.2 / 28.1 / 35.9 /
# 43.8 GiB at micro-batch 4 / 8 / 12 / 16. The constant is the training state, 18 bytes per parameter (bf16
# weights 2 + fp32 main weights 4 + Adam m and v 8 + the fp32 gradient buffer 4, distributed optimizer off), plus
# one chunk's logits and their gradient (~7 bytes per logit, 4.4 GB at 4,096 tokens); the slope is 1.03 MB per
# token: 1.26 MB with Megatron-Core's SwiGLU (22.0 / 31.6 / 50.9 GiB at 4 / 8 / 16 on 2026-11-22), which keeps
# silu's bf16 output too (24 layers x 4,864 x 2 bytes a token: 50.9 against 43.8 GiB at 16, measured back to back).
# With the loss not chunked (loss_chunk_tokens=0) the whole micro-batch's logits and fp32 softmax stay: 29.6 /
# 50.9 GiB at micro-batch 4 / 8 with Megatron-Core's SwiGLU, 2.78 MB per token and no chunk term. A saved
# checkpoint carries the state without the gradient buffer.
CPT_BYTES_PER_PARAM = 18
CKPT_BYTES_PER_PARAM = 16  # weights, main weights and Adam moments (14), rounded up for metadata and slack
LORA_BYTES_PER_PARAM = 2  # frozen bf16 weights; the adapters and their state are ~1% of that
EXPORT_BYTES_PER_PARAM = 3 * 2  # two HF exports (CPT, LoRA-merged) and the merged NeMo checkpoint, bf16
ACT_BYTES_PER_TOKEN = 1.26 * MB  # flat per token, Megatron-Core's SwiGLU; attention's share is small (flash)
WHOLE_LOGITS_ACT_BYTES_PER_TOKEN = 2.8 * MB  # the same with the loss not chunked (2.78 measured)
FUSED_SWIGLU_SAVES_PER_TOKEN = 24 * 4864 * 2  # silu's output, not kept by the fused SwiGLU (0.234 MB measured)
CHUNK_BYTES_PER_LOGIT = 7  # one chunk's bf16 logits, their gradient and the kernels' scratch
VOCAB = 151_936
CUDA_CONTEXT_BYTES = 2 * GB  # CUDA context, cuBLAS workspaces and allocator slack, not in the peak above

# Tokens/s measured at each CPT micro-batch of 2048-token samples at the kit's global batch of 32 samples
# (micro-batches accumulating to it, as `make cpt` trains; BENCHMARKS.md); between them the rate is interpolated,
# below them proportional, past them the largest. A stage at another sequence length takes the rate of the same
# tokens a micro-batch (LoRA's 32 x 1024 is read at 16). Other GPUs scale by dense bf16 peak (an estimate, and
# labelled so).
# LoRA (loss in chunks, SwiGLU and its update fused) ran at 0.86x CPT's rate at micro-batch 4, where the host is
# the limit, and 1.07x at 16 (its frozen base skips the weight gradients); between them interpolated.
MEASURED_SEQ = 2048
MEASURED_TOKENS_PER_S = {2: 32_744, 4: 68_990, 8: 114_941, 16: 121_820}
MEASURED_LORA_FACTOR = {4: 0.864, 16: 1.074}
MEASURED_PEAK = 989e12
MEASURED_SOURCE = "measured on an H100 without TE (make bench, BENCHMARKS.md)"

# ja_wiki from llm-jp: ~3 GB download + ~2 GB of tokens for all 15 files (14 train shards + validation_0).
LLMJP_BYTES_ALL = 5 * GB
LLMJP_FILES_ALL = 15
SAMPLE_BYTES = 5 * MB

# A LoRA checkpoint holds the adapters and their optimizer state only (the tiny chain's: 136 KB of weights/),
# plus the context/ every NeMo checkpoint carries (the tokenizer files and the config: 16 MB). Per unit of
# lora.dim the adapters are ~0.1% of the model: Qwen2.5-0.5B with adapters on all four linear layers has
# dim x 20,224 per layer, 15.5M (3.1%) at dim 32. The lora stage keeps the last checkpoint and the best one.
LORA_ADAPTER_SHARE_PER_DIM = 0.001
CKPT_CONTEXT_BYTES = 16 * MB
LORA_CKPTS_KEPT = 2

# `--stage`: the Make stage targets, in chain order (the Makefile's CHAIN), and what each depends on.
STAGES = ("data", "import", "cpt", "lora", "export", "demo", "eval")
TRAIN_STAGES = ("cpt", "lora")  # a GPU profile cannot train without CUDA
READS_DATA = ("cpt", "lora", "eval")  # they read the data manifest
LOGS_WANDB = ("cpt", "lora", "export", "eval")


@dataclass
class Gpu:
    name: str
    vram_bytes: int
    capability: str = ""
    driver: str = ""


@dataclass
class Check:
    status: str  # ok | warn | FAIL
    what: str
    detail: str


@dataclass
class Report:
    profile: str
    checks: list[Check] = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    gpus: list[dict] = field(default_factory=list)
    disk: dict = field(default_factory=dict)
    estimates: dict = field(default_factory=dict)
    stage: str | None = None  # None: the whole profile

    def add(self, status: str, what: str, detail: str) -> None:
        self.checks.append(Check(status, what, detail))

    @property
    def ok(self) -> bool:
        return not any(c.status == "FAIL" for c in self.checks)

    def verdict(self) -> str:
        fails = [c for c in self.checks if c.status == "FAIL"]
        which = f"the FAIL line{'s' if len(fails) > 1 else ''} above"
        if self.stage:
            target = f"make {self.stage} PROFILE={self.profile}"
            return f"ready for {target}" if not fails else f"not ready for {target}: fix {which}"
        if not fails:
            return f"ready: this box can run PROFILE={self.profile}"
        return f"not ready for PROFILE={self.profile}: fix {which}"

    def as_dict(self) -> dict:
        return {"profile": self.profile, **({"stage": self.stage} if self.stage else {}), "ok": self.ok,
                "verdict": self.verdict(), "checks": [asdict(c) for c in self.checks], "versions": self.versions,
                "gpus": self.gpus, "disk": self.disk, "estimates": self.estimates}

    def text(self) -> str:
        """The whole profile: every check, a blank line, the verdict. A stage: a block, the verdict its last line."""
        status = "ok" if self.ok else "FAIL"
        if self.stage:
            checks = self.checks + [Check(status, "preflight", self.verdict())]
            width = max(len(c.what) for c in checks)
            return "\n".join(f"{c.status:<4}  {c.what:<{width}}  {c.detail}" for c in checks)
        width = max((len(c.what) for c in self.checks), default=0)
        lines = [f"{c.status:<4}  {c.what:<{width}}  {c.detail}" for c in self.checks]
        return "\n".join(lines + ["", f"{status:<4}  " + self.verdict()])


# ----------------------------------------------------------------------------- discovery (monkeypatched in tests)

def _nvidia_smi() -> list[list[str]]:
    """Rows of name, memory.total, driver_version; [] when nvidia-smi is absent or fails."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return [[f.strip() for f in line.split(",")] for line in out.stdout.splitlines() if line.strip()]


def discover_gpus() -> list[Gpu]:
    """The CUDA GPUs torch can use, with the driver from nvidia-smi when present."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.cuda's pynvml deprecation notice
        import torch
    if not torch.cuda.is_available():
        return []
    smi = _nvidia_smi()
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        driver = smi[i][2] if i < len(smi) and len(smi[i]) > 2 else ""
        gpus.append(Gpu(p.name, int(p.total_memory), f"{p.major}.{p.minor}", driver))
    return gpus


def _version(*dists: str) -> str | None:
    for d in dists:
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            pass
    return None


def versions() -> dict[str, str]:
    out = {}
    for label, dists, module in (("NeMo", ("nemo-toolkit",), "nemo"), ("Megatron-Core", ("megatron-core",), "megatron"),
                                 ("NeMo-Run", ("nemo-run",), "nemo_run"), ("torch", ("torch",), "torch"),
                                 ("Transformer Engine", ("transformer-engine", "transformer-engine-torch"),
                                  "transformer_engine")):
        v = _version(*dists)
        if v is None:
            v = "installed, version unknown" if importlib.util.find_spec(module) else "absent"
        out[label] = v
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch
        out["CUDA (torch)"] = torch.version.cuda or "none (CPU build)"
    except ImportError:
        out["CUDA (torch)"] = "unknown (no torch)"
    out["container"] = "yes (/opt/NeMo)" if Path("/opt/NeMo").exists() else "no"
    return out


# ----------------------------------------------------------------------------- estimates (pure arithmetic)

def is_tiny(cfg: Config) -> bool:
    return cfg.profile.startswith("tiny-")


def model_params(cfg: Config) -> int:
    return TINY_PARAMS if cfg["model.hf_dir"] == "tiny" else QWEN25_05B_PARAMS


def activation_bytes(tokens: int, loss_chunk_tokens: int, fused_swiglu: bool = True) -> float:
    """Activations of one micro-batch of `tokens`: flat per token (less silu's output with the fused SwiGLU),
    plus one loss chunk's logits when chunked."""
    saved = FUSED_SWIGLU_SAVES_PER_TOKEN if fused_swiglu else 0
    if loss_chunk_tokens == 0:
        return tokens * (WHOLE_LOGITS_ACT_BYTES_PER_TOKEN - saved)
    return (tokens * (ACT_BYTES_PER_TOKEN - saved)
            + min(loss_chunk_tokens, tokens) * VOCAB * CHUNK_BYTES_PER_LOGIT)


def cpt_memory_bytes(params: int, mbs: int, seq_length: int, loss_chunk_tokens: int = 4096,
                     fused_swiglu: bool = True) -> float:
    """Per GPU: weights + grads + optimizer state + activations + CUDA context."""
    return (params * CPT_BYTES_PER_PARAM + activation_bytes(mbs * seq_length, loss_chunk_tokens, fused_swiglu)
            + CUDA_CONTEXT_BYTES)


def lora_memory_bytes(params: int, mbs: int, seq_length: int, loss_chunk_tokens: int = 4096,
                      fused_swiglu: bool = True) -> float:
    return (params * LORA_BYTES_PER_PARAM + activation_bytes(mbs * seq_length, loss_chunk_tokens, fused_swiglu)
            + CUDA_CONTEXT_BYTES)


def largest_fitting_mbs(params: int, seq_length: int, vram_bytes: float, samples_per_gpu: int,
                        memory=cpt_memory_bytes) -> int:
    """The largest micro-batch whose estimate (CPT's, or `memory`'s) fits vram_bytes and that divides the samples
    each GPU takes per step (Megatron requires global batch % (micro-batch x data parallel) == 0); 0 when none fits."""
    best = 0
    for n in range(1, samples_per_gpu + 1):
        if samples_per_gpu % n == 0 and memory(params, n, seq_length) <= vram_bytes:
            best = n
    return best


def _interpolate(points: dict[float, float], x: float) -> float:
    """Piecewise-linear through the points; the end values past either end."""
    pts = sorted(points.items())
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def equivalent_mbs(mbs: int, seq_length: int) -> float:
    """The measured micro-batch (of MEASURED_SEQ tokens a sample) holding as many tokens."""
    return mbs * seq_length / MEASURED_SEQ


def measured_rate(mbs: float) -> float:
    """CPT tokens/s on the measured H100 at this micro-batch (interpolated between measured ones)."""
    smallest = min(MEASURED_TOKENS_PER_S)
    if mbs <= smallest:
        return MEASURED_TOKENS_PER_S[smallest] * mbs / smallest  # below the smallest: proportional (launch-bound)
    return _interpolate(MEASURED_TOKENS_PER_S, mbs)


def lora_factor(mbs: float) -> float:
    """LoRA's tokens/s over CPT's at the same micro-batch (measured at 4 and 16, interpolated between)."""
    return _interpolate(MEASURED_LORA_FACTOR, mbs)


def tokens_per_s(gpu_name: str, mbs: float = 4) -> tuple[float | None, str]:
    """(CPT tokens/s on one GPU of this kind at this micro-batch, label); None when there is no figure for it.

    Peaks are the benchmark's table (jacpt.bench.PEAK_TFLOPS, dense bf16)."""
    from jacpt import bench

    peak = bench.peak_tflops(gpu_name)
    if peak is None:
        return None, "no estimate (no measured or peak figure for this GPU)"
    tps = measured_rate(mbs) * peak * 1e12 / MEASURED_PEAK
    if bench.gpu_key(gpu_name) == "H100":  # the measured card (SXM)
        return tps, MEASURED_SOURCE + ("" if mbs in MEASURED_TOKENS_PER_S else ", interpolated")
    return tps, f"estimate: the H100 figure x {peak:g}/{MEASURED_PEAK / 1e12:.0f} TFLOPS bf16 peak"


def data_need_bytes(cfg: Config) -> int:
    """Free space the data stage still needs under the data dir."""
    from jacpt import data as data_mod

    if (data_mod.out_dir(cfg) / data_mod.MANIFEST).is_file():
        return 0  # built; a re-run with unchanged inputs writes nothing
    src = cfg["data.source"]
    if src == "sample":
        return int(SAMPLE_BYTES)
    if src == "llmjp":
        files = len(parse_shards(cfg["data.shards"])) + 1
        have = sum(f.stat().st_size for f in data_mod.raw_dir().glob("*") if f.is_file()) \
            if data_mod.raw_dir().is_dir() else 0
        return max(int(LLMJP_BYTES_ALL * files / LLMJP_FILES_ALL) - have, 0)
    d = paths.resolve(src)  # a directory of JSONL: the tokens take about as much as the text, plus a clean copy
    return 2 * sum(f.stat().st_size for f in d.glob("*.jsonl*") if f.is_file()) if d.is_dir() else 0


def runs_need_bytes(cfg: Config) -> int:
    """The whole chain's runs: what each stage writing under the runs dir needs (stage_need_bytes), added up."""
    return sum(stage_need_bytes(cfg, s)[0] for s in ("import", "cpt", "lora", "export"))


def _gb(b: float) -> str:
    return f"{b / GB:.1f} GB" if b >= 0.1 * GB else f"{b / MB:.0f} MB"


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min" if s >= 60 else f"{s:.0f} s"


# ----------------------------------------------------------------------------- checks

def _existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def writable(p: Path) -> bool:
    """Create and delete a temp file in p (or in its nearest existing parent, where mkdir -p would start)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".jacpt-preflight-", dir=_existing(p))
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def _add_versions(r: Report) -> None:
    r.versions = versions()
    v = r.versions
    r.add("ok", "versions", f"NeMo {v['NeMo']}, Megatron-Core {v['Megatron-Core']}, NeMo-Run {v['NeMo-Run']}, "
                            f"torch {v['torch']}, CUDA {v['CUDA (torch)']}, container {v['container']}")


TE_ABSENT_ON_GPU = ("absent: the GPU runs without TE's fused kernels (slower, more memory); use the container "
                    "(make docker-run)")


def _check_versions(r: Report, gpus: list[Gpu]) -> None:
    _add_versions(r)
    te = r.versions["Transformer Engine"]
    if te != "absent":
        r.add("ok", "transformer-engine", te)
    elif gpus:
        r.add("warn", "transformer-engine", TE_ABSENT_ON_GPU)
    else:
        r.add("ok", "transformer-engine", "absent (not needed on CPU)")


def needs_gpu(cfg: Config) -> bool:
    """Whether the profile trains on a GPU (all but the tiny CPU profiles)."""
    return not (is_tiny(cfg) and cfg.profile != "tiny-gpu")


def _gpus_seen_by_smi() -> str:
    smi = _nvidia_smi()
    return f"; nvidia-smi lists {len(smi)} but torch cannot use them (a CPU build of torch?)" if smi else ""


def _check_gpus(r: Report, cfg: Config, gpus: list[Gpu]) -> None:
    r.gpus = [asdict(g) for g in gpus]
    for i, g in enumerate(gpus):
        r.add("ok", f"gpu {i}", f"{g.name}, {g.vram_bytes / 2**30:.1f} GiB, compute {g.capability or '?'}, "
                                f"driver {g.driver or '?'}")
    if gpus:
        return
    seen = _gpus_seen_by_smi()
    if not needs_gpu(cfg):
        r.add("ok", "gpu", f"no CUDA GPU{seen} (not needed: {cfg.profile} runs on the CPU)")
    else:
        r.add("FAIL", "gpu", f"no CUDA GPU{seen}: this profile needs a GPU; use PROFILE=tiny-cpu or run in the "
                             "container on a GPU box")


def _memory_of(cfg: Config, stage: str):
    """The stage's memory estimate as a function of (params, micro-batch, seq), with the stage's loss chunk and
    SwiGLU."""
    return functools.partial(cpt_memory_bytes if stage == "cpt" else lora_memory_bytes,
                             loss_chunk_tokens=cfg[f"{stage}.loss_chunk_tokens"],
                             fused_swiglu=cfg[f"{stage}.fused_swiglu"])


def _memory_verdict(r: Report, cfg: Config, stage: str, need: float, smallest: Gpu, detail: str) -> None:
    """ok when `need` fits the smallest GPU; else FAIL with the largest micro-batch that fits (or why none does)."""
    if need <= smallest.vram_bytes:
        r.add("ok", "memory", f"{detail}; fits {smallest.name}'s {_gb(smallest.vram_bytes)}")
        return
    mbs, seq = cfg[f"{stage}.micro_batch_size"], cfg[f"{stage}.seq_length"]
    per_gpu = max(cfg[f"{stage}.global_batch_size"] // data_parallel(cfg), 1)
    fit = largest_fitting_mbs(model_params(cfg), seq, smallest.vram_bytes, min(per_gpu, mbs), _memory_of(cfg, stage))
    r.estimates["suggested_mbs"] = fit
    knob = f"make cpt MBS={fit}" if stage == "cpt" else f'make lora OVERRIDES="lora.micro_batch_size={fit}"'
    fix = knob if fit else ("even micro-batch 1 does not fit: a GPU with more memory, or a shorter "
                            f"{stage}.seq_length")
    r.add("FAIL", "memory", f"{detail}; above {smallest.name}'s {_gb(smallest.vram_bytes)}: {fix}")


def _check_memory_and_time(r: Report, cfg: Config, gpus: list[Gpu]) -> None:
    params, mbs, seq = model_params(cfg), cfg["cpt.micro_batch_size"], cfg["cpt.seq_length"]
    cpt_mem = _memory_of(cfg, "cpt")(params, mbs, seq)
    lora_mem = _memory_of(cfg, "lora")(params, cfg["lora.micro_batch_size"], cfg["lora.seq_length"])
    cpt_tokens = cfg["cpt.max_steps"] * cfg["cpt.global_batch_size"] * seq
    lora_tokens = cfg["lora.max_steps"] * cfg["lora.global_batch_size"] * cfg["lora.seq_length"]
    est = r.estimates
    est.update(params=params, cpt_memory_bytes=cpt_mem, lora_memory_bytes=lora_mem, cpt_tokens=cpt_tokens,
               lora_tokens=lora_tokens,
               memory_formula=f"{CPT_BYTES_PER_PARAM} B/param (CPT) or {LORA_BYTES_PER_PARAM} B/param (LoRA) + "
                              f"tokens/micro-batch x {ACT_BYTES_PER_TOKEN / MB:.2f} MB (flat per token; "
                              f"{FUSED_SWIGLU_SAVES_PER_TOKEN / MB:.2f} MB less with the fused SwiGLU) + "
                              f"loss chunk tokens x {VOCAB:,} x {CHUNK_BYTES_PER_LOGIT} B (without chunks: "
                              f"{WHOLE_LOGITS_ACT_BYTES_PER_TOKEN / MB:.1f} MB per token, no chunk term) + "
                              f"{CUDA_CONTEXT_BYTES / GB:.0f} GB CUDA context; distributed optimizer off")
    detail = (f"CPT ~{_gb(cpt_mem)} per GPU at micro-batch {mbs} x seq {seq} ({params:,} params); "
              f"LoRA ~{_gb(lora_mem)} (estimates)")
    if gpus:
        _memory_verdict(r, cfg, "cpt", cpt_mem, min(gpus, key=lambda g: g.vram_bytes), detail)
    elif not is_tiny(cfg):
        r.add("warn", "memory", f"{detail}; no GPU here to compare with")
    if is_tiny(cfg):
        r.add("ok", "time", "the tiny chain takes minutes on CPU (~2.5 min on 2 cores, README)")
        return
    if not gpus:
        r.add("warn", "time", "no estimate without a GPU")
        return
    smallest = min(gpus, key=lambda g: g.vram_bytes).name
    tps, label = tokens_per_s(smallest, equivalent_mbs(mbs, seq))
    if tps is None:
        r.add("warn", "time", label)
        return
    tps *= data_parallel(cfg)  # assumed linear
    lora_mbs = equivalent_mbs(cfg["lora.micro_batch_size"], cfg["lora.seq_length"])
    lora_tps = lora_factor(lora_mbs) * tokens_per_s(smallest, lora_mbs)[0]
    lora_tps *= data_parallel(cfg)
    est.update(tokens_per_s=tps, tokens_per_s_source=label, cpt_seconds=cpt_tokens / tps,
               lora_tokens_per_s=lora_tps, lora_seconds=lora_tokens / lora_tps)
    r.add("ok", "time", f"CPT ~{_duration(cpt_tokens / tps)} ({cpt_tokens:,} tokens at {tps:,.0f} tokens/s, "
                        f"{label}); LoRA ~{_duration(lora_tokens / lora_tps)} at {lora_tps:,.0f} tokens/s "
                        "(excluding start-up, validation and checkpoints)")


def _check_disk(r: Report, cfg: Config) -> None:
    need = {"data": (paths.data_dir(), data_need_bytes(cfg)), "runs": (runs.runs_root(), runs_need_bytes(cfg))}
    r.disk = {}
    by_dev: dict[int, list[str]] = {}
    for what, (d, n) in need.items():
        base = _existing(d)
        r.disk[what] = {"dir": str(d), "need_bytes": n, "free_bytes": shutil.disk_usage(base).free,
                        "writable": writable(d)}
        by_dev.setdefault(base.stat().st_dev, []).append(what)
        if not r.disk[what]["writable"]:
            r.add("FAIL", f"{what} dir", f"{d} is not writable: fix its permissions, or point "
                                         f"{'JACPT_DATA_DIR' if what == 'data' else 'JACPT_RUNS_DIR'} elsewhere")
    for whats in by_dev.values():  # dirs on one filesystem share its free space
        total = sum(r.disk[w]["need_bytes"] for w in whats)
        free = r.disk[whats[0]]["free_bytes"]
        where = " + ".join(f"{r.disk[w]['dir']} ({w} ~{_gb(r.disk[w]['need_bytes'])})" for w in whats)
        if total > free:
            r.add("FAIL", "disk", f"needs ~{_gb(total)} free in {where}, has {_gb(free)}: free space or point "
                                  "JACPT_DATA_DIR / JACPT_RUNS_DIR at a larger disk")
        else:
            r.add("ok", "disk", f"~{_gb(total)} needed in {where}, {_gb(free)} free")


def _check_wandb(r: Report, cfg: Config) -> None:
    mode, has_key = cfg["wandb.mode"], bool(os.environ.get("WANDB_API_KEY"))
    resolved = ("online" if has_key else "offline") if mode == "auto" else mode
    why = {"auto": f"auto: WANDB_API_KEY {'set' if has_key else 'unset'}"}.get(mode, f"wandb.mode={mode}")
    if resolved == "online" and not has_key:
        r.add("warn", "wandb", f"online ({why}) but WANDB_API_KEY is unset: `wandb login` or set the key, "
                               "or wandb.mode=offline")
    else:
        r.add("ok", "wandb", f"{resolved} ({why})")
    r.estimates["wandb_mode"] = resolved


def _check_tokenizer(r: Report, cfg: Config, unbuilt: str, build: str) -> None:
    """The tokenizer dir: a set tokenizer.dir that does not exist is always FAIL; the embedded one not built
    yet is `unbuilt` (warn for the whole profile, FAIL for make data, which reads it), fixed by `build`."""
    from jacpt import data as data_mod

    tok = data_mod.tokenizer_dir(cfg)
    if tok.is_dir():
        r.add("ok", "tokenizer", str(tok))
    elif cfg["tokenizer.dir"]:
        r.add("FAIL", "tokenizer", f"{tok} does not exist (tokenizer.dir): point TOKENIZER_DIR at a Qwen2.5 "
                                   "tokenizer directory, or unset it for the embedded one")
    else:
        r.add(unbuilt, "tokenizer", f"{tok} not built yet: {build}")


def _check_data(r: Report, cfg: Config) -> None:
    from jacpt import data as data_mod

    _check_tokenizer(r, cfg, "warn", "make assets (make data builds it too)")
    manifest = data_mod.out_dir(cfg) / data_mod.MANIFEST
    if manifest.is_file():
        r.add("ok", "data", str(manifest))
    else:
        r.add("warn", "data", f"{manifest} missing: run make data PROFILE={cfg.profile}")


# ----------------------------------------------------------------------------- one stage

def stage_need_bytes(cfg: Config, stage: str) -> tuple[int, str]:
    """(bytes, what they are): the free space `make <stage>` needs in its directory (data: the data dir, else runs)."""
    from jacpt import data as data_mod

    p = model_params(cfg)
    if stage == "data":
        if (data_mod.out_dir(cfg) / data_mod.MANIFEST).is_file():
            return 0, "built already; a re-run with unchanged inputs writes nothing"
        src = cfg["data.source"]
        why = ("the ja_wiki download and its tokens" if src == "llmjp" else "the sample's tokens" if src == "sample"
               else f"a clean copy of {src} and its tokens")
        return data_need_bytes(cfg), why
    if stage == "import":
        return CKPT_BYTES_PER_PARAM * p, "one NeMo checkpoint"
    if stage == "cpt":
        k = cfg["cpt.save_top_k"]
        return (1 + k) * CKPT_BYTES_PER_PARAM * p, (f"{1 + k} checkpoints with optimizer state: the last + "
                                                    f"cpt.save_top_k={k}")
    if stage == "lora":
        ckpt = CKPT_BYTES_PER_PARAM * p * min(1.0, LORA_ADAPTER_SHARE_PER_DIM * cfg["lora.dim"]) + CKPT_CONTEXT_BYTES
        return int(LORA_CKPTS_KEPT * ckpt), f"{LORA_CKPTS_KEPT} adapter checkpoints: the last + the best"
    if stage == "export":
        return EXPORT_BYTES_PER_PARAM * p, "two HF models (CPT, LoRA-merged) and the merged NeMo checkpoint, bf16"
    return 0, "a run directory of small files"  # demo, eval


def _stage_gpu(r: Report, cfg: Config, gpus: list[Gpu], stage: str) -> None:
    """One line. No CUDA GPU is fatal only for training on a GPU profile: data, import and export run on the CPU;
    the demo and eval fall back to transformers on the CPU (generate.py / evaluate.py pick the device)."""
    r.gpus = [asdict(g) for g in gpus]
    if gpus:
        kinds: dict[tuple, int] = {}
        for g in gpus:
            key = (g.name, g.vram_bytes, g.capability, g.driver)
            kinds[key] = kinds.get(key, 0) + 1
        r.add("ok", "gpu", "; ".join(f"{n} x {name}, {vram / 2**30:.1f} GiB, compute {cap or '?'}, driver {drv or '?'}"
                                     for (name, vram, cap, drv), n in kinds.items()))
        if stage in TRAIN_STAGES and r.versions.get("Transformer Engine") == "absent":
            r.add("warn", "transformer-engine", TE_ABSENT_ON_GPU)
        return
    seen = _gpus_seen_by_smi()
    if stage in TRAIN_STAGES and needs_gpu(cfg):
        if cfg["launch.executor"] == "slurm":
            r.add("warn", "gpu", f"no CUDA GPU on this host{seen}: not fatal with launch.executor=slurm (the job runs "
                                 "on the Slurm nodes; this host only submits it), so GPU memory is not checked here")
        else:
            r.add("FAIL", "gpu", f"no CUDA GPU{seen}: make {stage} on PROFILE={cfg.profile} needs a GPU; use "
                                 "PROFILE=tiny-cpu or run in the container on a GPU box")
    elif stage in TRAIN_STAGES:
        r.add("ok", "gpu", f"no CUDA GPU{seen} (not needed: {cfg.profile} runs on the CPU)")
    elif stage == "demo":
        r.add("warn" if needs_gpu(cfg) else "ok", "gpu",
              f"no CUDA GPU{seen}: not fatal, the demo generates with transformers on the CPU (float32) from the "
              f"exported HF models, so make export PROFILE={cfg.profile} must have run; NeMo's generation from the "
              "checkpoints needs CUDA")
    elif stage == "eval":
        r.add("warn" if needs_gpu(cfg) else "ok", "gpu",
              f"no CUDA GPU{seen}: not fatal, eval runs transformers on the CPU in float32 (slower than bf16 on a "
              "GPU; the same models and data)")
    else:
        r.add("ok", "gpu", f"no CUDA GPU{seen} (not needed: make {stage} runs on the CPU)")


def _stage_memory_and_time(r: Report, cfg: Config, gpus: list[Gpu], stage: str) -> None:
    """CPT or LoRA on this box's smallest GPU: the memory estimate (fatal when above it) and the time."""
    if not gpus:
        return
    label = {"cpt": "CPT", "lora": "LoRA"}[stage]
    params, mbs, seq = model_params(cfg), cfg[f"{stage}.micro_batch_size"], cfg[f"{stage}.seq_length"]
    need, smallest = _memory_of(cfg, stage)(params, mbs, seq), min(gpus, key=lambda g: g.vram_bytes)
    est = r.estimates
    est.update({"params": params, f"{stage}_memory_bytes": need})
    detail = f"{label} ~{_gb(need)} per GPU at micro-batch {mbs} x seq {seq} ({params:,} params; an estimate)"
    _memory_verdict(r, cfg, stage, need, smallest, detail)
    if is_tiny(cfg):
        return  # the measured rates are the 0.5B model's
    tokens_mbs = equivalent_mbs(mbs, seq)
    tps, source = tokens_per_s(smallest.name, tokens_mbs)
    if tps is None:
        r.add("warn", "time", source)
        return
    tps *= (lora_factor(tokens_mbs) if stage == "lora" else 1) * data_parallel(cfg)
    tokens = cfg[f"{stage}.max_steps"] * cfg[f"{stage}.global_batch_size"] * seq
    est.update({f"{stage}_tokens": tokens, f"{stage}_tokens_per_s": tps, f"{stage}_seconds": tokens / tps,
                "tokens_per_s_source": source})
    r.add("ok", "time", f"{label} ~{_duration(tokens / tps)} ({tokens:,} tokens at {tps:,.0f} tokens/s, {source}; "
                        "excluding start-up, validation and checkpoints)")


def _stage_disk(r: Report, cfg: Config, stage: str) -> None:
    """The stage's directory: writable (fatal), and its free space against the stage's need (fatal when short)."""
    what, d, var = ("data", paths.data_dir(), "JACPT_DATA_DIR") if stage == "data" else \
        ("runs", runs.runs_root(), "JACPT_RUNS_DIR")
    need, why = stage_need_bytes(cfg, stage)
    free, ok = shutil.disk_usage(_existing(d)).free, writable(d)
    r.disk = {what: {"dir": str(d), "need_bytes": need, "free_bytes": free, "writable": ok}}
    if not ok:
        r.add("FAIL", f"{what} dir", f"{d} is not writable: fix its permissions, or point {var} elsewhere")
    if need > free:
        r.add("FAIL", "disk", f"make {stage} needs ~{_gb(need)} free in {d} ({why}), has {_gb(free)}: free space "
                              f"or point {var} at a larger disk")
    elif need:
        r.add("ok", "disk", f"~{_gb(need)} needed in {d} ({why}), {_gb(free)} free")
    else:
        r.add("ok", "disk", f"{d}: {why}; {_gb(free)} free")


def _stage_data(r: Report, cfg: Config, stage: str) -> None:
    """data: the tokenizer it needs (fatal when absent) and the manifest's state (never fatal: it builds it).
    cpt, lora, eval: the manifest they read (fatal when absent)."""
    from jacpt import data as data_mod

    manifest = data_mod.out_dir(cfg) / data_mod.MANIFEST
    if stage in READS_DATA:
        if manifest.is_file():
            r.add("ok", "data", str(manifest))
        else:
            r.add("FAIL", "data", f"{manifest} missing: make {stage} reads the tokenised data; run make data "
                                  f"PROFILE={cfg.profile} first")
        return
    _check_tokenizer(r, cfg, "FAIL", "run make assets (the make data target builds it first)")
    r.add("ok", "data", f"{manifest} exists; rebuilt only if its inputs changed" if manifest.is_file() else
          f"{manifest} not built yet: this stage builds it")


def run_stage(cfg: Config, stage: str) -> Report:
    """The checks `make <stage>` depends on; only they can fail it. See the module docstring."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
    r = Report(cfg.profile, stage=stage)
    gpus = discover_gpus()
    _add_versions(r)
    _stage_gpu(r, cfg, gpus, stage)
    if stage in TRAIN_STAGES:
        _stage_memory_and_time(r, cfg, gpus, stage)
    _stage_disk(r, cfg, stage)
    if stage in LOGS_WANDB:
        _check_wandb(r, cfg)
    if stage == "data" or stage in READS_DATA:
        _stage_data(r, cfg, stage)
    return r


def run(cfg: Config, stage: str | None = None) -> Report:
    """The whole profile's checks, or (with a stage) only those that stage depends on."""
    if stage is not None:
        return run_stage(cfg, stage)
    r = Report(cfg.profile)
    gpus = discover_gpus()
    _check_versions(r, gpus)
    _check_gpus(r, cfg, gpus)
    _check_memory_and_time(r, cfg, gpus)
    _check_disk(r, cfg)
    _check_wandb(r, cfg)
    _check_data(r, cfg)
    return r
