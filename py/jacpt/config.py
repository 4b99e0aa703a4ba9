"""Settings: one flat table of typed keys, resolved with a fixed precedence.

    built-in default  <  configs/<profile>.yaml  <  environment  <  key=value

Every key is declared once in KEYS below with its type, default and a one-line
trade-off. Unknown keys and wrong types are errors that name the fix; every
resolved value remembers where it came from (``jacpt config --show``).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import yaml

from jacpt.paths import CONFIG_DIR


class ConfigError(Exception):
    """A setting is unknown or invalid; the message names where and the fix."""


@dataclass(frozen=True)
class Key:
    type: type
    default: Any
    help: str
    env: str | None = None
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None  # returns an error text or None


_TIME_RE = re.compile(r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$")
_SHARDS_RE = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


def parse_shards(spec: str, lo: int = 0, hi: int = 13) -> list[int]:
    """'0-13', '3', '0,2,5-7' -> sorted shard numbers within [lo, hi]."""
    spec = spec.replace(" ", "")
    if not _SHARDS_RE.match(spec):
        raise ValueError(f"bad shard spec {spec!r}: use N, A-B or a comma list like 0,3,5-7")
    out: set[int] = set()
    for part in spec.split(","):
        a, _, b = part.partition("-")
        first, last = int(a), int(b or a)
        if first > last or first < lo or last > hi:
            raise ValueError(f"bad shard range {part!r}: shards are {lo}..{hi} and A<=B")
        out.update(range(first, last + 1))
    return sorted(out)


def _check_shards(v: str) -> str | None:
    try:
        parse_shards(v)
    except ValueError as e:
        return str(e)
    return None


def _slurm_time(v: str) -> str | None:
    return None if _TIME_RE.match(v) else "use HH:MM:SS or D-HH:MM:SS"


def _unit(v: float) -> str | None:
    return None if 0.0 <= v <= 1.0 else "must be between 0 and 1"


def _nonneg(v: int) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _positive(v: int) -> str | None:
    return None if v >= 1 else "must be >= 1"


JAWIKI_URL = "https://gitlab.llm-jp.nii.ac.jp/datasets/llm-jp-corpus-v3/-/raw/main/ja/ja_wiki"

LOSS_CHUNK_HELP = ("output layer + cross entropy this many tokens at a time: the 151,936-wide logits are never "
                   "whole (jacpt/chunked_loss.py); 0: Megatron's whole-logits path, ~1.2 MB more a token")
SWIGLU_HELP = ("while training, compute SwiGLU in one kernel forward and one backward, keeping only its input "
               "(jacpt/swiglu.py); false: Megatron's separate silu, multiplies and concatenation")

KEYS: dict[str, Key] = {
    # --- data: source -------------------------------------------------------------
    "data.source": Key(str, "llmjp", "llmjp (download ja_wiki), sample (the embedded corpus) or a directory "
                       "of train_*.jsonl[.gz] / validation_*.jsonl[.gz]", env="DATA_SOURCE"),
    "data.shards": Key(str, "0-13", "ja_wiki train shards to use (N, A-B or 0,3,5-7); validation_0 always comes too",
                       env="SHARDS", check=_check_shards),
    "data.base_url": Key(str, JAWIKI_URL, "where ja_wiki is downloaded from (a mirror, or a local server in tests)",
                         env="JAWIKI_BASE_URL"),
    # --- data: cleaning -------------------------------------------------------------
    "data.skip_bad": Key(bool, False, "count and skip structurally broken lines/files instead of stopping",
                         env="SKIP_BAD"),
    "data.min_chars": Key(int, 0, "drop documents shorter than this many characters (0: keep all)", check=_nonneg),
    "data.max_chars": Key(int, 0, "drop documents longer than this many characters (0: no limit)", check=_nonneg),
    "data.min_ja_ratio": Key(float, 0.0, "drop documents whose share of Japanese script (kana, kanji) among "
                             "non-space characters is below this (0: off)", check=_unit),
    "data.val_fraction": Key(float, 0.01, "share of documents held out for validation when a source has no "
                             "validation file (split by content hash, deterministic)", check=_unit),
    # --- data: tokenising -------------------------------------------------------------
    "data.backend": Key(str, "fast", "fast (HF tokenizers, N processes) or nemo (NeMo's "
                        "preprocess_data_for_megatron.py; slow, the reference)", env="DATA_BACKEND",
                        choices=("fast", "nemo")),
    "data.engine": Key(str, "auto", "fast backend's BPE: auto (tiktoken when it passes a self-check against HF "
                       "tokenizers, ~3x faster; else HF), tiktoken or hf; byte-identical either way",
                       env="TOKENIZE_ENGINE", choices=("auto", "tiktoken", "hf")),
    "data.workers": Key(int, 2, "tokeniser processes; more than the cores you have only adds overhead",
                        env="DATA_WORKERS", check=_positive),
    # --- data: LoRA examples -------------------------------------------------------------
    "data.lora_source": Key(str, "auto", "auto (built from the cleaned corpus) or a directory with "
                            "training/validation/test.jsonl of {input, output}", env="LORA_DATA"),
    "data.lora_max_train": Key(int, 2000, "at most this many LoRA training examples (0: all)", check=_nonneg),
    "data.lora_max_eval": Key(int, 200, "at most this many LoRA validation and test examples each (0: all)",
                              check=_nonneg),
    # --- model -------------------------------------------------------------
    "model.hf_id": Key(str, "Qwen/Qwen2.5-0.5B", "Hugging Face model id, downloaded with huggingface-cli when "
                       "model.hf_dir is empty and the hub is reachable"),
    "model.hf_dir": Key(str, "", "local HF snapshot to import (config.json, weights, tokenizer); `tiny`: "
                        "the embedded tiny model; empty: a download of model.hf_id", env="HF_MODEL_DIR"),
    "model.expect_layers": Key(int, 0, "refuse to import a model with another layer count (0: any); "
                               "guards a profile against the wrong snapshot", check=_nonneg),
    # --- cpt -------------------------------------------------------------
    "cpt.seq_length": Key(int, 2048, "tokens per sample; changes the data only, never the model's 32k context",
                          check=_positive),
    "cpt.micro_batch_size": Key(int, 2, "samples per GPU per step; the first knob of the OOM ladder (RUNBOOK)",
                                env="MBS", check=_positive),
    "cpt.global_batch_size": Key(int, 32, "samples per optimizer step (gradient accumulation makes up the rest)",
                                 env="GBS", check=_positive),
    "cpt.max_steps": Key(int, 100, "optimizer steps", env="CPT_STEPS", check=_positive),
    "cpt.lr": Key(float, 3e-5, "peak learning rate; CPT of a trained model wants ~10x below pre-training's"),
    "cpt.min_lr": Key(float, 3e-6, "cosine floor"),
    "cpt.warmup_steps": Key(int, 10, "linear warm-up steps", check=_nonneg),
    "cpt.val_check_interval": Key(int, 50, "validate every N steps", check=_positive),
    "cpt.limit_val_batches": Key(int, 8, "validation batches per check", check=_positive),
    "cpt.ckpt_every_n_steps": Key(int, 50, "save a checkpoint every N steps (resume point)", check=_positive),
    "cpt.save_top_k": Key(int, 1, "checkpoints kept besides the last (~7 GB each for Qwen2.5-0.5B with optimizer "
                          "state)", check=_nonneg),
    "cpt.log_every_n_steps": Key(int, 1, "log loss, grad norm and memory every N steps", check=_positive),
    "cpt.loss_gate": Key(float, 6.0, "stop when the first step's loss exceeds this: a restored Qwen2.5 starts near "
                         "2-4 on ja_wiki, a random one near 11.9 (0: off)", check=lambda v: None if v >= 0 else
                         "must be >= 0"),
    "cpt.grad_explode_factor": Key(float, 10.0, "warn once when the grad norm exceeds this many times its running "
                                   "median; lower catches smaller spikes but warns on noise (0: off; a nan or inf "
                                   "norm is never ignored)", check=lambda v: None if v == 0 or v > 1 else
                                   "must be 0 (off) or above 1"),
    "cpt.early_stop_patience": Key(int, 0, "stop after this many validation checks without a val-loss improvement "
                                   "(0: off); saves steps on a plateau, but a noisy val loss can end a run too early",
                                   check=_nonneg),
    "cpt.early_stop_min_delta": Key(float, 0.0, "how far val loss must fall to count as an improvement; larger stops "
                                    "sooner", check=lambda v: None if v >= 0 else "must be >= 0"),
    "cpt.loss_chunk_tokens": Key(int, 4096, LOSS_CHUNK_HELP, check=_nonneg),
    "cpt.fused_swiglu": Key(bool, True, SWIGLU_HELP),
    # --- lora -------------------------------------------------------------
    "lora.seq_length": Key(int, 1024, "tokens per example (prompt + answer)", check=_positive),
    "lora.micro_batch_size": Key(int, 4, "examples per GPU per step", check=_positive),
    "lora.global_batch_size": Key(int, 32, "examples per optimizer step", check=_positive),
    "lora.max_steps": Key(int, 100, "optimizer steps", env="LORA_STEPS", check=_positive),
    "lora.lr": Key(float, 1e-4, "peak learning rate (NeMo's LoRA default)"),
    "lora.warmup_steps": Key(int, 10, "linear warm-up steps", check=_nonneg),
    "lora.val_check_interval": Key(int, 50, "validate every N steps", check=_positive),
    "lora.limit_val_batches": Key(int, 8, "validation batches per check", check=_positive),
    "lora.ckpt_every_n_steps": Key(int, 50, "save a checkpoint every N steps (resume point)", check=_positive),
    "lora.log_every_n_steps": Key(int, 1, "log loss, grad norm and memory every N steps", check=_positive),
    "lora.grad_explode_factor": Key(float, 10.0, "warn once when the grad norm exceeds this many times its running "
                                    "median; lower catches smaller spikes but warns on noise (0: off; a nan or inf "
                                    "norm is never ignored)", check=lambda v: None if v == 0 or v > 1 else
                                    "must be 0 (off) or above 1"),
    "lora.early_stop_patience": Key(int, 0, "stop after this many validation checks without a val-loss improvement "
                                    "(0: off; the GPU profiles use 3); saves steps once the adapters stop learning, "
                                    "but a noisy val loss can end a run too early", check=_nonneg),
    "lora.early_stop_min_delta": Key(float, 0.0, "how far val loss must fall to count as an improvement; larger "
                                     "stops sooner", check=lambda v: None if v >= 0 else "must be >= 0"),
    "lora.loss_chunk_tokens": Key(int, 4096, LOSS_CHUNK_HELP, check=_nonneg),
    "lora.fused_swiglu": Key(bool, True, SWIGLU_HELP),
    "lora.fused_update": Key(bool, True, "compute each adapted layer and its adapter's scaled update in fused "
                             "matmuls (jacpt/lora_update.py); false: NeMo's separate matmuls, scale and add"),
    "lora.dim": Key(int, 32, "adapter rank; trainable parameters grow linearly with it", check=_positive),
    "lora.alpha": Key(int, 32, "adapter scale (alpha/dim multiplies the update)", check=_positive),
    "lora.dropout": Key(float, 0.0, "dropout on the adapter input", check=_unit),
    "lora.targets": Key(str, "linear_qkv,linear_proj,linear_fc1,linear_fc2", "modules that get adapters, "
                        "comma-separated Megatron names"),
    # --- logging -------------------------------------------------------------
    "wandb.project": Key(str, "qwen25-ja-cpt", "wandb project (online when WANDB_API_KEY is set, else offline "
                         "files to `wandb sync` later)", env="WANDB_PROJECT"),
    "wandb.entity": Key(str, "", "wandb team or user (empty: the key's default)", env="WANDB_ENTITY"),
    "wandb.tags": Key(str, "", "comma-separated tags added to the stage and profile tags"),
    "wandb.mode": Key(str, "auto", "auto (online with a key, else offline), online, offline or disabled",
                      env="WANDB_MODE", choices=("auto", "online", "offline", "disabled")),
    # --- demo and eval -------------------------------------------------------------
    "demo.prompts": Key(str, "", "prompts file, one prompt a line (empty: the kit's Japanese demo prompts)",
                        env="DEMO_PROMPTS"),
    "demo.max_new_tokens": Key(int, 96, "tokens generated per prompt", check=_positive),
    "demo.temperature": Key(float, 0.7, "sampling temperature (0: greedy)"),
    "demo.top_p": Key(float, 0.9, "nucleus sampling; NeMo allows top_k or top_p, not both", check=_unit),
    "demo.seed": Key(int, 1234, "sampling seed, so a rehearsal shows what the demo will show"),
    "eval.max_val_tokens": Key(int, 200000, "validation tokens scored for perplexity (0: all)", check=_nonneg),
    "eval.max_examples": Key(int, 64, "LoRA test.jsonl examples each model answers (0: all); more steady the "
                             "scores, each costs up to max_new_tokens decoding steps per model", check=_nonneg),
    "eval.max_new_tokens": Key(int, 128, "tokens generated per answer (greedy, stops at eos); references run up to "
                               "240 characters, so fewer cut every model short alike and lower chrF/BLEU",
                               check=_positive),
    "eval.batch_size": Key(int, 16, "answers generated together (left-padded); 1 times each answer alone, more is "
                           "faster on a GPU but an answer's latency is then its batch's", check=_positive),
    "eval.ja_threshold": Key(float, 0.5, "share of an answer's letters that must be Japanese script (it needs kana "
                             "too: Han alone is Chinese); higher also rejects Japanese full of Latin terms",
                             check=_unit),
    "eval.repeat_unit": Key(int, 4, "shortest unit, in characters, whose back-to-back repeats make a loop; lower "
                            "also flags harmless runs such as ……", check=_positive),
    "eval.repeat_times": Key(int, 3, "back-to-back repeats of a unit that make a loop; 2 also flags a phrase said "
                             "twice", check=lambda v: None if v >= 2 else "must be >= 2"),
    # --- launch -------------------------------------------------------------
    "launch.executor": Key(str, "local", "local (this machine; torchrun when gpus > 1) or slurm (sbatch through "
                           "NeMo-Run's SlurmExecutor)", env="EXECUTOR", choices=("local", "slurm")),
    "launch.gpus": Key(int, 1, "GPUs per node (data parallel); CPU runs use 1", env="GPUS", check=_positive),
    "launch.nodes": Key(int, 1, "nodes (slurm only)", env="NODES", check=_positive),
    "slurm.account": Key(str, "", "Slurm account (sbatch --account)", env="JACPT_SLURM_ACCOUNT"),
    "slurm.partition": Key(str, "", "Slurm partition (sbatch --partition)", env="JACPT_SLURM_PARTITION"),
    "slurm.time": Key(str, "01:00:00", "wall-time limit per job (HH:MM:SS)", env="JACPT_SLURM_TIME",
                      check=_slurm_time),
    "slurm.container_image": Key(str, "nvcr.io/nvidia/nemo:25.04", "container image the job runs in (pyxis/enroot)",
                                 env="JACPT_SLURM_IMAGE"),
    "slurm.container_mounts": Key(str, "", "extra mounts, comma-separated SRC:DST; the kit root is always mounted "
                                  "at the same path", env="JACPT_SLURM_MOUNTS"),
    "slurm.job_dir": Key(str, "", "where NeMo-Run keeps sbatch scripts and job logs (empty: the run dir)"),
    # --- tokenizer -------------------------------------------------------------
    "tokenizer.dir": Key(str, "", "Qwen2.5 tokenizer directory, absolute or relative to the kit root "
                         "(empty: the embedded one that `make assets` builds)", env="TOKENIZER_DIR"),
}

_TYPES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _coerce(key: str, spec: Key, value: Any, where: str) -> Any:
    """Convert value (YAML scalar or string from env/CLI) to spec.type, or raise ConfigError."""
    v = value
    try:
        if spec.type is bool:
            if isinstance(v, str):
                low = v.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off", ""):
                    raise ValueError
                v = low in ("1", "true", "yes", "on")
            elif not isinstance(v, bool):
                raise ValueError
        elif spec.type is int:
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError
            v = int(v)
        elif spec.type is float:
            if isinstance(v, bool):
                raise ValueError
            v = float(v)
        elif spec.type is str:
            if isinstance(v, (dict, list)) or v is None:
                raise ValueError
            v = str(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key} = {value!r} is not {_TYPES[spec.type]} ({spec.help})") from None
    if spec.choices and v not in spec.choices:
        raise ConfigError(f"{where}: {key} = {v!r} is not one of {', '.join(spec.choices)}")
    if spec.check and (msg := spec.check(v)):
        raise ConfigError(f"{where}: {key} = {v!r}: {msg}")
    return v


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, KEYS, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(f"{where}: unknown setting {key!r}{hint} (`jacpt config` lists them all)")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def profiles() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


@dataclass
class Config:
    profile: str
    values: dict[str, Any]
    origin: dict[str, str]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def section(self, name: str) -> dict[str, Any]:
        p = name + "."
        return {k[len(p):]: v for k, v in self.values.items() if k.startswith(p)}

    def show(self) -> str:
        width = max(map(len, self.values))
        return "\n".join(f"{k:<{width}}  {self.values[k]!r:<40}  # {self.origin[k]}" for k in sorted(self.values))

    def as_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, **dict(sorted(self.values.items()))}


def load(profile: str, overrides: list[str] | tuple[str, ...] = (), env: dict[str, str] | None = None) -> Config:
    """Resolve the settings of `profile`: defaults < configs/<profile>.yaml < env < key=value."""
    env = os.environ if env is None else env
    path = CONFIG_DIR / f"{profile}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown profile {profile!r}: choose one of {', '.join(profiles())} (files in {CONFIG_DIR})")
    values = {k: s.default for k, s in KEYS.items()}
    origin = {k: "default" for k in KEYS}

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data:, tokenizer:, ...)")
    for k, v in _flatten(raw).items():
        if k not in KEYS:
            raise _unknown(k, str(path))
        values[k], origin[k] = _coerce(k, KEYS[k], v, str(path)), f"profile {path.name}"

    for k, spec in KEYS.items():
        if spec.env and env.get(spec.env, "") != "":
            values[k], origin[k] = _coerce(k, spec, env[spec.env], f"env {spec.env}"), f"env {spec.env}"

    for item in overrides:
        k, eq, v = item.partition("=")
        if not eq:
            raise ConfigError(f"override {item!r}: write key=value, e.g. data.workers=4")
        k = k.strip()
        if k not in KEYS:
            raise _unknown(k, "command line")
        values[k], origin[k] = _coerce(k, KEYS[k], v, "command line"), "command line"

    if values["data.max_chars"] and values["data.max_chars"] < values["data.min_chars"]:
        raise ConfigError(f"data.max_chars ({values['data.max_chars']}) is below data.min_chars "
                          f"({values['data.min_chars']}): raise max_chars or set it to 0 (no limit)")
    return Config(profile=profile, values=values, origin=origin)


def largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of n that is at most limit (1 at least)."""
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def data_parallel(cfg: Config) -> int:
    """GPUs training one model side by side: launch.gpus on each of launch.nodes (nodes only under slurm; the
    launcher refuses several nodes elsewhere)."""
    return cfg["launch.gpus"] * (cfg["launch.nodes"] if cfg["launch.executor"] == "slurm" else 1)


def check_batches(cfg: Config, stage: str) -> None:
    """A training step is whole micro-batches on every GPU (Megatron refuses the run otherwise, after NeMo's
    start-up): checked before `make cpt` / `make lora` launch anything."""
    gbs, mbs = cfg[f"{stage}.global_batch_size"], cfg[f"{stage}.micro_batch_size"]
    gpus = data_parallel(cfg)
    if gbs % (mbs * gpus) == 0:
        return
    where = f"{mbs} x {gpus} GPUs" if gpus > 1 else str(mbs)
    fit = largest_divisor(gbs // gpus, mbs) if gbs % gpus == 0 else 0
    fix = (f"{stage}.micro_batch_size={fit}, or a global batch that is a multiple of {mbs * gpus}" if fit else
           f"a global batch that is a multiple of {mbs * gpus}")
    raise ConfigError(f"{stage}.global_batch_size ({gbs}) is not a multiple of {stage}.micro_batch_size ({where}): "
                      f"each optimizer step is whole micro-batches on every GPU. Fix: {fix}")
