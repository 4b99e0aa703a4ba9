"""`jacpt preflight`: can this box run PROFILE? Versions, GPUs, disk, wandb, data; then a verdict.

Every line is `ok|warn|FAIL  <what>  <detail>`; a FAIL's detail names the fix. It imports
nothing heavy (no nemo.collections.llm): versions come from package metadata, GPUs from
torch.cuda and nvidia-smi. The memory and time figures are estimates from formulas fitted to
`make bench` on an H100 without Transformer Engine (BENCHMARKS.md); other GPUs are scaled by
their bf16 peak and labelled as estimates.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from jacpt import data as data_mod, paths, runs
from jacpt.config import Config, parse_shards

GB = 1e9
MB = 1e6

# Parameter counts (embeddings tied, as the import stage builds them).
QWEN25_05B_PARAMS = 494_032_768
TINY_PARAMS = 9_798_208

# Memory and throughput of Qwen2.5-0.5B (tied), seq 2048, bf16, one H100 without Transformer Engine, the
# kit's own path (SDPA attention, fused AdamW): `make bench`, BENCHMARKS.md and
# bench/results/2026-11-22-nvidia-h100-80gb-hbm3.json. Peak allocated memory was 29.6 / 50.9 GiB at
# micro-batch 4 / 8: 8.39 GiB + 5.31 GiB per sample. The constant is the training state, 18 bytes per
# parameter (bf16 weights 2 + fp32 main weights 4 + Adam m and v 8 + the fp32 gradient buffer 4, distributed
# optimizer off); the slope is 2.78 MB per token, over half of it the 151,936-wide logits and their fp32
# softmax. A saved checkpoint carries the state without the gradient buffer.
CPT_BYTES_PER_PARAM = 18
CKPT_BYTES_PER_PARAM = 16  # weights, main weights and Adam moments (14), rounded up for metadata and slack
LORA_BYTES_PER_PARAM = 2  # frozen bf16 weights; the adapters and their state are ~1% of that
EXPORT_BYTES_PER_PARAM = 2 * 2  # two HF exports (CPT, LoRA-merged) in bf16
ACT_BYTES_PER_TOKEN = 2.8 * MB  # flat per token (2.78 measured); attention's share is small with flash attention
CUDA_CONTEXT_BYTES = 2 * GB  # CUDA context, cuBLAS workspaces and allocator slack, not in the peak above

# Tokens/s measured at each CPT micro-batch (same run); between them the rate is interpolated, below them
# proportional, past them the largest. Other GPUs scale by dense bf16 peak (an estimate, and labelled so).
# LoRA ran at 0.76x CPT's rate at micro-batch 4 (NeMo's adapters add kernels on the full base backward).
MEASURED_TOKENS_PER_S = {4: 47_226, 8: 64_377}
MEASURED_LORA_FACTOR = 0.76
MEASURED_PEAK = 989e12
MEASURED_SOURCE = "measured on an H100 without TE (make bench, BENCHMARKS.md)"

# ja_wiki from llm-jp: ~3 GB download + ~2 GB of tokens for all 15 files (14 train shards + validation_0).
LLMJP_BYTES_ALL = 5 * GB
LLMJP_FILES_ALL = 15
SAMPLE_BYTES = 5 * MB


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

    def add(self, status: str, what: str, detail: str) -> None:
        self.checks.append(Check(status, what, detail))

    @property
    def ok(self) -> bool:
        return not any(c.status == "FAIL" for c in self.checks)

    def verdict(self) -> str:
        fails = [c for c in self.checks if c.status == "FAIL"]
        if not fails:
            return f"ready: this box can run PROFILE={self.profile}"
        return f"not ready for PROFILE={self.profile}: fix the FAIL line{'s' if len(fails) > 1 else ''} above"

    def as_dict(self) -> dict:
        return {"profile": self.profile, "ok": self.ok, "verdict": self.verdict(),
                "checks": [asdict(c) for c in self.checks], "versions": self.versions, "gpus": self.gpus,
                "disk": self.disk, "estimates": self.estimates}

    def text(self) -> str:
        width = max((len(c.what) for c in self.checks), default=0)
        lines = [f"{c.status:<4}  {c.what:<{width}}  {c.detail}" for c in self.checks]
        return "\n".join(lines + ["", ("ok    " if self.ok else "FAIL  ") + self.verdict()])


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


def cpt_memory_bytes(params: int, mbs: int, seq_length: int) -> float:
    """Per GPU: weights + grads + optimizer state + activations (flat per token) + CUDA context."""
    return params * CPT_BYTES_PER_PARAM + mbs * seq_length * ACT_BYTES_PER_TOKEN + CUDA_CONTEXT_BYTES


def lora_memory_bytes(params: int, mbs: int, seq_length: int) -> float:
    return params * LORA_BYTES_PER_PARAM + mbs * seq_length * ACT_BYTES_PER_TOKEN + CUDA_CONTEXT_BYTES


def largest_fitting_mbs(params: int, seq_length: int, vram_bytes: float, samples_per_gpu: int) -> int:
    """The largest micro-batch whose CPT estimate fits vram_bytes and that divides the samples each GPU takes
    per step (Megatron requires global batch % (micro-batch x data parallel) == 0); 0 when none fits."""
    best = 0
    for n in range(1, samples_per_gpu + 1):
        if samples_per_gpu % n == 0 and cpt_memory_bytes(params, n, seq_length) <= vram_bytes:
            best = n
    return best


def measured_rate(mbs: int) -> float:
    """CPT tokens/s on the measured H100 at this micro-batch (interpolated between measured ones)."""
    pts = sorted(MEASURED_TOKENS_PER_S.items())
    if mbs <= pts[0][0]:
        return pts[0][1] * mbs / pts[0][0]  # below the smallest: proportional (launch-bound)
    for (m0, t0), (m1, t1) in zip(pts, pts[1:]):
        if mbs <= m1:
            return t0 + (t1 - t0) * (mbs - m0) / (m1 - m0)
    return pts[-1][1]


def tokens_per_s(gpu_name: str, mbs: int = 4) -> tuple[float | None, str]:
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
    p = model_params(cfg)
    return (1 + cfg["cpt.save_top_k"]) * CKPT_BYTES_PER_PARAM * p + EXPORT_BYTES_PER_PARAM * p


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


def _check_versions(r: Report, gpus: list[Gpu]) -> None:
    r.versions = versions()
    v = r.versions
    r.add("ok", "versions", f"NeMo {v['NeMo']}, Megatron-Core {v['Megatron-Core']}, NeMo-Run {v['NeMo-Run']}, "
                            f"torch {v['torch']}, CUDA {v['CUDA (torch)']}, container {v['container']}")
    te = v["Transformer Engine"]
    if te != "absent":
        r.add("ok", "transformer-engine", te)
    elif gpus:
        r.add("warn", "transformer-engine", "absent: the GPU runs without TE's fused kernels (slower, more memory); "
                                            "use the container (make docker-run)")
    else:
        r.add("ok", "transformer-engine", "absent (not needed on CPU)")


def _check_gpus(r: Report, cfg: Config, gpus: list[Gpu]) -> None:
    r.gpus = [asdict(g) for g in gpus]
    for i, g in enumerate(gpus):
        r.add("ok", f"gpu {i}", f"{g.name}, {g.vram_bytes / 2**30:.1f} GiB, compute {g.capability or '?'}, "
                                f"driver {g.driver or '?'}")
    if gpus:
        return
    smi = _nvidia_smi()
    seen = f"; nvidia-smi lists {len(smi)} but torch cannot use them (a CPU build of torch?)" if smi else ""
    if is_tiny(cfg) and cfg.profile != "tiny-gpu":
        r.add("ok", "gpu", f"no CUDA GPU{seen} (not needed: {cfg.profile} runs on the CPU)")
    else:
        r.add("FAIL", "gpu", f"no CUDA GPU{seen}: this profile needs a GPU; use PROFILE=tiny-cpu or run in the "
                             "container on a GPU box")


def _check_memory_and_time(r: Report, cfg: Config, gpus: list[Gpu]) -> None:
    params, mbs, seq = model_params(cfg), cfg["cpt.micro_batch_size"], cfg["cpt.seq_length"]
    cpt_mem = cpt_memory_bytes(params, mbs, seq)
    lora_mem = lora_memory_bytes(params, cfg["lora.micro_batch_size"], cfg["lora.seq_length"])
    cpt_tokens = cfg["cpt.max_steps"] * cfg["cpt.global_batch_size"] * seq
    lora_tokens = cfg["lora.max_steps"] * cfg["lora.global_batch_size"] * cfg["lora.seq_length"]
    est = r.estimates
    est.update(params=params, cpt_memory_bytes=cpt_mem, lora_memory_bytes=lora_mem, cpt_tokens=cpt_tokens,
               lora_tokens=lora_tokens,
               memory_formula=f"{CPT_BYTES_PER_PARAM} B/param (CPT) or {LORA_BYTES_PER_PARAM} B/param (LoRA) + "
                              f"tokens/micro-batch x {ACT_BYTES_PER_TOKEN / MB:.1f} MB (flat per token) + "
                              f"{CUDA_CONTEXT_BYTES / GB:.0f} GB CUDA context; distributed optimizer off")
    detail = (f"CPT ~{_gb(cpt_mem)} per GPU at micro-batch {mbs} x seq {seq} ({params:,} params); "
              f"LoRA ~{_gb(lora_mem)} (estimates)")
    if gpus:
        smallest = min(gpus, key=lambda g: g.vram_bytes)
        if cpt_mem > smallest.vram_bytes:
            per_gpu = max(cfg["cpt.global_batch_size"] // max(cfg["launch.gpus"], 1), 1)
            fit = largest_fitting_mbs(params, seq, smallest.vram_bytes, min(per_gpu, mbs))
            est["suggested_mbs"] = fit
            fix = (f"make cpt MBS={fit}" if fit else
                   "even micro-batch 1 does not fit: a GPU with more memory, or shorter cpt.seq_length")
            r.add("FAIL", "memory", f"{detail}; above {smallest.name}'s {_gb(smallest.vram_bytes)}: {fix}")
        else:
            r.add("ok", "memory", f"{detail}; fits {smallest.name}'s {_gb(smallest.vram_bytes)}")
    elif not is_tiny(cfg):
        r.add("warn", "memory", f"{detail}; no GPU here to compare with")
    if is_tiny(cfg):
        r.add("ok", "time", "the tiny chain takes minutes on CPU (~2.5 min on 2 cores, README)")
        return
    if not gpus:
        r.add("warn", "time", "no estimate without a GPU")
        return
    tps, label = tokens_per_s(min(gpus, key=lambda g: g.vram_bytes).name, mbs)
    if tps is None:
        r.add("warn", "time", label)
        return
    tps *= cfg["launch.gpus"] * cfg["launch.nodes"]  # data parallel, assumed linear
    lora_tps = MEASURED_LORA_FACTOR * tokens_per_s(min(gpus, key=lambda g: g.vram_bytes).name,
                                                   cfg["lora.micro_batch_size"])[0]
    lora_tps *= cfg["launch.gpus"] * cfg["launch.nodes"]
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


def _check_data(r: Report, cfg: Config) -> None:
    tok = data_mod.tokenizer_dir(cfg)
    if tok.is_dir():
        r.add("ok", "tokenizer", str(tok))
    elif cfg["tokenizer.dir"]:
        r.add("FAIL", "tokenizer", f"{tok} does not exist (tokenizer.dir): point TOKENIZER_DIR at a Qwen2.5 "
                                   "tokenizer directory, or unset it for the embedded one")
    else:
        r.add("warn", "tokenizer", f"{tok} not built yet: make assets (make data builds it too)")
    manifest = data_mod.out_dir(cfg) / data_mod.MANIFEST
    if manifest.is_file():
        r.add("ok", "data", str(manifest))
    else:
        r.add("warn", "data", f"{manifest} missing: run make data PROFILE={cfg.profile}")


def run(cfg: Config) -> Report:
    r = Report(cfg.profile)
    gpus = discover_gpus()
    _check_versions(r, gpus)
    _check_gpus(r, cfg, gpus)
    _check_memory_and_time(r, cfg, gpus)
    _check_disk(r, cfg)
    _check_wandb(r, cfg)
    _check_data(r, cfg)
    return r
