"""Lightning callbacks the training stages add to NeMo's trainer: gates against silent traps, and metrics.

* RestoreGate: before the first step of a fresh run, the model's parameters must equal the
  imported checkpoint's (NeMo's pretrain recipe otherwise trains a random model and only logs
  "Training from scratch").
* LossGate: the first step's loss must be plausible for a trained model (a restored
  Qwen2.5-0.5B starts near 2-4 on Japanese Wikipedia; a random one near ln(151936) = 11.9).
* MetricsRecorder: one JSON line per step (loss, lr, grad norm, memory) and per validation,
  in the run directory, for the completion marker, the model card and the eval table.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import lightning.pytorch as pl
import torch


class GateError(RuntimeError):
    """A training gate tripped; the message explains the likely cause and the fix."""


def _strip(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def param_fingerprint(named_params) -> str:
    """sha256 over parameter names (wrappers stripped) and values as fp32: equal weights, equal print.

    Adapter parameters (LoRA) are excluded: they are new, not restored.
    """
    h = hashlib.sha256()
    items = sorted((_strip(n), p) for n, p in named_params if "adapter" not in n)
    for name, p in items:
        h.update(name.encode())
        h.update(p.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _loss_of(outputs) -> float | None:
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    try:
        return float(loss)
    except (TypeError, ValueError):
        return None


class RestoreGate(pl.Callback):
    def __init__(self, expected: str, source: str):
        self.expected, self.source = expected, source

    def on_train_start(self, trainer, pl_module):
        if trainer.global_step > 0:
            print(f"[jacpt] restore gate: resuming at step {trainer.global_step}; weights come from the run's "
                  "own checkpoint", flush=True)
            return
        got = param_fingerprint(pl_module.named_parameters())
        if got != self.expected:
            raise GateError(
                f"restore gate: the model's weights at step 0 are not those of {self.source} "
                f"(fingerprint {got[:12]} != {self.expected[:12]}). Training would start from a random or other "
                "model. Check that resume.restore_config points at the imported checkpoint and that the model "
                "config matches it (RUNBOOK: 'Training from scratch').")
        print(f"[jacpt] restore gate: weights at step 0 equal {self.source} ({got[:12]})", flush=True)


class LossGate(pl.Callback):
    def __init__(self, max_first_loss: float):
        self.max_first_loss = max_first_loss
        self.checked = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.checked or self.max_first_loss <= 0:
            return
        self.checked = True
        if trainer.global_step > 1:  # resumed run: the gate is for the first step of a fresh one
            return
        loss = _loss_of(outputs)
        if loss is not None and (not math.isfinite(loss) or loss > self.max_first_loss):
            raise GateError(
                f"loss gate: the first step's loss is {loss:.2f}, above cpt.loss_gate={self.max_first_loss}. "
                f"A trained Qwen2.5 starts near 2-4 on Japanese text; ~{math.log(151936):.1f} means a random "
                "model or a tokenizer that does not match the data (RUNBOOK: 'loss ≈ 12 at step 0').")


class MetricsRecorder(pl.Callback):
    """Appends {"step", "loss", "lr", "grad_norm", "mem_gib", "t"} per step and {"step", "val_loss"} per check.

    "step" counts optimizer steps completed (Lightning's global_step after the batch), so it is 1-based.
    """

    def __init__(self, path: str):
        self.path = Path(path)
        self.t0 = time.time()

    def _write(self, rec: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank != 0:
            return
        m = trainer.callback_metrics
        rec = {"step": trainer.global_step, "loss": _loss_of(outputs), "t": round(time.time() - self.t0, 3)}
        for key, name in (("lr", "lr"), ("grad_norm", "grad_norm")):
            if name in m:
                rec[key] = float(m[name])
        if torch.cuda.is_available():
            rec["mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        self._write(rec)

    def on_validation_end(self, trainer, pl_module):
        if trainer.global_rank != 0 or trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        if "val_loss" in m:
            self._write({"step": trainer.global_step, "val_loss": float(m["val_loss"])})
