"""`make bench`: CPT, LoRA and generation throughput on one GPU, beside plain transformers and the limit.

    jacpt bench [--only cpt,hf,lora,gen] [--mbs 2,4,8,16] [--global-batch 32] [--variants kit] [--steps 20]

A benchmark, not a test. Every case runs in its own process (a fresh CUDA context and
Megatron state), logs to `<work>/<case>.log`, and writes one JSON line; an out-of-memory
case is recorded as OOM and the run goes on. The table and
`bench/results/<date>-<gpu>.json` come from those lines.

* CPT: the Qwen2.5-0.5B shape (Qwen25Config500M, embeddings tied as the kit trains it,
  random init) at seq 2048, bf16, through the kit's path: NeMo's pretrain recipe, the
  kit's compatibility layer and task function, Megatron's optimizer, one GPU. A step is
  one optimizer step over the global batch (32 samples by default, as the kit trains:
  micro-batches accumulate to it; `--global-batch 0`: one micro-batch a step). Data:
  random token ids in a Megatron .bin/.idx (the model cannot tell; the loader does the
  same work).
* Peer: the same shape in plain transformers (Qwen2ForCausalLM, SDPA, tied, fused AdamW,
  same micro-batch, global batch and sequence), pure bf16 weights (the faster of the two
  usual set-ups) and fp32 master weights under autocast (what NeMo's bf16-mixed keeps).
* LoRA: the kit's LoRA (NeMo's finetune path, `llm.peft.LoRA` with the kit's targets,
  dim 32) on an imported random checkpoint, same data and batch as CPT.
* Generation: the demo's NeMo generator on that checkpoint: load time, then 3 prompts x
  256 new tokens batched and one at a time, greedy (after short warm-up calls of both
  shapes); without TE its decode steps are replayed from CUDA graphs (`eager-decode`: not).

Timing: tokens per second = tokens per step / median step time over `steps` steps after
`warmup` steps; a step is the wall time between the ends of two optimizer steps with the
GPU synchronised, so data loading and logging count. Peak memory is
torch.cuda.max_memory_allocated. MFU = tokens/s x FLOPs per token / the GPU's dense bf16
peak, FLOPs per token = 6 N + 6 V h + 12 L h s (N = non-embedding parameters), the
accounting of the PaLM paper's appendix B with the tied output layer counted once.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from jacpt import log, paths, runs
from jacpt.fsutil import write_json_atomic, write_text_atomic

SCHEMA = 1
SEQ = 2048
SHAPE = {"layers": 24, "hidden": 896, "ffn": 4864, "heads": 14, "groups": 2, "head_dim": 64, "vocab": 151936}
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from NVIDIA's data sheets; matched in this order
# against torch.cuda.get_device_name(). --peak-tflops overrides.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
               ("B200", 2250.0), ("A100", 312.0), ("RTX 6000 Ada", 364.2), ("L40S", 362.1), ("L40", 181.0),
               ("RTX A6000", 154.8), ("L4", 121.0), ("RTX 4090", 165.2), ("A10", 125.0))
LEVERS = {
    # name: (environment of the case, model-config overrides, arguments of the task function).
    # "kit" is what `make cpt` runs: SDPA, fused AdamW, loss in chunks of cpt.loss_chunk_tokens, compiled RoPE,
    # the gradient norm in multi-tensor ops, SwiGLU in one kernel each way, gradient zeros not counted.
    # "megatron-rope[+norm]" bring back Megatron-Core's own RoPE (and norm); "unfused-swiglu" its SwiGLU op by
    # op; "megatron-zero-count" Megatron-Core 0.12's count of gradient zeros at every step.
    "local": ({"JACPT_NO_TE_ATTENTION": "local", "JACPT_NO_TE_ADAMW": "foreach"}, {"bias_activation_fusion": False},
              {"loss_chunk_tokens": 0}),
    "sdpa": ({"JACPT_NO_TE_ATTENTION": "sdpa", "JACPT_NO_TE_ADAMW": "foreach"}, {"bias_activation_fusion": False},
             {"loss_chunk_tokens": 0}),
    "sdpa+adamw+swiglu": ({"JACPT_NO_TE_ATTENTION": "sdpa", "JACPT_NO_TE_ADAMW": "fused"},
                          {"bias_activation_fusion": True}, {"loss_chunk_tokens": 0}),
    "whole-logits": ({}, {}, {"loss_chunk_tokens": 0}),
    "megatron-rope+norm": ({"JACPT_NO_TE_ROPE": "eager", "JACPT_NO_TE_MULTI_TENSOR": "megatron"}, {}, {}),
    "megatron-rope": ({"JACPT_NO_TE_ROPE": "eager"}, {}, {}),
    "unfused-lora": ({}, {}, {"fused_lora_update": False}),
    "unfused-swiglu": ({}, {}, {"fused_swiglu": False}),
    "eager-decode": ({"JACPT_NO_TE_DECODE": "eager"}, {}, {}),
    "megatron-zero-count": ({}, {}, {"megatron_zero_count": True}),
    "kit": ({}, {}, {}),
}
SWEEP_VARIANTS = ("kit", "whole-logits", "megatron-rope+norm", "megatron-rope")  # at every --mbs; the
# others at --lever-mbs only
LORA_ONLY = ("unfused-lora",)  # no CPT case: what they change is LoRA's
GEN_ONLY = ("eager-decode",)  # a generation case only

GEN_PROMPTS = ("日本の首都は", "富士山について説明してください。", "機械学習とは")


class BenchError(Exception):
    """The benchmark cannot run here; the message says why and what to do."""


# ----------------------------------------------------------------------------- arithmetic

def non_embedding_params(s: dict = SHAPE) -> int:
    """Qwen2.5-0.5B without its (tied) embedding: 357,898,112."""
    h, q = s["hidden"], s["groups"] * s["head_dim"]
    attn = h * (h + 2 * q) + (h + 2 * q) + h * h  # qkv with bias, output projection
    mlp = 3 * h * s["ffn"]  # gate, up, down
    return s["layers"] * (attn + mlp + 2 * h) + h  # two norms per layer, final norm


def flops_per_token(seq: int = SEQ, s: dict = SHAPE) -> float:
    """Training FLOPs per token: 6N + 6Vh (output layer) + 12 L h s (attention scores and values)."""
    return 6 * non_embedding_params(s) + 6 * s["vocab"] * s["hidden"] + 12 * s["layers"] * s["hidden"] * seq


FLOPS_FORMULA = "6*N + 6*V*h + 12*L*h*s, N=357,898,112 non-embedding params, V=151,936, h=896, L=24"


def gpu_key(name: str) -> str | None:
    """The PEAK_TFLOPS entry a GPU name matches ("NVIDIA H100 80GB HBM3" -> "H100"), or None."""
    return next((key for key, _ in PEAK_TFLOPS if key.lower() in name.lower()), None)


def peak_tflops(name: str) -> float | None:
    return dict(PEAK_TFLOPS).get(gpu_key(name))


def mfu(tokens_per_s: float | None, peak: float | None, seq: int = SEQ) -> float | None:
    if not tokens_per_s or not peak:
        return None
    return tokens_per_s * flops_per_token(seq) / (peak * 1e12)


def summarize(step_times: list[float], tokens_per_step: int, warmup: int) -> dict:
    """Median step time after the warm-up, and the tokens/s it gives."""
    timed = step_times[warmup:]
    if not timed:
        raise BenchError(f"no timed steps: {len(step_times)} steps ran, {warmup} of them warm-up")
    med = statistics.median(timed)
    return {"steps_timed": len(timed), "step_s": round(med, 5), "step_s_min": round(min(timed), 5),
            "step_s_max": round(max(timed), 5), "tokens_per_s": round(tokens_per_step / med, 1)}


# ----------------------------------------------------------------------------- worker side

def step_timer(out: str, tokens_per_step: int, warmup: int):
    """A Lightning callback recording step wall times, built here so this module imports no Lightning."""
    import lightning.pytorch as pl
    import torch

    class StepTimer(pl.Callback):
        def __init__(self):
            self.ends, self.losses = [], []

        def on_train_start(self, trainer, pl_module):
            torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            torch.cuda.synchronize()
            self.ends.append(time.perf_counter())
            try:
                self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
            except (TypeError, ValueError, KeyError):
                pass

        def on_train_end(self, trainer, pl_module):
            # Counted at the end: NeMo's PEFT transform freezes the base after on_train_start.
            n = sum(p.numel() for p in pl_module.parameters())
            t = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            times = [b - a for a, b in zip(self.ends, self.ends[1:])]
            rec = {**summarize(times, tokens_per_step, warmup), "params": n, "trainable": t,
                   "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                   "loss_first": self.losses[0] if self.losses else None,
                   "loss_last": self.losses[-1] if self.losses else None}
            Path(out).write_text(json.dumps(rec), encoding="utf-8")

    return StepTimer()


def _model_config(overrides: dict):
    """The kit's model config (train.config_of: architecture fields and the no-TE overrides) of
    Qwen2.5-0.5B, tied as the kit trains it, at the benchmark's sequence length; plus the case's levers."""
    from nemo.collections import llm

    from jacpt.train import config_of

    cfg = config_of(llm.Qwen25Config500M(seq_length=SEQ, share_embeddings_and_output_weights=True))
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _data(work: Path, mbs: int, global_batch: int):
    import nemo_run as run
    from nemo.collections import llm

    from jacpt.train import _tokenizer

    prefix = str(work / "tokens")
    return run.Config(llm.PreTrainingDataModule, paths={"train": [prefix], "validation": [prefix], "test": [prefix]},
                      seq_length=SEQ, micro_batch_size=mbs, global_batch_size=global_batch,
                      tokenizer=_tokenizer(paths.assets_dir() / "tokenizer"),
                      index_mapping_dir=str(work / "index_cache" / f"mbs{mbs}"), num_workers=2)


def _trim(recipe, case: dict, out: Path) -> None:
    """No validation, checkpoints, TensorBoard or wandb: only the steps are timed."""
    import nemo_run as run

    from jacpt import nemo_compat

    steps = case["warmup"] + case["steps"]
    recipe.trainer.max_steps = steps
    recipe.trainer.val_check_interval = steps + 1
    recipe.trainer.limit_val_batches = 0
    recipe.trainer.limit_test_batches = 0
    recipe.trainer.num_sanity_val_steps = 0
    recipe.trainer.log_every_n_steps = 1
    recipe.trainer.enable_checkpointing = False
    recipe.trainer.strategy.ckpt_async_save = False
    recipe.trainer.callbacks = list(recipe.trainer.callbacks or []) + [
        run.Config(step_timer, out=str(out), tokens_per_step=samples(case) * SEQ,
                   warmup=case["warmup"])]
    recipe.log.ckpt = None
    recipe.log.tensorboard = None
    recipe.log.wandb = None
    recipe.log.log_dir = str(Path(case["work"]) / "logs" / case["name"])
    for k, v in nemo_compat.no_te_optimizer_overrides().items():
        setattr(recipe.optim.config, k, v)


def _task_arg(case: dict, name: str, key: str):
    """A task-function argument of the case: the lever's value, else the kit's default for setting `key`."""
    from jacpt import config as kit_config

    return case.get("task", {}).get(name, kit_config.KEYS[key].default)


def _task_args(recipe, case: dict, stage: str) -> None:
    """The arguments of the kit's task function (jacpt.tasks) both stages take: the kit's defaults, or the lever's."""
    recipe.loss_chunk_tokens = _task_arg(case, "loss_chunk_tokens", f"{stage}.loss_chunk_tokens")
    recipe.fused_swiglu = _task_arg(case, "fused_swiglu", f"{stage}.fused_swiglu")
    recipe.megatron_zero_count = case.get("task", {}).get("megatron_zero_count", False)


def run_cpt(case: dict) -> dict:
    import fiddle as fdl
    import nemo_run as run
    from nemo.collections import llm

    from jacpt import tasks

    work, out = Path(case["work"]), Path(case["work"]) / f"{case['name']}.timer.json"
    recipe = llm.qwen25_500m.pretrain_recipe(dir=str(work / "logs" / case["name"]), name=case["name"],
                                             num_nodes=1, num_gpus_per_node=1, max_steps=10, seq_length=SEQ,
                                             global_batch_size=samples(case),
                                             micro_batch_size=case["mbs"],
                                             warmup_steps=5, fn=tasks.pretrain)
    recipe.model = run.Config(llm.Qwen2Model, config=_model_config(case.get("model", {})))
    recipe.data = _data(work, case["mbs"], samples(case))
    recipe.resume = None
    _task_args(recipe, case, "cpt")
    _trim(recipe, case, out)
    fdl.build(recipe)()
    return json.loads(out.read_text(encoding="utf-8"))


def run_lora(case: dict) -> dict:
    import fiddle as fdl
    import nemo_run as run
    from nemo import lightning as nl
    from nemo.collections import llm

    from jacpt import config as kit_config
    from jacpt import tasks
    from jacpt.train import model_config

    work, out = Path(case["work"]), Path(case["work"]) / f"{case['name']}.timer.json"
    ckpt = work / "ckpt"
    defaults = kit_config.load("h100-80g", env={})  # a real profile's LoRA (targets, dim, alpha)
    recipe = llm.qwen25_500m.finetune_recipe(dir=str(work / "logs" / case["name"]), name=case["name"],
                                             num_nodes=1, num_gpus_per_node=1, peft_scheme="lora")
    fdl.update_callable(recipe, tasks.finetune)
    cfg = model_config(ckpt)
    cfg.seq_length = SEQ
    recipe.model = run.Config(llm.Qwen2Model, config=cfg)
    recipe.peft = run.Config(llm.peft.LoRA, target_modules=defaults["lora.targets"].split(","),
                             dim=defaults["lora.dim"], alpha=defaults["lora.alpha"], dropout=0.0)
    recipe.data = _data(work, case["mbs"], samples(case))
    recipe.trainer.strategy.ddp = "megatron"
    recipe.resume = run.Config(nl.AutoResume, restore_config=run.Config(nl.RestoreConfig, path=str(ckpt)))
    _task_args(recipe, case, "lora")
    recipe.fused_lora_update = _task_arg(case, "fused_lora_update", "lora.fused_update")
    _trim(recipe, case, out)
    fdl.build(recipe)()
    return json.loads(out.read_text(encoding="utf-8"))


def hf_config(**kw):
    """transformers' Qwen2Config of the Qwen2.5-0.5B shape (tied; eos = Qwen's <|endoftext|>)."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["ffn"],
                       num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
                       num_key_value_heads=SHAPE["groups"], max_position_embeddings=32768, rms_norm_eps=1e-6,
                       rope_theta=1e6, tie_word_embeddings=True, use_sliding_window=False, bos_token_id=151643,
                       eos_token_id=151643, **kw)


def run_hf(case: dict) -> dict:
    """Plain transformers, same shape, batches and sequence; one process, every micro-batch in turn. Each
    optimizer step accumulates the case's global batch in micro-batches, as the NeMo cases do."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = hf_config()
    results = {}
    for mode in case["modes"]:
        for mbs in case["mbs_list"]:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
            if mode == "bf16":
                model = model.to(torch.bfloat16)
            model = model.cuda().train()
            opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                    fused=True)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            gen = torch.Generator(device="cuda").manual_seed(0)
            accum = accumulation(mbs, case.get("global_batch", 0))
            times, key = [], f"{mode}-{_batch_tag(mbs, case.get('global_batch', 0))}"
            try:
                for _ in range(case["warmup"] + case["steps"]):
                    xs = [torch.randint(0, 151643, (mbs, SEQ), device="cuda", generator=gen) for _ in range(accum)]
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for x in xs:
                        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "amp"):
                            loss = model(input_ids=x, labels=x).loss
                        (loss / accum).backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                results[key] = {**summarize(times, mbs * accum * SEQ, case["warmup"]), "mode": mode, "mbs": mbs,
                                "accum": accum,
                                "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                                "params": sum(p.numel() for p in model.parameters())}
            except torch.OutOfMemoryError:
                results[key] = {"mode": mode, "mbs": mbs, "accum": accum, "error": "OOM"}
            del model, opt
            torch.cuda.empty_cache()
            log(f"hf {key}: {results[key]}")
    return {"results": results}


def run_prep(case: dict) -> dict:
    """Random Qwen2.5-0.5B-shaped HF model (the kit's tokenizer), imported the kit's way, and token data."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from transformers import AutoModelForCausalLM, GenerationConfig

    work = Path(case["work"])
    rng = np.random.default_rng(1234)
    b = IndexedDatasetBuilder(str(work / "tokens.bin"), dtype=np.int32)
    for _ in range(case["documents"]):
        doc = rng.integers(0, 151643, size=4095, dtype=np.int32)
        b.add_document(torch.from_numpy(np.append(doc, 151643).astype(np.int32)), [4096])
    b.finalize(str(work / "tokens.idx"))
    out = {"tokens": case["documents"] * 4096}
    if not case.get("checkpoint"):
        return out

    hf = work / "hf"
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(hf_config(torch_dtype="bfloat16")).to(torch.bfloat16)
    model.save_pretrained(str(hf), safe_serialization=True)
    GenerationConfig(bos_token_id=151643, eos_token_id=151643, pad_token_id=151643).save_pretrained(str(hf))
    tok = paths.assets_dir() / "tokenizer"
    for f in tok.iterdir():
        if f.is_file():
            (hf / f.name).write_bytes(f.read_bytes())

    import nemo_run as rn
    from nemo.collections import llm

    from jacpt import nemo_compat, qwen
    from jacpt.train import config_of

    import fiddle as fdl

    nemo_compat.apply()
    t0 = time.perf_counter()
    config = qwen.HFQwen2TiedImporter(str(hf)).config
    task = rn.Partial(llm.import_ckpt, model=rn.Config(llm.Qwen2Model, config=config_of(config)),
                      source=f"hf://{hf}", output_path=str(work / "ckpt"), overwrite=True)
    fdl.build(task)()
    out.update(import_s=round(time.perf_counter() - t0, 1), params=qwen.LAST_IMPORT.get("params"))
    return out


def run_gen(case: dict) -> dict:
    from jacpt.generate import NemoGenerator

    s = {"max_new_tokens": 256, "greedy": True, "seed": 1234, "temperature": 1.0, "top_p": 0.0}
    gen = NemoGenerator(Path(case["work"]) / "ckpt", s, device="cuda")
    load_s = gen.load_s
    # Warm-up: CUDA kernels, the KV-cache allocation and the compiled kernels of both shapes timed below
    # (batched, and each prompt alone).
    gen.s = {**s, "max_new_tokens": 16}
    gen.generate(list(GEN_PROMPTS))
    gen.s = {**s, "max_new_tokens": 4}
    for p in GEN_PROMPTS:
        gen.generate([p])
    gen.s = s
    t0 = time.perf_counter()
    batched = gen.generate(list(GEN_PROMPTS))
    batched_s = time.perf_counter() - t0
    one = []
    t0 = time.perf_counter()
    for p in GEN_PROMPTS:
        one += gen.generate([p])
    one_s = time.perf_counter() - t0
    toks_b, toks_1 = sum(a.new_tokens for a in batched), sum(a.new_tokens for a in one)
    gen.close()
    out = {"decode": "cuda-graph" if gen.decode_graphs else "eager",
           "load_s": round(load_s, 2), "batched_s": round(batched_s, 3), "batched_tokens": toks_b,
           "batched_tokens_per_s": round(toks_b / batched_s, 1), "batch1_s": round(one_s, 3),
           "batch1_tokens": toks_1, "batch1_tokens_per_s": round(toks_1 / one_s, 1),
           "prompts": len(GEN_PROMPTS), "max_new_tokens": 256}
    if case.get("variant", "kit") == "kit":
        out["transformers"] = _hf_generate(Path(case["work"]) / "hf")
    return out


def _hf_generate(hf_dir: Path) -> dict:
    """The same prompts through transformers' generate on the HF model the checkpoint was imported from."""
    import torch

    from jacpt.generate import HFGenerator

    torch.cuda.empty_cache()
    s = {"max_new_tokens": 256, "greedy": True, "seed": 1234, "temperature": 1.0, "top_p": 0.0}
    gen = HFGenerator(hf_dir, {**s, "max_new_tokens": 16}, device="cuda")
    gen.generate([GEN_PROMPTS[0]])  # warm-up
    gen.s = s
    t0 = time.perf_counter()
    answers = gen.generate(list(GEN_PROMPTS))  # one prompt at a time, as the kit's HF demo path does
    dt = time.perf_counter() - t0
    n = sum(a.new_tokens for a in answers)
    return {"load_s": round(gen.load_s, 2), "batch1_s": round(dt, 3), "batch1_tokens": n,
            "batch1_tokens_per_s": round(n / dt, 1)}


RUNNERS = {"cpt": run_cpt, "lora": run_lora, "hf": run_hf, "prep": run_prep, "gen": run_gen}


def worker_main(case_json: str) -> int:
    case = json.loads(case_json)
    env_overrides = case.get("env", {})
    os.environ.update(env_overrides)
    from jacpt import nemo_compat

    if case["kind"] in ("cpt", "lora", "gen"):  # prep applies it itself, only when it imports a checkpoint
        nemo_compat.apply()
    t0 = time.perf_counter()
    try:
        rec = {"ok": True, **RUNNERS[case["kind"]](case)}
    except Exception as e:  # recorded, and the next case runs
        import traceback

        traceback.print_exc()
        text = f"{type(e).__name__}: {e}"
        rec = {"ok": False, "error": "OOM" if "out of memory" in text.lower() else text[:400]}
    rec.update(case=case["name"], kind=case["kind"], wall_s=round(time.perf_counter() - t0, 1),
               compat=list(nemo_compat.APPLIED))
    with open(case["result"], "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)
    return 0 if rec["ok"] else 1


# ----------------------------------------------------------------------------- orchestration

def gpu_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        raise BenchError("make bench measures GPU training and generation and needs a CUDA GPU; none is visible "
                         "(nvidia-smi; in the container: make docker-run). The CPU benchmark is make bench-data")
    p = torch.cuda.get_device_properties(0)
    return {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}",
            "count": torch.cuda.device_count(), "cuda": torch.version.cuda}


def accumulation(mbs: int, global_batch: int) -> int:
    """Micro-batches per optimizer step: enough to reach `global_batch` samples (0: one)."""
    return max(1, -(-global_batch // mbs))


def samples(r: dict) -> int:
    """Samples per optimizer step of a case or result record (records from before accumulation: one micro-batch)."""
    return r["mbs"] * r.get("accum", 1)


def _batch_tag(mbs: int, global_batch: int) -> str:
    """A case name's batch part: mbs16, or mbs16x2 when two micro-batches make an optimizer step."""
    n = accumulation(mbs, global_batch)
    return f"mbs{mbs}" if n == 1 else f"mbs{mbs}x{n}"


def cases(only: list[str], mbs: list[int], variants: list[str], steps: int, warmup: int, work: Path,
          lora_mbs: int, hf_modes: list[str], global_batch: int = 0) -> list[dict]:
    base = {"steps": steps, "warmup": warmup, "work": str(work), "result": str(work / "results.jsonl")}
    need_ckpt = "lora" in only or "gen" in only
    most = max(m * accumulation(m, global_batch) for m in mbs + [lora_mbs])  # samples a step, the largest case
    docs = max(64, (warmup + steps + 4) * most // 2 + 8)
    out = [{**base, "name": "prep", "kind": "prep", "documents": docs, "checkpoint": need_ckpt}]
    if "hf" in only:
        out.append({**base, "name": "hf" if not global_batch else f"hf-global{global_batch}", "kind": "hf",
                    "mbs_list": mbs, "modes": hf_modes, "global_batch": global_batch})
    if "cpt" in only:
        for v in [v for v in variants if v not in LORA_ONLY + GEN_ONLY]:
            env, model, task = LEVERS[v]
            for m in (mbs if v in SWEEP_VARIANTS else [lora_mbs]):
                out.append({**base, "name": f"cpt-{v}-{_batch_tag(m, global_batch)}", "kind": "cpt", "variant": v,
                            "mbs": m, "env": env, "model": model, "task": task, "accum": accumulation(m, global_batch)})
    if "lora" in only:  # the kit, and each variant that changes no model field (LoRA loads its checkpoint's)
        for v in ["kit"] + [v for v in variants if v != "kit" and not LEVERS[v][1] and v not in GEN_ONLY]:
            tag = _batch_tag(lora_mbs, global_batch)
            name = f"lora-{tag}" if v == "kit" else f"lora-{v}-{tag}"
            out.append({**base, "name": name, "kind": "lora", "variant": v, "mbs": lora_mbs, "env": LEVERS[v][0],
                        "task": LEVERS[v][2], "accum": accumulation(lora_mbs, global_batch)})
    if "gen" in only:
        out.append({**base, "name": "gen", "kind": "gen"})
        out += [{**base, "name": f"gen-{v}", "kind": "gen", "variant": v, "env": LEVERS[v][0]}
                for v in variants if v in GEN_ONLY]
    return out


def merge_cases(earlier: list[dict], now: list[dict]) -> list[dict]:
    """An earlier run's case records that this run did not measure again, then this run's. The transformers
    baseline is one record over several micro-batches: its earlier micro-batches stay beside this run's."""
    old = {r["case"]: r for r in earlier}
    merged = []
    for r in now:
        prev = old.get(r["case"])
        if prev and r["kind"] == "hf" and r.get("ok") and prev.get("ok"):
            r = {**r, "results": {**prev.get("results", {}), **r.get("results", {})}}
        merged.append(r)
    done = {r["case"] for r in now}
    return [r for r in earlier if r["case"] not in done] + merged


def run_case(case: dict, timeout: int) -> dict:
    log_path = Path(case["work"]) / f"{case['name']}.log"
    t0 = time.perf_counter()
    log(f"bench {case['name']}: running (log: {log_path})")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
           "TORCHINDUCTOR_CACHE_DIR": str(Path(case["work"]) / "inductor-cache")}
    with open(log_path, "w", encoding="utf-8") as lf:
        try:
            proc = subprocess.run([sys.executable, "-m", "jacpt.bench", json.dumps(case)], stdout=lf,
                                  stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=str(paths.KIT_ROOT))
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    recs = [json.loads(line) for line in Path(case["result"]).read_text(encoding="utf-8").splitlines()
            if line.strip()] if Path(case["result"]).is_file() else []
    rec = next((r for r in reversed(recs) if r.get("case") == case["name"]), None)
    if rec is None:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-5:]
        oom = any("out of memory" in line.lower() for line in tail)
        rec = {"case": case["name"], "kind": case["kind"], "ok": False,
               "error": "OOM" if oom else f"exit {rc}: {' | '.join(tail)[-300:]}"}
    rec.update({k: case[k] for k in ("variant", "mbs", "accum") if k in case})
    log(f"bench {case['name']}: {'ok' if rec.get('ok') else rec.get('error')} in {time.perf_counter() - t0:.0f} s")
    return rec


def collect(recs: list[dict], gpu: dict, peak: float | None, te_present: bool) -> dict:
    """The summary fields of the results JSON (the issue's names) from the case records."""
    by = {r["case"]: r for r in recs}
    cpt = {(r["mbs"], samples(r)): r for r in recs
           if r["kind"] == "cpt" and r.get("variant") == "kit" and r.get("ok")}
    best = max(cpt.values(), key=lambda r: r["tokens_per_s"], default=None)
    hf = {k: v for r in recs if r["kind"] == "hf" and r.get("ok") for k, v in r.get("results", {}).items()}
    hf_ok = {k: v for k, v in hf.items() if "tokens_per_s" in v}
    hf_same = {v["mbs"]: v for v in hf_ok.values() if v["mode"] == "bf16"}
    loras = [r for r in recs if r["kind"] == "lora" and r.get("variant", "kit") == "kit" and r.get("ok")]
    # The LoRA case at the summary CPT case's batch, if one was measured; else the first.
    lora = next((r for r in loras if best and (r["mbs"], samples(r)) == (best["mbs"], samples(best))),
                loras[0] if loras else None)
    lora_cpt = cpt.get((lora["mbs"], samples(lora))) if lora else None
    gen = by.get("gen") if by.get("gen", {}).get("ok") else None
    hf_best = max(hf_same.values(), key=lambda r: r["tokens_per_s"], default=None)
    return {
        "gpu": gpu["name"], "te_present": te_present,
        "peak_tflops": peak, "flops_per_token": flops_per_token(), "flops_formula": FLOPS_FORMULA,
        "cpt_mbs": best["mbs"] if best else None,
        "cpt_global_batch": samples(best) if best else None,
        "cpt_tokens_per_s": best["tokens_per_s"] if best else None,
        "cpt_mfu": round(mfu(best["tokens_per_s"], peak), 4) if best and peak else None,
        "cpt_peak_mem_gib": best["peak_mem_gib"] if best else None,
        "hf_mbs": hf_best["mbs"] if hf_best else None,
        "hf_global_batch": samples(hf_best) if hf_best else None,
        "hf_tokens_per_s": hf_best["tokens_per_s"] if hf_best else None,
        "cpt_vs_hf": round(best["tokens_per_s"] / hf_best["tokens_per_s"], 3) if best and hf_best else None,
        "lora_mbs": lora["mbs"] if lora else None,
        "lora_global_batch": samples(lora) if lora else None,
        "lora_tokens_per_s": lora["tokens_per_s"] if lora else None,
        "lora_peak_mem_gib": lora["peak_mem_gib"] if lora else None,
        "lora_vs_cpt_speed": round(lora["tokens_per_s"] / lora_cpt["tokens_per_s"], 3) if lora and lora_cpt else None,
        "lora_vs_cpt_memory": round(lora["peak_mem_gib"] / lora_cpt["peak_mem_gib"], 3) if lora and lora_cpt else None,
        "gen_load_s": gen["load_s"] if gen else None,
        "gen_3x256_s": gen["batched_s"] if gen else None,
        "gen_3x256_batch1_s": gen["batch1_s"] if gen else None,
    }


def _fmt(v, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def _global(r: dict) -> str:
    return str(samples(r)) if "mbs" in r else "-"


def render(doc: dict) -> str:
    s, peak = doc["summary"], doc["summary"]["peak_tflops"]
    lines = [f"GPU {doc['gpu']['name']} ({doc['gpu']['memory_gib']} GiB), peak {peak} TFLOP/s bf16 dense; "
             f"Transformer Engine: {'yes' if s['te_present'] else 'no'}; seq {SEQ}, bf16",
             f"MFU = tokens/s x {s['flops_per_token']:.4g} FLOPs/token / peak  ({FLOPS_FORMULA})", ""]
    rows = [("case", "mbs", "global", "tokens/s", "step s", "MFU", "peak GiB", "note")]
    for r in doc["cases"]:
        if r["kind"] in ("cpt", "lora"):
            name = (f"NeMo CPT [{r['variant']}]" if r["kind"] == "cpt"
                    else f"NeMo LoRA (dim 32){'' if r.get('variant', 'kit') == 'kit' else ' [' + r['variant'] + ']'}")
            if r.get("ok"):
                note = f"trainable {r['trainable']:,} of {r['params']:,}" if r.get("trainable") else ""
                rows.append((name, str(r["mbs"]), _global(r), _fmt(r["tokens_per_s"]), f"{r['step_s']:.3f}",
                             _fmt(mfu(r["tokens_per_s"], peak), ".1%"), f"{r['peak_mem_gib']:.1f}", note))
            else:
                rows.append((name, str(r.get("mbs", "-")), _global(r), "-", "-", "-", "-", r.get("error", "?")[:60]))
        elif r["kind"] == "hf" and r.get("ok"):
            for v in r["results"].values():
                name = f"transformers [{v['mode']}]"
                if "tokens_per_s" in v:
                    rows.append((name, str(v["mbs"]), _global(v), _fmt(v["tokens_per_s"]), f"{v['step_s']:.3f}",
                                 _fmt(mfu(v["tokens_per_s"], peak), ".1%"), f"{v['peak_mem_gib']:.1f}", ""))
                else:
                    rows.append((name, str(v["mbs"]), _global(v), "-", "-", "-", "-", v.get("error", "?")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j in (0, 7) else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    for gen in (r for r in doc["cases"] if r["kind"] == "gen"):
        what = "" if gen.get("variant", "kit") == "kit" else f" [{gen['variant']}]"
        if not gen.get("ok"):
            lines.append(f"generation{what}: {gen.get('error')}")
            continue
        decode = f", decode {gen['decode']}" if gen.get("decode") else ""
        lines.append(f"generation{what} (NeMo, bf16, greedy{decode}): load {gen['load_s']:.1f} s; 3 prompts x 256 "
                     f"tokens batched {gen['batched_s']:.2f} s ({gen['batched_tokens_per_s']:,.0f} tokens/s), one at "
                     f"a time {gen['batch1_s']:.2f} s ({gen['batch1_tokens_per_s']:,.0f} tokens/s)")
        hf = gen.get("transformers")
        if hf:
            lines.append(f"  transformers generate, same model: load {hf['load_s']:.1f} s; one at a time "
                         f"{hf['batch1_s']:.2f} s ({hf['batch1_tokens_per_s']:,.0f} tokens/s)")
    if doc.get("data"):
        d = doc["data"]
        lines.append(f"data (make bench-data, {d['date']}, CPU): fast backend {d['fast_mb_s']:.1f} MB/s, "
                     f"NeMo reference {d['reference_mb_s']:.2f} MB/s")
    lines.append("")
    lines.append(f"CPT best {_fmt(s['cpt_tokens_per_s'])} tokens/s at mbs {s['cpt_mbs']} "
                 f"(MFU {_fmt(mfu(s['cpt_tokens_per_s'], peak), '.1%')}), "
                 f"{_fmt(s['cpt_vs_hf'], '.2f')}x transformers' best; "
                 f"LoRA {_fmt(s['lora_vs_cpt_speed'], '.2f')}x CPT speed at {_fmt(s['lora_vs_cpt_memory'], '.0%')} "
                 "of its memory")
    return "\n".join(lines)


def latest_data_bench(results_dir: Path) -> dict | None:
    files = sorted(results_dir.glob("data-*.json"))
    if not files:
        return None
    d = json.loads(files[-1].read_text(encoding="utf-8"))
    rows = {r.get("name"): r for r in d.get("rows", []) if isinstance(r, dict)}
    fast = next((r for n, r in rows.items() if n and n.startswith("fast") and r.get("workers") == 2
                 and r.get("engine") == "tiktoken"), None)
    ref = next((r for n, r in rows.items() if n and "reference" in n), None)
    if not fast or not ref:
        return None
    return {"file": str(files[-1].relative_to(paths.KIT_ROOT)) if files[-1].is_relative_to(paths.KIT_ROOT)
            else str(files[-1]), "date": d.get("date"), "fast_mb_s": fast.get("mb_per_s"),
            "reference_mb_s": ref.get("mb_per_s")}


def plan_text(plan: list[dict], peak: float | None) -> str:
    """The cases a run would measure, one line each (`--dry-run`)."""
    against = f"{peak:g} TFLOP/s" if peak else "the GPU's dense bf16 peak, looked up from its name"
    lines = [f"{len(plan) - 1} case(s), each in its own process, after a preparation step; seq {SEQ}, bf16; "
             f"micro-batch x micro-batches a step; MFU against {against}"]
    for c in plan:
        hf_batches = ", ".join(f"{m} x {accumulation(m, c.get('global_batch', 0))}" for m in c.get("mbs_list", []))
        what = {"prep": f"random token data ({c.get('documents', 0) * 4096:,} tokens)"
                        + ("; random Qwen2.5-0.5B-shaped HF model imported to NeMo" if c.get("checkpoint") else ""),
                "hf": f"transformers {', '.join(c.get('modes', []))} at micro-batch {hf_batches}",
                "cpt": f"NeMo CPT [{c.get('variant')}] micro-batch {c.get('mbs')} x {c.get('accum', 1)}",
                "lora": f"NeMo LoRA [{c.get('variant', 'kit')}] micro-batch {c.get('mbs')} x {c.get('accum', 1)}",
                "gen": ("generation: NeMo (batched and one at a time) and transformers, 3 prompts x 256 tokens"
                        if c.get("variant", "kit") == "kit" else f"generation [{c.get('variant')}]: NeMo (batched "
                        "and one at a time), 3 prompts x 256 tokens")}[c["kind"]]
        extra = " ".join(f"{k}={v}" for k, v in {**c.get("env", {}), **c.get("model", {}), **c.get("task", {})}.items())
        steps = f"; {c['warmup']} + {c['steps']} steps" if c["kind"] in ("cpt", "lora", "hf") else ""
        lines.append(f"  {c['name']:<28} {what}{steps}{'; ' + extra if extra else ''}")
    return "\n".join(lines)


def main(only: list[str], mbs: list[int], variants: list[str], steps: int, warmup: int, out_dir: Path,
         peak: float | None, lora_mbs: int, hf_modes: list[str], timeout: int, command: str,
         merge: bool = False, work: Path | None = None, dry_run: bool = False, global_batch: int = 0) -> Path | None:
    if dry_run:  # no GPU needed, nothing written
        print(plan_text(cases(only, mbs, variants, steps, warmup, Path("<work>"), lora_mbs, hf_modes, global_batch),
                        peak))
        return None
    gpu = gpu_info()
    peak = peak or peak_tflops(gpu["name"])
    if peak is None:
        log(f"no peak FLOP/s known for {gpu['name']}: MFU left out (pass --peak-tflops)")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    work = work or Path(os.environ.get("JACPT_RUNS_DIR", paths.KIT_ROOT / "runs")) / "bench" / stamp
    work.mkdir(parents=True, exist_ok=True)
    plan = cases(only, mbs, variants, steps, warmup, work, lora_mbs, hf_modes, global_batch)
    t0 = time.perf_counter()
    recs = []
    for case in plan:
        rec = run_case(case, timeout)
        if case["kind"] == "prep" and not rec.get("ok"):
            raise BenchError(f"preparing the benchmark failed ({rec.get('error')}); see {work}/prep.log")
        if case["kind"] != "prep":
            recs.append(rec)
    slug = "".join(c if c.isalnum() else "-" for c in gpu["name"].lower()).strip("-")
    path = out_dir / f"{datetime.now(timezone.utc).strftime('%Y-%m-%d')}-{slug}.json"
    if merge and path.is_file():
        # Cases measured today on this GPU by an earlier `--merge` run stay, unless measured again now.
        old = json.loads(path.read_text(encoding="utf-8"))
        recs = merge_cases(old.get("cases", []), recs)
        command = f"{old.get('command')} + {command}"
    doc = {"schema": SCHEMA, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
           "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "command": command,
           "gpu": gpu, "versions": runs.versions(), "settings": {"seq": SEQ, "steps": steps, "warmup": warmup,
                                                            "mbs": mbs, "variants": variants, "lora_mbs": lora_mbs,
                                                            "global_batch": global_batch},
           "cases": recs, "data": latest_data_bench(out_dir), "wall_s": round(time.perf_counter() - t0, 1)}
    doc["summary"] = collect(recs, gpu, peak, te_present="transformer-engine" in doc["versions"])
    text = render(doc)
    print(text, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, doc)
    write_text_atomic(work / "table.txt", text + "\n")
    log(f"figures in {path}; logs in {work}")
    return path


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
