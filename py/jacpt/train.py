"""CPT and LoRA: NeMo's Qwen2.5-0.5B recipes with everything they get wrong for this job replaced.

`llm.qwen25_500m.pretrain_recipe` trains a random model on mock data unless told otherwise;
its finetune recipe downloads SQuAD and restores `nemo://Qwen/Qwen2.5-0.5B`. Here:
the model config is the imported checkpoint's own (tied embeddings), the data modules read
the kit's data manifest with the Qwen tokenizer passed explicitly, resume restores the
imported (CPT) or CPT (LoRA) checkpoint, async checkpointing is off, and gates check that
the weights really were restored.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from jacpt import data as data_mod
from jacpt import nemo_compat, paths, runs
from jacpt.config import Config, largest_divisor

# Architecture fields taken from the imported checkpoint's config; dtype and fusion settings
# come from the trainer's precision plugin and the compatibility layer instead.
ARCH_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
               "kv_channels", "vocab_size", "seq_length", "rotary_base", "layernorm_epsilon", "init_method_std",
               "share_embeddings_and_output_weights", "make_vocab_size_divisible_by", "normalization",
               "gated_linear_unit", "add_bias_linear", "add_qkv_bias", "position_embedding_type")


PARAMS_JSON = "params.json"


class StageError(Exception):
    """A stage cannot start; the message names the missing input or bad setting and the fix."""


def te_present() -> bool:
    return not nemo_compat.need_no_te()


def cuda_present() -> bool:
    return not nemo_compat.need_cpu()


def checkpoint_config(ckpt: Path):
    from nemo.lightning import io

    return io.load_context(str(ckpt / "context"), subpath="model.config")


def config_of(src):
    """run.Config of a Qwen2 model config's architecture fields (plus the no-TE overrides, when needed)."""
    import nemo_run as run
    from nemo.collections import llm

    fields = {f: getattr(src, f) for f in ARCH_FIELDS if getattr(src, f, None) is not None}
    fields.update(nemo_compat.no_te_model_overrides())
    return run.Config(llm.Qwen2Config, **fields)


def model_config(ckpt: Path):
    """run.Config of the model config the checkpoint was saved with."""
    return config_of(checkpoint_config(ckpt))


def _tokenizer(tok_dir: Path):
    import nemo_run as run
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

    return run.Config(AutoTokenizer, pretrained_model_name=str(tok_dir))


def _wandb(cfg: Config, run_dir: Path, stage: str):
    """WandbLogger config (offline without WANDB_API_KEY), or None when disabled."""
    import nemo_run as run
    from lightning.pytorch.loggers import WandbLogger

    mode = cfg["wandb.mode"]
    if mode == "disabled":
        return None
    offline = mode == "offline" or (mode == "auto" and not os.environ.get("WANDB_API_KEY"))
    tags = [stage, cfg.profile] + [t.strip() for t in cfg["wandb.tags"].split(",") if t.strip()]
    (run_dir / "wandb").mkdir(exist_ok=True)
    return run.Config(WandbLogger, project=cfg["wandb.project"], name=f"{stage}-{run_dir.name}",
                      entity=cfg["wandb.entity"] or None, tags=tags, offline=offline,
                      save_dir=str(run_dir / "wandb"), config=cfg.as_dict())


def hygiene_callbacks(cfg: Config, section: str, run_dir: Path) -> list:
    """The kit's callbacks for every CPT and LoRA run, in the order they run.

    MetricsRecorder comes before TrainingGuard so that a non-finite step is recorded before the
    guard stops the run; EarlyStop only when `<section>.early_stop_patience` > 0.
    """
    import nemo_run as run

    from jacpt import callbacks

    s = cfg.section(section)
    out = [run.Config(callbacks.ParamCounter, path=str(run_dir / PARAMS_JSON), stage=section),
           run.Config(callbacks.MetricsRecorder, path=str(run_dir / "metrics.jsonl")),
           run.Config(callbacks.TrainingGuard, stage=section, lr=s["lr"], explode_factor=s["grad_explode_factor"])]
    if s["early_stop_patience"] > 0:
        out.append(run.Config(callbacks.EarlyStop, stage=section, patience=s["early_stop_patience"],
                              min_delta=s["early_stop_min_delta"], max_steps=s["max_steps"]))
    return out


def _common(recipe, cfg: Config, section: str, run_dir: Path) -> None:
    """Trainer, checkpointing, logging and CPU/no-TE settings shared by CPT and LoRA."""
    s = cfg.section(section)
    recipe.trainer.max_steps = s["max_steps"]
    recipe.trainer.val_check_interval = s["val_check_interval"]
    recipe.trainer.limit_val_batches = s["limit_val_batches"]
    recipe.trainer.limit_test_batches = 0
    recipe.trainer.num_sanity_val_steps = 0
    recipe.trainer.log_every_n_steps = s["log_every_n_steps"]
    recipe.trainer.strategy.ckpt_async_save = False  # async saves leave -unfinished checkpoints (NeMo #14293)
    recipe.trainer.callbacks = list(recipe.trainer.callbacks or []) + hygiene_callbacks(cfg, section, run_dir)
    recipe.loss_chunk_tokens = s["loss_chunk_tokens"]  # arguments of jacpt.tasks.pretrain/finetune
    recipe.fused_swiglu = s["fused_swiglu"]

    recipe.log.log_dir = str(run_dir)
    recipe.log.name = section
    recipe.log.use_datetime_version = False
    recipe.log.ckpt.save_last = True
    recipe.log.ckpt.save_top_k = s.get("save_top_k", 1)
    recipe.log.ckpt.every_n_train_steps = s["ckpt_every_n_steps"]
    recipe.log.ckpt.train_time_interval = None
    recipe.log.ckpt.filename = "{model_name}--{step}-{consumed_samples}"
    recipe.log.wandb = _wandb(cfg, run_dir, section)

    for k, v in nemo_compat.no_te_optimizer_overrides().items():
        setattr(recipe.optim.config, k, v)
    cpu = nemo_compat.cpu_trainer_overrides()
    if cpu:
        for k, v in cpu["trainer"].items():
            setattr(recipe.trainer, k, v)
        for k, v in cpu["optim"].items():
            setattr(recipe.optim.config, k, v)
        for k, v in cpu["data"].items():
            setattr(recipe.data, k, v)


def manifest_path(cfg: Config) -> Path:
    p = data_mod.out_dir(cfg) / data_mod.MANIFEST
    if not p.is_file():
        raise StageError(f"no data for profile {cfg.profile} ({p} missing): run `make data PROFILE={cfg.profile}`")
    return p


def tokenizer_gate(manifest: dict, ckpt_tok_fp: str, what: str) -> None:
    if manifest["tokenizer"]["fingerprint"] != ckpt_tok_fp:
        raise StageError(f"tokenizer mismatch: the data was tokenised with {manifest['tokenizer']['dir']} "
                         f"({manifest['tokenizer']['fingerprint'][:12]}) but {what} carries another tokenizer "
                         f"({ckpt_tok_fp[:12]}); re-run `make data` with TOKENIZER_DIR set to the model's tokenizer")


def build_cpt(cfg: Config, run_dir: Path, imported: runs.Run, manifest: dict):
    import nemo_run as run
    from nemo import lightning as nl
    from nemo.collections import llm

    from jacpt import callbacks, tasks

    out = imported.outputs()
    ckpt = imported.dir / out["checkpoint"]
    c = cfg.section("cpt")
    gpus, nodes = cfg["launch.gpus"], cfg["launch.nodes"] if cfg["launch.executor"] == "slurm" else 1
    recipe = llm.qwen25_500m.pretrain_recipe(
        dir=str(run_dir), name="cpt", num_nodes=nodes, num_gpus_per_node=gpus, max_steps=c["max_steps"],
        global_batch_size=c["global_batch_size"], micro_batch_size=c["micro_batch_size"],
        seq_length=c["seq_length"], warmup_steps=c["warmup_steps"], min_lr=c["min_lr"], max_lr=c["lr"],
        fn=tasks.pretrain)
    recipe.model = run.Config(llm.Qwen2Model, config=model_config(ckpt))
    m = manifest["megatron"]
    recipe.data = run.Config(
        llm.PreTrainingDataModule,
        paths={"train": [m["train"]["prefix_path"]], "validation": [m["validation"]["prefix_path"]],
               "test": [m["validation"]["prefix_path"]]},
        seq_length=c["seq_length"], micro_batch_size=c["micro_batch_size"],
        global_batch_size=c["global_batch_size"], tokenizer=_tokenizer(ckpt / "context" / "nemo_tokenizer"),
        index_mapping_dir=str(run_dir / "index_cache"), num_workers=2, persistent_workers=False)
    recipe.resume = run.Config(nl.AutoResume, restore_config=run.Config(nl.RestoreConfig, path=str(ckpt)),
                               resume_if_exists=True, resume_ignore_no_checkpoint=True)
    _common(recipe, cfg, "cpt", run_dir)
    recipe.trainer.callbacks.append(run.Config(callbacks.RestoreGate, expected=out["param_fingerprint"],
                                               source=str(ckpt)))
    recipe.trainer.callbacks.append(run.Config(callbacks.LossGate, max_first_loss=c["loss_gate"]))
    return recipe


def lora_validation_gate(manifest: dict, global_batch_size: int, micro_batch_size: int = 1) -> None:
    """Validation runs in whole global batches: with fewer examples than one, NeMo runs no validation, so
    there is no val_loss, no early stopping and no checkpoint at the end (seen with the sample corpus)."""
    n = (manifest["lora"].get("examples") or {}).get("validation.jsonl")
    if n is None or n >= global_batch_size:
        return
    gbs = 1 << (n.bit_length() - 1) if n else 0
    mbs = f" lora.micro_batch_size={largest_divisor(gbs, micro_batch_size)}" if gbs % micro_batch_size else ""
    smaller = (f"a smaller global batch, e.g. OVERRIDES=\"lora.global_batch_size={gbs}{mbs}\" (the largest power "
               "of two it can fill), or " if n else "")
    raise StageError(f"the LoRA validation set ({manifest['lora']['dir_path']}/validation.jsonl) has {n} "
                     f"examples, fewer than one global batch (lora.global_batch_size={global_batch_size}): no "
                     f"validation would run and no checkpoint would be saved. Fix: {smaller}more validation "
                     "examples (data.lora_max_eval, or a larger corpus)")


def build_lora(cfg: Config, run_dir: Path, cpt: runs.Run, manifest: dict):
    import fiddle as fdl
    import nemo_run as run
    from nemo import lightning as nl
    from nemo.collections import llm

    from jacpt import tasks

    ckpt = cpt.dir / cpt.outputs()["checkpoint"]
    c = cfg.section("lora")
    lora_validation_gate(manifest, c["global_batch_size"], c["micro_batch_size"])
    gpus, nodes = cfg["launch.gpus"], cfg["launch.nodes"] if cfg["launch.executor"] == "slurm" else 1
    recipe = llm.qwen25_500m.finetune_recipe(dir=str(run_dir), name="lora", num_nodes=nodes,
                                             num_gpus_per_node=gpus, peft_scheme="lora")
    fdl.update_callable(recipe, tasks.finetune)  # same arguments as llm.finetune; applies the compat layer
    recipe.model = run.Config(llm.Qwen2Model, config=model_config(ckpt))
    recipe.peft = run.Config(llm.peft.LoRA, target_modules=[t.strip() for t in c["targets"].split(",")],
                             dim=c["dim"], alpha=c["alpha"], dropout=c["dropout"])
    recipe.data = run.Config(
        llm.FineTuningDataModule, dataset_root=manifest["lora"]["dir_path"], seq_length=c["seq_length"],
        micro_batch_size=c["micro_batch_size"], global_batch_size=c["global_batch_size"],
        tokenizer=_tokenizer(ckpt / "context" / "nemo_tokenizer"), num_workers=2, persistent_workers=False)
    recipe.optim.config.lr = c["lr"]
    recipe.optim.lr_scheduler.warmup_steps = c["warmup_steps"]
    recipe.trainer.strategy.ddp = "megatron"
    recipe.resume = run.Config(nl.AutoResume, restore_config=run.Config(nl.RestoreConfig, path=str(ckpt)),
                               resume_if_exists=True, resume_ignore_no_checkpoint=True)
    recipe.fused_lora_update = c["fused_update"]  # an argument of jacpt.tasks.finetune
    _common(recipe, cfg, "lora", run_dir)
    return recipe


def last_checkpoint(run_dir: Path, stage: str) -> Path:
    """The newest complete checkpoint NeMo wrote for this run (never an -unfinished one)."""
    ckdir = run_dir / stage / "checkpoints"
    cands = [d for d in ckdir.glob("*") if d.is_dir() and (d / "context").is_dir() and (d / "weights").is_dir()
             and not d.name.endswith("-unfinished") and not Path(str(d) + "-unfinished").exists()]
    if not cands:
        raise StageError(f"no complete checkpoint under {ckdir}: the run did not save one; see its logs")

    def step(d: Path) -> tuple[int, int]:
        m = re.search(r"step=(\d+)", d.name)
        return (int(m.group(1)) if m else -1, d.name.endswith("-last"))

    return max(cands, key=step)


def _metric_records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train, validation) records of metrics.jsonl, in file order (a resumed run appends)."""
    path = run_dir / "metrics.jsonl"
    train, val = [], []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            (val if "val_loss" in rec else train).append(rec)
    return train, val


def read_metrics(run_dir: Path) -> dict:
    """Summary of metrics.jsonl: steps, first/last train loss, last val loss."""
    train, val = _metric_records(run_dir)
    losses = [r["loss"] for r in train if r.get("loss") is not None]
    return {"steps_logged": len(train), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "val_loss": val[-1]["val_loss"] if val else None}


def checkpoint_step(ckpt: Path) -> int | None:
    """Optimizer steps done when NeMo saved `ckpt`: its name's `step=N` is the 0-based index of the
    last step (NeMo logs `step` before the step's update), so N + 1."""
    m = re.search(r"step=(\d+)", ckpt.name)
    return int(m.group(1)) + 1 if m else None


def steps_done(run_dir: Path, ckpt: Path | None = None) -> int:
    """Optimizer steps the run actually did: the last training record of metrics.jsonl (its `step`
    is 1-based). It is below max_steps when early stopping ended the run. With `ckpt`, the
    checkpoint must be of that same step: it is the one later stages consume."""
    train, _ = _metric_records(run_dir)
    from_metrics = int(train[-1]["step"]) if train else None
    from_ckpt = checkpoint_step(ckpt) if ckpt is not None else None
    if from_metrics is None and from_ckpt is None:
        raise StageError(f"{run_dir / 'metrics.jsonl'} has no training step and no checkpoint names one: "
                         "the run did not train; see its logs")
    if from_metrics is not None and from_ckpt is not None and from_metrics != from_ckpt:
        raise StageError(f"the last checkpoint {ckpt} was saved after step {from_ckpt} but the run ended at step "
                         f"{from_metrics} ({run_dir / 'metrics.jsonl'}): it would hand on older weights than "
                         "it trained. Delete the run dir and train again")
    return from_metrics if from_metrics is not None else from_ckpt


def read_params(run_dir: Path) -> dict:
    """Trainable/total parameter counts from the run's params.json (written before the first step)."""
    path = run_dir / PARAMS_JSON
    if not path.is_file():
        raise StageError(f"{path} is missing: no training step of this run wrote its parameter counts (a run "
                         "begun by an older kit, or one that never trained); delete the run dir and train again")
    p = json.loads(path.read_text(encoding="utf-8"))
    return {"trainable_params": p["trainable"], "total_params": p["total"], "trainable_pct": p["trainable_pct"]}


def env_for_child() -> dict[str, str]:
    env = {"PYTHONPATH": str(paths.KIT_ROOT / "py"), "NEMO_LOG_MEMORY_USAGE": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    for k in ("WANDB_API_KEY", "WANDB_MODE", "NEMO_HOME", "HF_HOME", "JACPT_RUNS_DIR", "JACPT_DATA_DIR",
              "JACPT_ASSETS_DIR"):
        if os.environ.get(k):
            env[k] = os.environ[k]
    return env
