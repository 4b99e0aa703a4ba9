"""`jacpt export`: the hand-off. CPT and LoRA-merged models as Hugging Face directories.

For each model: `llm.export_ckpt(target="hf")` (LoRA first through `llm.peft.merge_lora`: NeMo 2.3
has no adapter-only HF export for Qwen2), then `config.json` is checked against the base model's
(`max_position_embeddings` back to the model's own: NeMo writes the training seq_length;
`tie_word_embeddings` true, as the model is), `generation_config.json` comes from the base, a
model card and a SHA256SUMS are written, and the CPT hand-off is logged as a wandb artifact
(offline without a key).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from jacpt import log
from jacpt import assets, data as data_mod, runs
from jacpt.config import Config
from jacpt.fsutil import sha256_file, write_json_atomic, write_text_atomic
from jacpt.train import StageError

MODELS = ("cpt", "lora")
# Settings the exported config takes from the base model rather than from NeMo's exporter.
BASE_CONFIG_KEYS = ("max_position_embeddings", "max_window_layers", "bos_token_id", "eos_token_id", "rope_theta",
                    "rope_scaling", "use_sliding_window", "sliding_window")



def fix_config(hf_out: Path, base_hf: Path) -> dict:
    """Make the exported config.json match the base model's architecture; return what changed."""
    path = hf_out / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    base = json.loads((base_hf / "config.json").read_text(encoding="utf-8"))
    changed = {}
    for k in BASE_CONFIG_KEYS:
        if k in base and cfg.get(k) != base[k]:
            changed[k] = [cfg.get(k), base[k]]
            cfg[k] = base[k]
    from safetensors import safe_open

    names = set()
    for f in hf_out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            names.update(sf.keys())
    tied = "lm_head.weight" not in names
    if cfg.get("tie_word_embeddings") != tied:
        changed["tie_word_embeddings"] = [cfg.get("tie_word_embeddings"), tied]
        cfg["tie_word_embeddings"] = tied
    if tied != bool(base.get("tie_word_embeddings", False)):
        raise StageError(f"{hf_out}: exported model tied={tied} but the base model is "
                         f"tied={base.get('tie_word_embeddings')}; the conversion changed the architecture")
    write_text_atomic(path, json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    if (base_hf / "generation_config.json").is_file():
        shutil.copyfile(base_hf / "generation_config.json", hf_out / "generation_config.json")
    return changed


def write_sums(d: Path) -> dict[str, str]:
    sums = {p.name: sha256_file(p) for p in sorted(d.iterdir()) if p.is_file() and p.name != "SHA256SUMS"}
    write_text_atomic(d / "SHA256SUMS", "".join(f"{h}  {n}\n" for n, h in sums.items()))
    return sums


def model_card(kind: str, cfg: Config, base_id: str, parent: dict, manifest: dict, hf_dir_name: str) -> str:
    what = {"cpt": "continually pre-trained on Japanese Wikipedia",
            "lora": "continually pre-trained on Japanese Wikipedia, then LoRA-tuned (adapters merged)"}[kind]
    source = manifest["source"]
    data_line = ("llm-jp-corpus v3 `ja_wiki` (Japanese Wikipedia; CC BY-SA)" if source["kind"] == "llmjp"
                 else f"{source['kind']} corpus at {source['dir']}")
    metrics = {k: parent.get(k) for k in ("first_loss", "last_loss", "val_loss") if parent.get(k) is not None}
    return f"""---
license: cc-by-sa-4.0
language: [ja]
base_model: {base_id}
tags: [qwen2, japanese, continual-pretraining{', lora' if kind == 'lora' else ''}, nemo]
---
# {base_id} {what}

- Base model: `{base_id}` (tied input/output embeddings, as the original).
- Training data: {data_line}; {manifest['megatron']['train']['tokens']:,} training tokens available,
  tokenizer fingerprint `{manifest['tokenizer']['fingerprint'][:16]}` (Qwen2.5's own).
- Steps: {parent.get('steps')}; tokens seen: about {parent.get('tokens'):,}.
- Metrics: {json.dumps(metrics)}
- Profile: `{cfg.profile}`; made with NeMo 2.3 (Megatron-Core 0.12).
- License: the training data is CC BY-SA; this model is a derivative work, shared under CC BY-SA 4.0.
  The base model's own license (Apache-2.0 for Qwen2.5-0.5B) applies to its weights.

## Load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("{hf_dir_name}")
model = AutoModelForCausalLM.from_pretrained("{hf_dir_name}", torch_dtype="auto")
ids = tok("日本の首都は", return_tensors="pt")
print(tok.decode(model.generate(**ids, max_new_tokens=32)[0]))
```

Provenance in `model_info.json`: model type, base model, data manifest checksum, steps, tokens seen,
final losses, trainable parameters, LoRA settings, package versions and the training settings.
Files are listed with their sha256 in `SHA256SUMS` (`sha256sum -c SHA256SUMS`).
"""


def exported_info(kind: str, hf_dir: Path, parent: runs.Run, ckpt: Path, cfg: Config) -> dict:
    """model_info.json of an exported HF dir: its NeMo checkpoint's, as model type CPT (cpt) or merged
    (lora: adapters merged into the CPT weights), with the export's versions and time, and that
    checkpoint first in the lineage. Steps, losses, trainable parameters and `config` stay those of
    the training run that made the weights."""
    from jacpt.stages import inherited

    info = runs.read_model_info(ckpt)
    if info is None:  # a checkpoint of a run made before the kit wrote model_info.json: rebuilt from its run
        grand = runs.Run(Path(parent.info()["inputs"]["parent_run"]), "import" if kind == "cpt" else "cpt")
        info = runs.model_info("CPT" if kind == "cpt" else "LoRA", ckpt, parent.outputs(), parent.info(),
                               **inherited(grand, grand.dir / grand.outputs()["checkpoint"], cfg))
    return runs.derived_info(info, "CPT" if kind == "cpt" else "merged", hf_dir, format_on_disk="hf",
                             exported_from=str(ckpt))


def log_artifact(cfg: Config, run_dir: Path, hf_dir: Path, name: str, metadata: dict) -> str:
    """Log the hand-off directory as a wandb artifact (offline without a key); returns the mode used."""
    mode = cfg["wandb.mode"]
    if mode == "disabled":
        return "disabled"
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    import wandb

    (run_dir / "wandb").mkdir(exist_ok=True)
    run = wandb.init(project=cfg["wandb.project"], entity=cfg["wandb.entity"] or None, job_type="export",
                     name=f"export-{run_dir.name}", dir=str(run_dir / "wandb"), mode=mode,
                     tags=["export", cfg.profile], config=metadata)
    art = wandb.Artifact(name=name, type="model", metadata=metadata)
    art.add_dir(str(hf_dir))
    run.log_artifact(art)
    run.finish()
    return mode


def export_stage(cfg: Config, dry_run: bool) -> Path:
    imported = runs.latest_complete(cfg.profile, "import")
    parents = {"cpt": runs.latest_complete(cfg.profile, "cpt"), "lora": runs.latest_complete(cfg.profile, "lora")}
    ckpts = {k: r.dir / r.outputs()["checkpoint"] for k, r in parents.items()}
    base_hf = Path(imported.outputs()["hf_dir"])
    key = {"parents": {k: r.info()["key"] for k, r in parents.items()}, "format": 1,
           "wandb": cfg["wandb.mode"]}
    run, state = runs.open_run(cfg, "export", key, inputs={k: str(v) for k, v in ckpts.items()}, dry_run=dry_run)
    if state == "done":
        log(f"up to date: {run.dir}")
        return run.dir / runs.MARKER

    import nemo_run as rn
    from nemo.collections import llm

    merged = run.dir / "nemo" / "lora-merged"
    plan = [rn.Partial(llm.export_ckpt, path=str(ckpts["cpt"]), target="hf", output_path=str(run.dir / "hf/cpt"),
                       overwrite=True),
            rn.Partial(llm.peft.merge_lora, lora_checkpoint_path=str(ckpts["lora"]), output_path=str(merged)),
            rn.Partial(llm.export_ckpt, path=str(merged), target="hf", output_path=str(run.dir / "hf/lora"),
                       overwrite=True)]
    from jacpt.stages import serialize

    text = "\n---\n".join(serialize(p) for p in plan)
    write_text_atomic(run.dir / "recipe.yaml", text)
    if dry_run:
        print(text)
        print("# launch: in this process, in this order")
        return run.dir / "recipe.yaml"

    import fiddle as fdl

    from jacpt import nemo_compat, qwen  # noqa: F401  (qwen registers the tied connectors)

    nemo_compat.apply()
    if (run.dir / "hf").exists():
        shutil.rmtree(run.dir / "hf")  # a resumed export starts its conversions over; they are cheap
    for p in plan:
        log(f"{p.__fn_or_cls__.__name__}: {p.output_path}")
        fdl.build(p)()

    manifest = data_mod.load_manifest(Path(parents["cpt"].info()["inputs"]["data_manifest"]))
    want_tok = imported.outputs()["tokenizer_fingerprint"]
    out: dict = {"models": {}, "sha256": {}, "config_fixes": {}, "base_hf_dir": str(base_hf)}
    for kind in MODELS:
        d = run.dir / "hf" / kind
        out["config_fixes"][kind] = fix_config(d, base_hf)
        if assets.tokenizer_fingerprint(d) != want_tok:
            raise StageError(f"{d}: the exported tokenizer is not the model's Qwen2.5 tokenizer")
        write_text_atomic(d / "README.md", model_card(kind, cfg, cfg["model.hf_id"], parents[kind].outputs(),
                                                      manifest, str(d)))
        runs.write_model_info(d, exported_info(kind, d, parents[kind], ckpts[kind], cfg))  # listed in SHA256SUMS
        out["models"][kind] = f"hf/{kind}"
        out["sha256"][kind] = write_sums(d)
    meta = {"profile": cfg.profile, "base_model": cfg["model.hf_id"], **{
        k: parents["cpt"].outputs().get(k) for k in ("steps", "tokens", "last_loss", "val_loss")}}
    out["wandb"] = log_artifact(cfg, run.dir, run.dir / "hf" / "cpt", f"{cfg.profile}-cpt-hf", meta)
    run.mark_complete(out)
    write_json_atomic(run.dir / "export.json", out)
    log(f"exported: {run.dir / 'hf' / 'cpt'} (hand-off) and {run.dir / 'hf' / 'lora'}")
    return run.dir / runs.MARKER
