"""Run directories: one per stage run, with provenance, and a completion marker written last.

    runs/<profile>/<stage>-<YYYYmmdd-HHMMSS>/
        run.json        stage, profile, argv, resolved settings, git commit, versions, inputs
        git.diff        uncommitted changes at launch (when any)
        COMPLETE.json   written last: the outputs a later stage consumes
        ...             the stage's own files (checkpoints, logs, wandb, tensorboard)

Every checkpoint a later stage or a teammate consumes (the import's `model/`, the last CPT and
LoRA checkpoints, each exported HF dir) gets a `model_info.json` beside its files, written before
COMPLETE.json: what the model is, where it came from and how it was trained (`model_info`).

Later stages find their input by marker (`latest_complete`), never by guessing file
names. A stage re-run with the same inputs and settings finds its complete run and does
nothing; an incomplete run with the same inputs is resumed in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from jacpt import paths
from jacpt.fsutil import write_json_atomic, write_text_atomic

MARKER = "COMPLETE.json"
RUN_JSON = "run.json"
MODEL_INFO = "model_info.json"
MODEL_TYPES = ("base", "CPT", "LoRA", "merged")
LORA_KEYS = ("dim", "alpha", "dropout", "targets")
_DISTS = ("jacpt", "nemo-toolkit", "megatron-core", "nemo-run", "lightning", "torch", "transformers", "tokenizers",
          "tiktoken", "numpy", "transformer-engine", "wandb")


class RunError(Exception):
    """A run directory is missing, incomplete or inconsistent; the message says which command fixes it."""


def runs_root() -> Path:
    return Path(os.environ.get("JACPT_RUNS_DIR") or paths.KIT_ROOT / "runs").resolve()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in _DISTS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(paths.KIT_ROOT), *args], capture_output=True, text=True,
                              timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Run:
    dir: Path
    stage: str

    @property
    def complete(self) -> bool:
        return (self.dir / MARKER).is_file()

    def info(self) -> dict:
        return json.loads((self.dir / RUN_JSON).read_text(encoding="utf-8"))

    def outputs(self) -> dict:
        if not self.complete:
            raise RunError(f"{self.dir} has no {MARKER}: the {self.stage} run did not finish; run `make {self.stage}`")
        return json.loads((self.dir / MARKER).read_text(encoding="utf-8"))

    def mark_complete(self, outputs: dict) -> None:
        outputs = {"stage": self.stage, "finished_utc": _now(), **outputs}
        write_json_atomic(self.dir / MARKER, outputs)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def stage_runs(profile: str, stage: str) -> list[Run]:
    """All run dirs of a stage for a profile, oldest first."""
    root = runs_root() / profile
    if not root.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(stage)}-\d{{8}}-\d{{6}}(-\d+)?$")  # not the -dry-run dir
    return [Run(d, stage) for d in sorted(root.iterdir()) if pattern.match(d.name) and (d / RUN_JSON).is_file()]


def latest_complete(profile: str, stage: str, key: str | None = None) -> Run:
    """The newest complete run of `stage` (with input key `key`, when given), or a RunError naming the fix."""
    for run in reversed(stage_runs(profile, stage)):
        if run.complete and (key is None or run.info().get("key") == key):
            return run
    raise RunError(f"no complete {stage} run for profile {profile} under {runs_root() / profile}: "
                   f"run `make {stage} PROFILE={profile}` first")


def open_run(cfg, stage: str, key_material: dict, inputs: dict, argv: list[str] | None = None,
             dry_run: bool = False) -> tuple[Run, str]:
    """The run dir for this stage: ("done", a complete run with the same key), ("resume", an incomplete
    one with the same key) or ("new", a fresh dir). `key_material` is what decides the outputs."""
    key = fingerprint(key_material)
    existing = stage_runs(cfg.profile, stage)
    if not dry_run:
        for run in reversed(existing):
            if run.info().get("key") == key and run.complete:
                return run, "done"
        if existing and not existing[-1].complete and existing[-1].info().get("key") == key:
            return existing[-1], "resume"  # only the newest run is resumed; older ones stay as they are
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    d = runs_root() / cfg.profile / f"{stage}-{stamp}"
    n = 1
    while d.exists():
        n += 1
        d = runs_root() / cfg.profile / f"{stage}-{stamp}-{n}"
    if dry_run:
        d = runs_root() / cfg.profile / f"{stage}-dry-run"
    run = Run(d, stage)
    d.mkdir(parents=True, exist_ok=True)
    diff = _git("diff", "HEAD")
    info = {
        "stage": stage, "profile": cfg.profile, "key": key, "started_utc": _now(),
        "argv": argv if argv is not None else sys.argv, "host": socket.gethostname(),
        "git": {"commit": _git("rev-parse", "HEAD").strip(), "dirty": bool(diff.strip())},
        "container": {"nemo_image": os.environ.get("NEMO_IMAGE", ""), "in_container": Path("/opt/NeMo").is_dir()},
        "settings": cfg.as_dict(), "inputs": inputs, "versions": versions(),
    }
    if diff.strip():
        write_text_atomic(d / "git.diff", diff)
    write_json_atomic(d / RUN_JSON, info)
    return run, "new"


# ----------------------------------------------------------------------------- model_info.json

def model_info(model_type: str, checkpoint: Path, outputs: dict, run_info: dict, base_model: dict,
               lineage: list[dict]) -> dict:
    """The model_info.json of a checkpoint made by a run.

    outputs: what the run's COMPLETE.json says (or will say): steps, tokens, last_loss, val_loss,
    trainable_params, total_params, trainable_pct, tokenizer_fingerprint; run_info: its run.json
    (settings, inputs). base_model: {name, hf_dir, ...}; lineage: the models it was made from,
    nearest first (`lineage_entry`).
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r}: use one of {', '.join(MODEL_TYPES)}")
    settings = run_info.get("settings", {})
    lora = ({k: settings.get(f"lora.{k}") for k in LORA_KEYS} if model_type in ("LoRA", "merged") else None)
    return {
        "format": 1, "model_type": model_type, "checkpoint": str(checkpoint), "created_utc": _now(),
        "base_model": base_model,
        "data_manifest_sha256": run_info.get("inputs", {}).get("data_manifest_sha256"),
        "steps": outputs.get("steps", 0), "tokens_seen": outputs.get("tokens", 0),
        "final_train_loss": outputs.get("last_loss"), "final_val_loss": outputs.get("val_loss"),
        "trainable_params": outputs.get("trainable_params"), "total_params": outputs.get("total_params"),
        "trainable_pct": outputs.get("trainable_pct"), "lora": lora,
        "tokenizer_fingerprint": outputs.get("tokenizer_fingerprint"), "lineage": lineage,
        "versions": versions(), "config": settings,
    }


def lineage_entry(info: dict) -> dict:
    """One line of a model's lineage: the parent it was trained or converted from."""
    return {k: info.get(k) for k in ("model_type", "checkpoint", "steps", "tokens_seen", "final_val_loss")}


def derived_info(info: dict, model_type: str, checkpoint: Path, **extra) -> dict:
    """The model_info of a model converted from the one `info` describes (an HF export): the same
    training record, a new type, place, time and versions, and that model first in the lineage."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r}: use one of {', '.join(MODEL_TYPES)}")
    return {**info, "model_type": model_type, "checkpoint": str(checkpoint), "created_utc": _now(),
            "versions": versions(), "lineage": [lineage_entry(info), *info["lineage"]], **extra}


def read_model_info(d: Path) -> dict | None:
    """The model_info.json beside a checkpoint's files, or None (a run made before the kit wrote them)."""
    path = Path(d) / MODEL_INFO
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_model_info(d: Path, info: dict) -> Path:
    """Write `d`/model_info.json atomically (a top-level file in a NeMo checkpoint dir, beside
    context/ and weights/, which NeMo's loaders never list)."""
    path = Path(d) / MODEL_INFO
    write_json_atomic(path, info)
    return path
