"""Lightning callbacks the training stages add to NeMo's trainer: gates against silent traps, and metrics.

* RestoreGate: before the first step of a fresh run, the model's parameters must equal the
  imported checkpoint's (NeMo's pretrain recipe otherwise trains a random model and only logs
  "Training from scratch").
* LossGate: the first step's loss must be plausible for a trained model (a restored
  Qwen2.5-0.5B starts near 2-4 on Japanese Wikipedia; a random one near ln(151936) = 11.9).
* MetricsRecorder: one JSON line per step (loss, lr, grad norm, memory) and per validation,
  in the run directory, for the completion marker, the model card and the eval table.
* ParamCounter: before the first step (after NeMo's PEFT transform froze the base and added the
  adapters), one line with trainable vs total parameters, and `params.json` in the run directory.
* TrainingGuard: stops the run on a non-finite loss or gradient with one message naming the step
  and the fix; warns once when the gradient norm jumps past a multiple of its running median (or
  is non-finite where Megatron's own check is off).

The gradient norm is Megatron's: `ChainedOptimizer.step` (megatron/core/optimizer/optimizer.py:1129)
computes the total norm before clipping on every step, whatever `clip_grad` is, and NeMo's
MegatronStrategy logs it as `grad_norm` (megatron_strategy.py:766), so it reaches TensorBoard, wandb
and `trainer.callback_metrics`. Where an optimizer reports none, `grad_norm_of` computes it from the
trainable parameters' gradients and TrainingGuard logs it under the same name.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
import time
from collections import deque
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping

from jacpt import log
from jacpt.fsutil import write_json_atomic


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


def _unique_params(named_params) -> list[tuple[str, torch.nn.Parameter]]:
    """(name without wrapper prefixes, parameter), each tensor once: a tied weight is one parameter."""
    seen, out = set(), []
    for name, p in named_params:
        if p is None or id(p) in seen:
            continue
        seen.add(id(p))
        out.append((_strip(name), p))
    return out


def count_params(named_params) -> dict:
    """Trainable vs total parameters of a model (pass `named_parameters(remove_duplicate=False)`).

    Megatron wrappers (`module.` prefixes) are stripped and every tensor counts once, so tied
    input/output embeddings are one parameter. `trainable_by_name` sums the trainable parameters
    per name with the layer number replaced by `*` (for LoRA: the adapters it added).
    """
    params = _unique_params(named_params)
    total = sum(p.numel() for _, p in params)
    trainable = sum(p.numel() for _, p in params if p.requires_grad)
    groups: dict[str, int] = {}
    for name, p in params:
        if p.requires_grad:
            key = re.sub(r"(^|\.)layers\.\d+\.", r"\1layers.*.", name)
            groups[key] = groups.get(key, 0) + p.numel()
    return {"trainable": trainable, "total": total, "frozen": total - trainable,
            "trainable_pct": round(100.0 * trainable / total, 4) if total else 0.0,
            "trainable_by_name": groups}


_OWN_NORM = "_jacpt_computes_grad_norm"  # set on a module once its grad norm had to be computed here
_STEP_NORM = "_jacpt_grad_norm_of_step"  # on the trainer: (global_step, result) of the last grad_norm_of call


def grad_norm_of(trainer, pl_module) -> tuple[float | None, str]:
    """This step's gradient norm and where it came from: ("megatron", the value NeMo logged) or
    ("computed", the L2 norm over the trainable parameters' gradients on this rank, Megatron's
    `main_grad` buffer first; with data parallelism they are already all-reduced). (None, "none")
    when there are no gradients.

    Once a run's norm had to be computed, it is computed every step: the value TrainingGuard then
    logs as `grad_norm` stays in `callback_metrics` and would otherwise be read back, a step late.
    """
    step = getattr(trainer, "global_step", None)
    cached = getattr(trainer, _STEP_NORM, None)
    if cached is not None and step is not None and cached[0] == step:
        return cached[1]  # MetricsRecorder and TrainingGuard both ask at the end of each step: once is enough
    out = _grad_norm(trainer, pl_module)
    if step is not None:
        setattr(trainer, _STEP_NORM, (step, out))
    return out


def _grad_norm(trainer, pl_module) -> tuple[float | None, str]:
    m = getattr(trainer, "callback_metrics", None) or {}
    if "grad_norm" in m and not getattr(pl_module, _OWN_NORM, False):
        return float(m["grad_norm"]), "megatron"
    sq, found = 0.0, False
    for _, p in _unique_params(pl_module.named_parameters(remove_duplicate=False)):
        g = getattr(p, "main_grad", None)
        if g is None:
            g = p.grad
        if g is None or not p.requires_grad:
            continue
        found = True
        sq += float(g.detach().float().norm()) ** 2
    if not found:
        return None, "none"
    setattr(pl_module, _OWN_NORM, True)
    return math.sqrt(sq), "computed"


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
        if "lr" in m:
            rec["lr"] = float(m["lr"])
        grad_norm, _ = grad_norm_of(trainer, pl_module)
        if grad_norm is not None:
            rec["grad_norm"] = grad_norm
        if torch.cuda.is_available():
            rec["mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        self._write(rec)

    def on_validation_end(self, trainer, pl_module):
        if trainer.global_rank != 0 or trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        if "val_loss" in m:
            self._write({"step": trainer.global_step, "val_loss": float(m["val_loss"])})


class ParamCounter(pl.Callback):
    """Trainable vs total parameters, printed once and written to `path` (params.json) before the first step.

    It runs at the first `on_train_batch_start`, not `on_train_start`: NeMo's PEFT callback freezes
    the base and adds the adapters in `on_train_epoch_start` (nemo/lightning/pytorch/callbacks/
    model_transform.py), after `on_train_start`. Counts are of this rank's replica (the kit trains
    with tensor and pipeline parallelism 1, so that is the whole model).
    """

    def __init__(self, path: str, stage: str):
        self.path, self.stage = Path(path), stage
        self.done = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.done:
            return
        self.done = True
        if trainer.global_rank != 0:
            return
        info = {"stage": self.stage, "at_step": trainer.global_step,
                **count_params(pl_module.named_parameters(remove_duplicate=False))}
        write_json_atomic(self.path, info)
        log(f"parameters ({self.stage}): {info['trainable']:,} trainable of {info['total']:,} "
            f"({info['trainable_pct']:.2f}%); {self.path.name} in the run dir")


class TrainingGuard(pl.Callback):
    """Stops on a non-finite loss or gradient; warns once on a non-finite or exploding gradient norm.

    A step's loss or gradients turn nan or inf: with the kit's settings Megatron-Core's DDP finds
    it first (NeMo's default `check_for_nan_in_grad=True`: every gradient bucket is checked before
    the data-parallel all-reduce, megatron/core/distributed/param_and_grad_buffer.py:165, so the
    bad update is never applied) and raises a RuntimeError about a "local grad norm";
    `on_exception` puts the kit's `loss stop:` message, with the step and the fix, in front of it,
    as Lightning's DDPStrategy.on_exception augments messages. Without that check (another DDP
    setting) the loss reaches `on_train_batch_end`, which raises a GateError with the same message.

    A grad norm explodes when it exceeds `explode_factor` times the median of the last `window`
    finite norms, judged once `min_history` of them are known (0 turns that check off; the
    non-finite check stays). Each kind of warning is printed once, at its first occurrence; the
    count of later ones is printed when training ends.
    """

    MEGATRON_NONFINITE = re.compile(r"found (NaN|Inf) in local grad norm")

    def __init__(self, stage: str, lr: float, explode_factor: float, window: int = 100, min_history: int = 10):
        self.stage, self.lr, self.explode_factor = stage, lr, explode_factor
        self.window, self.min_history = window, min_history
        self.history: deque[float] = deque(maxlen=window)
        self.counts = {"explode": 0, "nonfinite": 0}
        self.first: dict[str, int] = {}

    def stop_message(self, what: str) -> str:
        return (f"loss stop: {what}. Training stops here: every update from now on would be non-finite too, and no "
                "checkpoint of this step is saved (the last one before it is kept; re-running the same settings "
                f"resumes from it and will most likely meet this again). Fix: lower the learning rate "
                f"({self.stage}.lr={self.lr:g}; try {self.stage}.lr={self.lr / 2:g}), check the data (`make data` "
                "re-validates it; the token ids must come from the model's tokenizer), then run the stage again "
                "(RUNBOOK.md: 'loss stop').")

    def on_exception(self, trainer, pl_module, exception):
        m = self.MEGATRON_NONFINITE.search(str(exception))
        if not m or not isinstance(exception, RuntimeError) or str(exception).startswith("loss stop:"):
            return
        step = trainer.global_step + 1  # the step being computed: global_step counts the finished ones
        what = f"the gradients at step {step} of {self.stage} are not finite ({m.group(1).lower()})"
        exception.args = (f"{self.stop_message(what)}\n  Megatron-Core's check said: {exception}",
                          *exception.args[1:])
        if trainer.global_rank == 0:
            log(self.stop_message(what))

    def _warn(self, trainer, kind: str, text: str) -> None:
        self.counts[kind] += 1
        if kind in self.first:
            return
        self.first[kind] = trainer.global_step
        if trainer.global_rank == 0:
            log(f"grad-norm warning: the gradient norm at step {trainer.global_step} of {self.stage} is {text}. "
                "Training goes on; if the loss rises or turns nan next, lower the learning rate "
                f"({self.stage}.lr={self.lr:g}) and check the data (RUNBOOK.md: 'grad-norm warning'). "
                "Further ones are counted, not printed.")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        loss = _loss_of(outputs)
        if loss is not None and not math.isfinite(loss):
            raise GateError(self.stop_message(f"the training loss at step {step} of {self.stage} is {loss}"))
        grad_norm, source = grad_norm_of(trainer, pl_module)
        if grad_norm is None:
            return
        if source == "computed":
            pl_module.log("grad_norm", grad_norm, batch_size=1)  # to TensorBoard/wandb, as NeMo would
        if not math.isfinite(grad_norm):
            self._warn(trainer, "nonfinite", f"{grad_norm} (not finite)")
            return
        if self.explode_factor > 0 and len(self.history) >= self.min_history:
            median = statistics.median(self.history)
            if median > 0 and grad_norm > self.explode_factor * median:
                self._warn(trainer, "explode", f"{grad_norm:.4g}, {grad_norm / median:.1f}x the running median "
                           f"{median:.4g} (above {self.stage}.grad_explode_factor={self.explode_factor:g})")
        self.history.append(grad_norm)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0 and any(self.counts.values()):
            log(f"grad-norm summary ({self.stage}): {self.counts['explode']} step(s) above "
                f"{self.explode_factor:g}x the running median, {self.counts['nonfinite']} non-finite; first at "
                + ", ".join(f"{k} step {v}" for k, v in sorted(self.first.items())))


class EarlyStop(EarlyStopping):
    """Lightning's EarlyStopping on `val_loss` (lower is better), saying in one line when and why it stops.

    `patience` counts validation checks (every `<stage>.val_check_interval` steps), not steps. The
    stop comes at a validation, where NeMo's checkpoint callback (always run after this one) saves
    the `-last` checkpoint of that step, which is the one the stage then consumes.
    """

    def __init__(self, stage: str, patience: int, min_delta: float, max_steps: int):
        super().__init__(monitor="val_loss", mode="min", patience=patience, min_delta=min_delta, strict=True,
                         check_finite=True, verbose=False)
        self.stage, self.max_steps = stage, max_steps

    def _run_early_stopping_check(self, trainer) -> None:
        stopping = trainer.should_stop
        super()._run_early_stopping_check(trainer)
        if trainer.should_stop and not stopping and trainer.global_rank == 0:
            current = float(trainer.callback_metrics[self.monitor])
            why = (f"val_loss is {current} (not finite)" if not math.isfinite(current) else
                   f"val_loss has not improved by more than {abs(self.min_delta):g} in {self.wait_count} "
                   f"validation check(s) (best {float(self.best_score):.4f}, now {current:.4f})")
            log(f"early stop ({self.stage}): {why}; stopping at step {trainer.global_step} of {self.max_steps}")
