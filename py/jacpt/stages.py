"""The NeMo stages as the CLI runs them: find inputs by marker, open a run dir, dry-run or launch, mark done."""

from __future__ import annotations

import json
from pathlib import Path

from jacpt import log
from jacpt import assets, data as data_mod, paths, runs
from jacpt.config import Config, check_batches
from jacpt.fsutil import sha256_file, write_text_atomic
from jacpt.train import StageError



def serialize(partial) -> str:
    from nemo_run.core.serialization.yaml import YamlSerializer

    return YamlSerializer().serialize(partial)


# ----------------------------------------------------------------------------- import

HF_REQUIRED = ("config.json", "generation_config.json", "tokenizer_config.json")


def hf_dir(cfg: Config) -> Path:
    v = cfg["model.hf_dir"]
    if v == "tiny":
        return paths.assets_dir() / "tiny-qwen2"
    if v:
        return paths.resolve(v)
    import os

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise StageError(f"model.hf_dir is empty and HF_HUB_OFFLINE=1: set HF_MODEL_DIR to a local snapshot of "
                         f"{cfg['model.hf_id']} (huggingface-cli download {cfg['model.hf_id']} --local-dir DIR)")
    from huggingface_hub import snapshot_download

    log(f"downloading {cfg['model.hf_id']} from the Hugging Face Hub")
    try:
        return Path(snapshot_download(cfg["model.hf_id"]))
    except Exception as e:  # network, auth, gated: all end the same way for the user
        raise StageError(f"could not download {cfg['model.hf_id']} ({type(e).__name__}: {e}); download it "
                         "where the hub is reachable and set HF_MODEL_DIR to that directory") from None


def check_hf_dir(d: Path, expect_layers: int) -> dict:
    if not d.is_dir():
        raise StageError(f"HF model directory {d} does not exist: set HF_MODEL_DIR (or run `make assets` for "
                         "the tiny model)")
    missing = [f for f in HF_REQUIRED if not (d / f).is_file()]
    weights = sorted(d.glob("*.safetensors")) or sorted(d.glob("*.bin"))
    if missing or not weights:
        raise StageError(f"{d} is not a complete HF model: missing {', '.join(missing + ([] if weights else ['weights (*.safetensors)']))}")
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    if cfg.get("model_type") != "qwen2":
        raise StageError(f"{d}/config.json has model_type {cfg.get('model_type')!r}; this kit imports Qwen2/Qwen2.5")
    if expect_layers and cfg.get("num_hidden_layers") != expect_layers:
        raise StageError(f"{d} has {cfg.get('num_hidden_layers')} layers but the profile expects {expect_layers} "
                         "(model.expect_layers): wrong snapshot for this profile?")
    names = [p.name for p in weights] + [f for f in ("config.json", "generation_config.json", "tokenizer.json",
                                                     "vocab.json", "merges.txt", "tokenizer_config.json")
                                         if (d / f).is_file()]
    return {n: sha256_file(d / n) for n in names}


def base_model(cfg: Config, src: Path, files: dict) -> dict:
    """model_info.json's base_model: the HF model imported, by name, directory and file checksums."""
    name = "tiny-qwen2 (the kit's embedded test model)" if cfg["model.hf_dir"] == "tiny" else cfg["model.hf_id"]
    return {"name": name, "hf_dir": str(src), "hf_files_sha256": files}


def import_stage(cfg: Config, dry_run: bool) -> Path:
    from jacpt.train import config_of, te_present

    src = hf_dir(cfg)
    files = check_hf_dir(src, cfg["model.expect_layers"])
    key = {"hf_files": files, "te": te_present(), "format": 1}
    run, state = runs.open_run(cfg, "import", key, inputs={"hf_dir": str(src), "hf_files": files}, dry_run=dry_run)
    if state == "done":
        log(f"up to date: {run.dir} (same HF files)")
        return run.dir / runs.MARKER

    import nemo_run as rn
    from nemo.collections import llm

    from jacpt import qwen

    out = run.dir / "model"
    config = qwen.HFQwen2TiedImporter(str(src)).config
    task = rn.Partial(llm.import_ckpt, model=rn.Config(llm.Qwen2Model, config=config_of(config)),
                      source=f"hf://{src}", output_path=str(out), overwrite=True)
    text = serialize(task)
    write_text_atomic(run.dir / "recipe.yaml", text)
    if dry_run:
        print(text)
        print(f"# launch: in this process (never under torchrun): llm.import_ckpt(...) -> {out}")
        return run.dir / "recipe.yaml"

    import fiddle as fdl

    from jacpt import nemo_compat

    applied = nemo_compat.apply()
    if applied:
        log(f"compatibility patches ({len(applied)}): {'; '.join(applied)}")
    log(f"import {src} -> {out}")
    fdl.build(task)()
    tok_fp = assets.tokenizer_fingerprint(out / "context" / "nemo_tokenizer")
    outputs = {"checkpoint": "model", "hf_dir": str(src), "tokenizer_fingerprint": tok_fp, **qwen.LAST_IMPORT}
    runs.write_model_info(out, runs.model_info(
        "base", out, {**outputs, "total_params": qwen.LAST_IMPORT.get("params")}, run.info(),
        base_model=base_model(cfg, src, files), lineage=[]))
    run.mark_complete(outputs)
    log(f"imported: {qwen.LAST_IMPORT.get('params'):,} parameters, tied={qwen.LAST_IMPORT.get('tied')}")
    return run.dir / runs.MARKER


# ----------------------------------------------------------------------------- cpt and lora

def _train_stage(cfg: Config, stage: str, dry_run: bool) -> Path:
    from jacpt import launch, train

    check_batches(cfg, stage)
    mpath = train.manifest_path(cfg)
    manifest = data_mod.load_manifest(mpath)
    if stage == "cpt":
        parent = runs.latest_complete(cfg.profile, "import")
        parent_tok = parent.outputs()["tokenizer_fingerprint"]
        train.tokenizer_gate(manifest, parent_tok, f"the imported checkpoint {parent.dir}")
    else:
        parent = runs.latest_complete(cfg.profile, "cpt")
        parent_tok = parent.outputs()["tokenizer_fingerprint"]
        train.tokenizer_gate(manifest, parent_tok, f"the CPT checkpoint {parent.dir}")
    section = {k: v for k, v in cfg.as_dict().items()
               if k.startswith((f"{stage}.", "launch.", "slurm.", "wandb."))}
    key = {"parent": parent.info()["key"], "parent_dir": str(parent.dir), "data": manifest["input_fingerprint"],
           "settings": section, "te": train.te_present(), "cuda": train.cuda_present(), "format": 1}
    inputs = {"parent_run": str(parent.dir), "data_manifest": str(mpath),
              "data_manifest_sha256": sha256_file(mpath)}
    run, state = runs.open_run(cfg, stage, key, inputs=inputs, dry_run=dry_run)
    if state == "done":
        log(f"up to date: {run.dir} (same inputs and settings; delete it to train again)")
        return run.dir / runs.MARKER
    if state == "resume":
        log(f"resuming {run.dir} from its last checkpoint")

    recipe = (train.build_cpt if stage == "cpt" else train.build_lora)(cfg, run.dir, parent, manifest)
    text = serialize(recipe)
    write_text_atomic(run.dir / "recipe.yaml", text)
    result = launch.launch(recipe, cfg, run.dir, name=stage, env_vars=train.env_for_child(), dry_run=dry_run)
    if dry_run:
        print(text)
        print("# launch:\n" + Path(result["launch_txt"]).read_text(encoding="utf-8"))
        return run.dir / "recipe.yaml"

    ckpt = train.last_checkpoint(run.dir, stage)
    tok_fp = assets.tokenizer_fingerprint(ckpt / "context" / "nemo_tokenizer")
    if tok_fp != parent_tok:
        raise StageError(f"{ckpt} carries another tokenizer than its parent ({tok_fp[:12]} != {parent_tok[:12]})")
    outputs = train_outputs(cfg, stage, run.dir, ckpt, tok_fp)
    parent_ckpt = parent.dir / parent.outputs()["checkpoint"]
    runs.write_model_info(ckpt, runs.model_info(
        "CPT" if stage == "cpt" else "LoRA", ckpt, outputs, run.info(), **inherited(parent, parent_ckpt, cfg)))
    run.mark_complete(outputs)
    log(f"{stage} done: {ckpt}")
    return run.dir / runs.MARKER


def train_outputs(cfg: Config, stage: str, run_dir: Path, ckpt: Path, tok_fp: str) -> dict:
    """COMPLETE.json of a finished CPT or LoRA run: the checkpoint consumed, the steps actually done
    (fewer than max_steps when early stopping ended the run), tokens seen, losses, parameter counts."""
    from jacpt import train

    c = cfg.section(stage)
    steps = train.steps_done(run_dir, ckpt)
    if steps < c["max_steps"]:
        why = ("early stopping on val_loss" if c["early_stop_patience"] > 0 else
               "early stopping is off, so something else ended it: see the run's logs")
        log(f"{stage} ended at step {steps} of {stage}.max_steps={c['max_steps']} ({why}); recording {steps} steps")
    return {"checkpoint": str(ckpt.relative_to(run_dir)), "tokenizer_fingerprint": tok_fp, "steps": steps,
            "max_steps": c["max_steps"], "stopped_early": steps < c["max_steps"],
            "tokens": steps * c["global_batch_size"] * c["seq_length"], **train.read_metrics(run_dir),
            **train.read_params(run_dir)}


def inherited(parent: runs.Run, parent_ckpt: Path, cfg: Config) -> dict:
    """base_model and lineage for a model made from `parent_ckpt` (from its model_info.json; for a
    parent written before the kit wrote them, what its run records)."""
    info = runs.read_model_info(parent_ckpt)
    if info is None:
        out = parent.outputs()
        base = {"name": cfg["model.hf_id"], "hf_dir": out.get("hf_dir")}
        kind = {"import": "base", "cpt": "CPT", "lora": "LoRA"}.get(parent.stage)
        return {"base_model": base, "lineage": [{"model_type": kind, "checkpoint": str(parent_ckpt),
                                                 "steps": out.get("steps"), "tokens_seen": out.get("tokens"),
                                                 "final_val_loss": out.get("val_loss")}]}
    return {"base_model": info["base_model"], "lineage": [runs.lineage_entry(info), *info["lineage"]]}


def cpt_stage(cfg: Config, dry_run: bool) -> Path:
    return _train_stage(cfg, "cpt", dry_run)


def lora_stage(cfg: Config, dry_run: bool) -> Path:
    return _train_stage(cfg, "lora", dry_run)
