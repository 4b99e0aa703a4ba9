"""The demo: base, CPT and LoRA answering the same Japanese prompts, side by side.

    jacpt demo [--interactive] [--dry-run]   ->  runs/<profile>/demo-<stamp>/{demo.json, demo.md}

Each model is loaded once and answers every prompt (`demo.prompts`, default
configs/demo-prompts.txt) as a raw continuation: no chat template, no BOS.

* With CUDA: NeMo generates from the NeMo checkpoints (base = the import, CPT, LoRA;
  a LoRA checkpoint loads its base by the absolute path it recorded). Each model runs in
  its own worker process (`python -m jacpt.generate worker nemo ...`): in NeMo 2.3.3
  `llm.generate` -> `inference.setup_model_and_tokenizer` connects the trainer's strategy
  to one model and calls `setup_environment`, and `MegatronStrategy.setup_distributed`
  returns early once torch.distributed is up (megatron_strategy.py:550), so a second model
  in the same process would run on the first one's parallel state, AppState and trainer,
  and GPU memory would hold every model loaded so far. So each model gets a fresh process.
  The three workers start together and answer concurrently (a 0.5B model in bf16 takes ~1 GB):
  their imports, loads and generation overlap, so the demo lasts about as long as its slowest
  model instead of the sum of the three. The worker runs the two halves of
  `llm.generate` (api.py:1076-1104: `setup_model_and_tokenizer`, then
  `inference.generate` with all prompts in one batch) so that the load is timed apart
  from generation and, in `--interactive`, the loaded model answers later prompts too.
  Without TE each decode step is replayed from a CUDA graph (nemo_compat.DecodeGraphs).
* Without CUDA: transformers on the HF models: base = the import's HF directory, CPT and
  LoRA = the export run's `models` directories (`make export` first).

Settings: demo.max_new_tokens, demo.temperature (0: greedy), demo.top_p, demo.seed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from jacpt import log
from jacpt import paths, runs
from jacpt.config import Config
from jacpt.fsutil import sha256_file, write_json_atomic, write_text_atomic
from jacpt.train import StageError

DEFAULT_PROMPTS = paths.CONFIG_DIR / "demo-prompts.txt"
NO_CUDA_NOTE = "no CUDA: generating with transformers from the exported HF models"
MODELS = (("base", "base"), ("cpt", "CPT"), ("lora", "LoRA"))  # (key, label), in table order
FORMAT = 1



def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------- inputs

@dataclass
class ModelRef:
    """One model of the demo or eval: where it is and which run made it."""

    key: str    # base | cpt | lora
    label: str  # base | CPT | LoRA
    path: Path  # an HF directory (transformers) or a NeMo checkpoint directory (NeMo)
    run: Path   # the run directory it came from

    def as_dict(self) -> dict:
        return {"key": self.key, "label": self.label, "path": str(self.path), "run": str(self.run)}


def load_prompts(cfg: Config) -> tuple[Path, list[str]]:
    """The prompts file and its prompts: one a line; empty lines and lines starting with '#' skipped."""
    path = paths.resolve(cfg["demo.prompts"]) if cfg["demo.prompts"] else DEFAULT_PROMPTS
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise StageError(f"cannot read the demo prompts {path} ({e.strerror}): set demo.prompts (DEMO_PROMPTS) to "
                         "a UTF-8 file with one prompt a line") from None
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise StageError(f"{path} holds no prompts: write one prompt a line (lines starting with # are comments)")
    return path, prompts


def settings(cfg: Config) -> dict:
    s = {k: cfg[f"demo.{k}"] for k in ("max_new_tokens", "temperature", "top_p", "seed")}
    if s["temperature"] < 0:
        raise StageError(f"demo.temperature = {s['temperature']}: use 0 for greedy decoding or a positive value")
    s["greedy"] = s["temperature"] == 0
    return s


def _hf_dir_ok(d: Path, what: str, fix: str) -> Path:
    if not (d / "config.json").is_file():
        raise StageError(f"{what} {d} is not an HF model directory (no config.json): {fix}")
    return d


def hf_models(profile: str) -> list[ModelRef]:
    """base = the import's HF dir, CPT and LoRA = the newest complete export's `models` dirs."""
    imp = runs.latest_complete(profile, "import")
    refs = [ModelRef("base", "base", _hf_dir_ok(Path(imp.outputs()["hf_dir"]), "the base model (import hf_dir)",
                                                f"restore it or run `make import PROFILE={profile}` again"), imp.dir)]
    try:
        exp = runs.latest_complete(profile, "export")
    except runs.RunError:
        raise StageError(f"no complete export run for profile {profile} under {runs.runs_root() / profile}: without "
                         "CUDA the demo and eval use transformers on the exported HF models; run "
                         f"`make export PROFILE={profile}` first") from None
    models = exp.outputs().get("models") or {}
    for key, label in MODELS[1:]:
        if key not in models:
            raise StageError(f"{exp.dir / runs.MARKER} lists no {key!r} model under \"models\": run "
                             f"`make export PROFILE={profile}` again")
        d = _hf_dir_ok(exp.dir / models[key], f"the exported {label} model",
                       f"run `make export PROFILE={profile}` again")
        refs.append(ModelRef(key, label, d, exp.dir))
    return refs


def nemo_models(profile: str) -> list[ModelRef]:
    """base = the imported checkpoint, CPT and LoRA = the newest complete runs' last checkpoints."""
    refs = []
    for (key, label), stage in zip(MODELS, ("import", "cpt", "lora")):
        run = runs.latest_complete(profile, stage)
        ckpt = run.dir / run.outputs()["checkpoint"]
        if not (ckpt / "context").is_dir() or not (ckpt / "weights").is_dir():
            raise StageError(f"{ckpt} (from {run.dir / runs.MARKER}) is not a NeMo checkpoint (context/, weights/): "
                             f"run `make {stage} PROFILE={profile}` again")
        refs.append(ModelRef(key, label, ckpt, run.dir))
    return refs


# ----------------------------------------------------------------------------- generators

@dataclass
class Answer:
    text: str
    new_tokens: int
    latency_s: float

    def as_dict(self) -> dict:
        return {"text": self.text, "new_tokens": self.new_tokens, "latency_s": round(self.latency_s, 4),
                "tokens_per_s": round(self.new_tokens / self.latency_s, 2) if self.latency_s > 0 else None}


def load_hf(path: Path, device: str):
    """(model, tokenizer) from an HF directory: bf16 on CUDA, fp32 on CPU, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=dtype).to(device).eval()
    return model, tok


def generation_kwargs(model, tok, max_new_tokens: int) -> dict:
    """GenerationConfig arguments every transformers generation of the kit shares: stop and pad at eos, and
    never emit the embedding's padded rows (151,936 rows for 151,665 token ids: no tokens)."""
    eos = tok.eos_token_id
    return dict(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos,
                bos_token_id=model.generation_config.bos_token_id,
                suppress_tokens=list(range(len(tok), model.config.vocab_size)) or None)


class HFGenerator:
    """transformers, one prompt at a time (true per-prompt latency); seeded per prompt, so an
    answer does not depend on which prompts came before it."""

    batched = False

    def __init__(self, path: Path, s: dict, device: str = "cpu"):
        t0 = time.perf_counter()
        self.model, self.tok = load_hf(path, device)
        self.load_s = time.perf_counter() - t0
        self.s, self.device = s, device
        self.dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def _config(self):
        from transformers import GenerationConfig

        kw = generation_kwargs(self.model, self.tok, self.s["max_new_tokens"])
        if self.s["greedy"]:
            return GenerationConfig(do_sample=False, **kw)
        # top_k=0: NeMo's rule (top-k or top-p, not both); top_p=0 means "off" there, 1.0 here.
        return GenerationConfig(do_sample=True, temperature=self.s["temperature"], top_k=0,
                                top_p=self.s["top_p"] or 1.0, **kw)

    def generate(self, prompts: list[str]) -> list[Answer]:
        import torch

        out = []
        gc = self._config()
        for prompt in prompts:
            enc = self.tok(prompt, return_tensors="pt", add_special_tokens=False).to(self.device)
            torch.manual_seed(self.s["seed"])
            t0 = time.perf_counter()
            with torch.inference_mode():
                ids = self.model.generate(**enc, generation_config=gc)
            if self.device == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            new = ids[0, enc["input_ids"].shape[1]:]
            n = int((new != self.tok.eos_token_id).sum())  # eos ends an answer; it is no answer token
            out.append(Answer(self.tok.decode(new, skip_special_tokens=True), n, dt))
        return out

    def close(self) -> None:
        self.model = None


def nemo_inference_params(s: dict) -> dict:
    """CommonInferenceParams arguments: greedy is top_k=1 (megatron's sampler divides by the temperature, so
    0 is no option there); sampling is temperature + top_p with top_k=0 (NeMo refuses both > 0)."""
    if s["greedy"]:
        return dict(temperature=1.0, top_k=1, top_p=0.0, num_tokens_to_generate=s["max_new_tokens"])
    return dict(temperature=s["temperature"], top_k=0, top_p=s["top_p"], num_tokens_to_generate=s["max_new_tokens"])


def nemo_trainer(cuda: bool):
    """The trainer llm.generate wants: tp=1, pp=1, no optimizer; bf16 on CUDA (fp32 on CPU, for checks)."""
    import torch
    from nemo import lightning as nl

    strategy = nl.MegatronStrategy(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                   ckpt_load_strictness="log_all", setup_optimizers=False,
                                   store_optimizer_states=False)
    plugins = nl.MegatronMixedPrecision(precision="bf16-mixed", params_dtype=torch.bfloat16,
                                        pipeline_dtype=torch.bfloat16, autocast_enabled=False,
                                        grad_reduce_in_fp32=False) if cuda else None
    return nl.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, num_nodes=1, strategy=strategy,
                      plugins=plugins, logger=False, enable_checkpointing=False)


def mask_padded_vocab(wrapper, n_tokens: int) -> None:
    """Make the inference wrapper's logits -inf past the tokenizer's last id.

    Qwen2.5's embedding has 151,936 rows for 151,665 token ids. A sample from the padded rows is no token:
    megatron-core's detokenizer then fails inside generation (NeMo's AutoTokenizer maps the id to None,
    text_generation_controller.py:88), as a random model's sampling showed; a trained model only makes it
    rare. transformers gets the same rule through GenerationConfig.suppress_tokens (HFGenerator).
    """
    step = wrapper.run_one_forward_step

    def run_one_forward_step(*args, **kwargs):
        logits = step(*args, **kwargs)
        if logits is not None and logits.shape[-1] > n_tokens:  # None: not the last pipeline stage
            logits[..., n_tokens:] = float("-inf")
        return logits

    wrapper.run_one_forward_step = run_one_forward_step


class NemoGenerator:
    """NeMo's llm.generate for one checkpoint, split in its halves: load once, then generate batches.

    Runs inside a worker process (one model per process, see the module docstring). On CPU it
    runs too, in fp32 with the compatibility patches: that is how it is checked without a GPU.
    """

    batched = True

    def __init__(self, path: Path, s: dict, device: str = "cuda"):
        import torch

        from jacpt import nemo_compat

        nemo_compat.apply()  # no-op in the NeMo container; CPU / no-TE / torch>=2.8 patches elsewhere
        from nemo.collections.llm import inference

        self.s, self.cuda, self.inference = s, device == "cuda", inference
        self.dtype = "bfloat16" if self.cuda else "float32"
        t0 = time.perf_counter()
        self.model, self.tok = inference.setup_model_and_tokenizer(
            path=Path(path), trainer=nemo_trainer(self.cuda),
            params_dtype=torch.bfloat16 if self.cuda else torch.float32)
        # Without TE, each decode step is replayed from a CUDA graph (nemo_compat.DecodeGraphs); then the mask.
        self.decode_graphs = nemo_compat.decode_graphs(self.model)
        mask_padded_vocab(self.model, self.tok.tokenizer.vocab_size)  # NeMo AutoTokenizer: len(HF tokenizer)
        if self.cuda:
            torch.cuda.synchronize()
        self.load_s = time.perf_counter() - t0

    def generate(self, prompts: list[str]) -> list[Answer]:
        import torch
        from megatron.core.inference.common_inference_params import CommonInferenceParams

        # Size the KV cache for this batch, as llm.generate does (api.py:1083-1086), and for its batch size
        # too: the static context allocates inference_max_requests (default 8) rows once and asserts the
        # batch fits (megatron/core/transformer/attention.py:277), so >8 prompts in one call would fail.
        n = len(prompts)
        max_len = self.s["max_new_tokens"] + max(len(self.tok.tokenize(p)) for p in prompts)
        cfg, ctx = self.model.inference_wrapper_config, self.model.inference_context
        cfg.inference_max_seq_length, cfg.inference_max_requests = max_len, n
        ctx.max_sequence_length, ctx.max_batch_size = max_len, n
        ctx.key_value_memory_dict = {}  # reallocated at the first forward with the sizes above
        t0 = time.perf_counter()
        results = self.inference.generate(
            model=self.model, tokenizer=self.tok, prompts=prompts, add_BOS=False, max_batch_size=n,
            random_seed=self.s["seed"], inference_params=CommonInferenceParams(**nemo_inference_params(self.s)))
        if self.cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        out = []
        for r in results:  # in prompt order (StaticInferenceEngine.generate)
            # Decoded here from generated_tokens: megatron-core 0.12.3 builds generated_text from the whole
            # batch row (text_generation_controller.py:87 ignores the lengths), so a shorter prompt's text
            # runs on past num_tokens_to_generate, and it keeps <|endoftext|>.
            ids = [int(t) for t in r.generated_tokens.tolist()]
            if self.tok.eod in ids:
                ids = ids[:ids.index(self.tok.eod)]
            text = self.tok.detokenize(ids, remove_special_tokens=True)
            out.append(Answer(text, len(ids), dt))  # batched: each prompt waited for the whole batch
        return out

    def close(self) -> None:
        self.model = None


BACKENDS = {"hf": HFGenerator, "nemo": NemoGenerator}
_PREFIX = "@@jacpt-worker@@ "  # marks protocol lines; anything else a library prints goes to the log


class WorkerGenerator:
    """A generator in its own process (`python -m jacpt.generate worker ...`), spoken to in JSON lines.

    The worker's stderr and any stray stdout go to `log_path`; its last lines are shown when it fails.
    """

    def __init__(self, backend: str, path: Path, s: dict, device: str, log_path: Path, wait: bool = True):
        self.batched = BACKENDS[backend].batched
        self.load_s, self.dtype = None, None
        self.log_path, self.what = log_path, f"{backend} worker for {path}"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "a", encoding="utf-8")
        env = dict(os.environ)
        env["PYTHONPATH"] = str(paths.KIT_ROOT / "py") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                                          else "")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        cmd = [sys.executable, "-m", "jacpt.generate", "worker", backend, str(path), json.dumps(s), device]
        self.log.write("$ " + " ".join(cmd) + "\n")
        self.log.flush()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, encoding="utf-8", env=env, cwd=str(paths.KIT_ROOT))
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until the worker has loaded its model (returns at once after the first time)."""
        if self.load_s is None:
            ready = self._read()
            self.load_s, self.dtype = ready["load_s"], ready["dtype"]

    def _tail(self, n: int = 25) -> str:
        if not self.log.closed:
            self.log.flush()
        lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(_PREFIX):
                msg = json.loads(line[len(_PREFIX):])
                if msg["event"] == "error":
                    self.close()
                    raise StageError(f"the {self.what} failed: {msg['error']}\n(log {self.log_path}, last lines:)\n"
                                     f"{self._tail()}")
                return msg
            self.log.write(line)
        rc = self.proc.wait()
        self.log.close()
        raise StageError(f"the {self.what} exited {rc} without answering (log {self.log_path}, last lines:)\n"
                         f"{self._tail()}")

    def submit(self, prompts: list[str]) -> None:
        """Ask for answers without waiting for them (`collect` reads them)."""
        self.wait_ready()
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompts": prompts}) + "\n")
        self.proc.stdin.flush()

    def collect(self) -> list[Answer]:
        return [Answer(a["text"], a["new_tokens"], a["latency_s"]) for a in self._read()["answers"]]

    def generate(self, prompts: list[str]) -> list[Answer]:
        self.submit(prompts)
        return self.collect()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=120)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def worker_main(backend: str, path: str, settings_json: str, device: str) -> int:
    """The worker process: load once, say `ready`, answer each request line until stdin closes."""
    proto = sys.stdout
    sys.stdout = sys.stderr  # library prints go to the log; stdout carries the protocol

    def send(msg: dict) -> None:
        proto.write(_PREFIX + json.dumps(msg) + "\n")
        proto.flush()

    try:
        gen = BACKENDS[backend](Path(path), json.loads(settings_json), device)
        send({"event": "ready", "load_s": gen.load_s, "dtype": gen.dtype})
        for line in sys.stdin:
            if line.strip():
                answers = gen.generate(json.loads(line)["prompts"])
                send({"event": "answers", "answers": [a.as_dict() for a in answers]})
    except Exception as e:  # reported to the parent, which shows it with the log's tail
        import traceback

        traceback.print_exc()
        send({"event": "error", "error": f"{type(e).__name__}: {e}"})
        return 1
    return 0


# ----------------------------------------------------------------------------- tables

def _w(ch: str) -> int:
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def text_width(s: str) -> int:
    """Terminal cells a string takes (kana and kanji take two)."""
    return sum(_w(c) for c in s)


def printable(text: str) -> str:
    """Text safe for a table cell: tabs become spaces, other control and format characters become U+FFFD."""
    return "".join(" " if c == "\t" else c if c == "\n" or unicodedata.category(c) not in ("Cc", "Cf") else "\ufffd"
                   for c in text.replace("\r\n", "\n"))


def wrap(text: str, width: int) -> list[str]:
    """Break text into lines of at most `width` cells, by character (Japanese has no spaces to break at)."""
    out = []
    for para in printable(text).split("\n"):
        line, used = "", 0
        for ch in para:
            w = _w(ch)
            if used + w > width and line:
                out.append(line)
                line, used = "", 0
            line, used = line + ch, used + w
        out.append(line)
    return out


def grid(header: list[str], rows: list[list[str]], widths: list[int]) -> str:
    """A box table with wrapped multi-line cells."""
    def rule(left: str, mid: str, right: str) -> str:
        return left + mid.join("─" * (w + 2) for w in widths) + right

    def pad(s: str, w: int) -> str:
        return s + " " * (w - text_width(s))

    lines = [rule("┌", "┬", "┐")]
    for i, row in enumerate([header] + rows):
        cells = [wrap(c, w) for c, w in zip(row, widths)]
        height = max(len(c) for c in cells)
        for k in range(height):
            lines.append("│" + "│".join(f" {pad(c[k] if k < len(c) else '', w)} " for c, w in zip(cells, widths)) + "│")
        lines.append(rule("├", "┼", "┤") if i < len(rows) else rule("└", "┴", "┘"))
    return "\n".join(lines)


def _stats(a: dict, batched: bool) -> str:
    tps = f"{a['tokens_per_s']:.1f} tok/s" if a["tokens_per_s"] is not None else "- tok/s"
    return f"[{a['new_tokens']} tok · {'batch ' if batched else ''}{a['latency_s']:.2f} s · {tps}]"


def render_console(doc: dict, width: int | None = None) -> str:
    """The side-by-side table: prompt | base | CPT | LoRA, with load time, latency and tokens/s."""
    width = width or shutil.get_terminal_size((160, 24)).columns
    models = doc["models"]
    pw = min(24, max(8, max(text_width(r["prompt"]) for r in doc["results"])))
    mw = max(16, (width - pw - 3 * len(models) - 4) // len(models))
    header = ["prompt"] + [f"{m['label']}\nload {m['load_s']:.1f} s · {m['tokens_per_s'] or 0:.1f} tok/s"
                           for m in models]
    rows = [[r["prompt"]] + [f"{r['answers'][m['key']]['text']}\n{_stats(r['answers'][m['key']], m['batched'])}"
                             for m in models] for r in doc["results"]]
    s = doc["settings"]
    head = [f"demo ({doc['profile']}): {doc['method']}",
            f"settings: max_new_tokens={s['max_new_tokens']} "
            + ("greedy" if s["greedy"] else f"temperature={s['temperature']} top_p={s['top_p']} seed={s['seed']}")]
    if doc.get("note"):
        head.insert(1, doc["note"])
    return "\n".join(head) + "\n" + grid(header, rows, [pw] + [mw] * len(models))


def _md(s: str) -> str:
    return printable(s).replace("|", "\\|").replace("\n", "<br>")


def render_markdown(doc: dict) -> str:
    s, models = doc["settings"], doc["models"]
    out = [f"# Demo: {' vs '.join(m['label'] for m in models)} ({doc['profile']})", "",
           f"- method: {doc['method']}"]
    if doc.get("note"):
        out.append(f"- {doc['note']}")
    out += [f"- settings: max_new_tokens={s['max_new_tokens']}, "
            + ("greedy" if s["greedy"] else f"temperature={s['temperature']}, top_p={s['top_p']}, seed={s['seed']}"),
            f"- prompts: {doc['prompts_file']}", f"- started: {doc['started_utc']}", "",
            "| model | path | load s | ready s | answer tokens | generate s | tokens/s |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for m in models:
        out.append(f"| {m['label']} | `{m['path']}` | {m['load_s']:.2f} | {m['startup_s']:.2f} | {m['new_tokens']} | "
                   f"{m['generate_s']:.2f} | {m['tokens_per_s'] or 0:.1f} |")
    out.append("")
    out.append("load s: the checkpoint load; ready s: until the model could answer (with worker processes: from "
               "their common start, imports included; the workers load and answer at the same time, so their "
               "times overlap).")
    if any(m["batched"] for m in models):
        out += ["", "All prompts went in one batch per model: a prompt's latency is the batch's."]
    out += ["", "| prompt | " + " | ".join(m["label"] for m in models) + " |", "|---" * (len(models) + 1) + "|"]
    for r in doc["results"]:
        cells = [f"{_md(r['answers'][m['key']]['text'])}<br><sub>{_stats(r['answers'][m['key']], m['batched'])}</sub>"
                 for m in models]
        out.append(f"| {_md(r['prompt'])} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- the stage

def plan(cfg: Config, cuda: bool) -> dict:
    """What the demo will use: method, models, prompts, settings. Loads nothing."""
    prompts_file, prompts = load_prompts(cfg)
    s = settings(cfg)
    models = nemo_models(cfg.profile) if cuda else hf_models(cfg.profile)
    return {
        "format": FORMAT, "profile": cfg.profile,
        "method": ("NeMo (llm.generate halves) on CUDA, bf16, one worker process per model, all at once" if cuda
                   else "transformers on CPU, float32"),
        "backend": "nemo" if cuda else "hf", "device": "cuda" if cuda else "cpu",
        "note": None if cuda else NO_CUDA_NOTE, "settings": s, "prompts_file": str(prompts_file),
        "prompts_sha256": sha256_file(prompts_file), "prompts": prompts, "models": [m.as_dict() for m in models],
    }


def plan_text(p: dict, interactive: bool) -> str:
    s = p["settings"]
    lines = [f"profile      {p['profile']}", f"method       {p['method']}"]
    if p["note"]:
        lines.append(f"             ({p['note']})")
    lines.append("models")
    for m in p["models"]:
        lines.append(f"  {m['label']:<5} {m['path']}")
        lines.append(f"        from {m['run']}")
    if p["backend"] == "nemo":
        lines.append("launch       one process per model, all three at once:")
        lines += [f"  {sys.executable} -m jacpt.generate worker nemo {m['path']} '<settings>' cuda"
                  for m in p["models"]]
    lines += [f"prompts      {len(p['prompts'])} from {p['prompts_file']}",
              f"settings     max_new_tokens={s['max_new_tokens']} temperature={s['temperature']} top_p={s['top_p']} "
              f"seed={s['seed']} ({'greedy' if s['greedy'] else 'sampling'})",
              f"interactive  {'yes: a chat loop after the table' if interactive else 'no'}",
              f"output       {runs.runs_root() / p['profile']}/demo-<stamp>/demo.json, demo.md"]
    return "\n".join(lines)


def _model_record(ref: dict, gen, start_s: float, gen_s: float, got: list[Answer]) -> dict:
    n = sum(a.new_tokens for a in got)
    log(f"{ref['label']}: {n} tokens in {gen_s:.2f} s")
    return {**ref, "load_s": round(gen.load_s, 3), "startup_s": round(start_s, 3), "dtype": gen.dtype,
            "batched": gen.batched, "new_tokens": n, "generate_s": round(gen_s, 3),
            "tokens_per_s": round(n / gen_s, 2) if gen_s > 0 else None}


def _document(p: dict, models: list[dict], answers: dict) -> dict:
    results = [{"prompt": q, "answers": {k: answers[k][i] for k in answers}} for i, q in enumerate(p["prompts"])]
    doc = {k: v for k, v in p.items() if k not in ("models",)}
    doc.update(models=models, results=results)
    return doc


def run_workers(p: dict, run_dir: Path, keep: bool, backend: str = "nemo") -> tuple[dict, dict]:
    """Every model in its own worker process, all started at once; each is asked as soon as it is
    ready, so the imports, loads and answers of the models overlap. Returns (doc, workers kept open
    when `keep`). startup_s counts from the common start; generate_s from the model's own request."""
    prompts, gens, start, sent = p["prompts"], {}, {}, {}
    t0 = time.perf_counter()
    try:
        for ref in p["models"]:
            log(f"{ref['label']}: starting a worker for {ref['path']}")
            gens[ref["key"]] = WorkerGenerator(backend, Path(ref["path"]), p["settings"], p["device"],
                                               run_dir / f"worker-{ref['key']}.log", wait=False)
        for ref in p["models"]:
            gen = gens[ref["key"]]
            gen.wait_ready()
            start[ref["key"]] = time.perf_counter() - t0
            log(f"{ref['label']}: loaded in {gen.load_s:.1f} s ({gen.dtype}; ready after {start[ref['key']]:.1f} s, "
                f"workers started together); {len(prompts)} prompts")
            gen.submit(prompts)
            sent[ref["key"]] = time.perf_counter()
        models, answers = [], {}
        for ref in p["models"]:
            got = gens[ref["key"]].collect()
            models.append(_model_record(ref, gens[ref["key"]], start[ref["key"]],
                                        time.perf_counter() - sent[ref["key"]], got))
            answers[ref["key"]] = [a.as_dict() for a in got]
    except BaseException:
        _close_all(gens)
        raise
    if not keep:
        _close_all(gens)
        gens = {}
    return _document(p, models, answers), gens


def run_models(p: dict, run_dir: Path, keep: bool) -> tuple[dict, dict]:
    """Load each model once, answer all prompts; returns (doc, generators kept open when `keep`).

    NeMo (CUDA): worker processes, started together (run_workers). transformers (CPU): in this
    process, one model at a time, so only one is in memory unless `keep`."""
    if p["backend"] == "nemo":
        return run_workers(p, run_dir, keep)
    prompts, kept, models, answers = p["prompts"], {}, [], {}
    for ref in p["models"]:
        log(f"{ref['label']}: loading {ref['path']}")
        t0 = time.perf_counter()
        try:
            gen = HFGenerator(Path(ref["path"]), p["settings"], p["device"])
        except BaseException:
            _close_all(kept)
            raise
        start_s = time.perf_counter() - t0
        log(f"{ref['label']}: loaded in {gen.load_s:.1f} s ({gen.dtype}; ready after {start_s:.1f} s); "
            f"{len(prompts)} prompts")
        try:
            t0 = time.perf_counter()
            got = gen.generate(prompts)
            gen_s = time.perf_counter() - t0
        except BaseException:
            _close_all({**kept, ref["key"]: gen})
            raise
        models.append(_model_record(ref, gen, start_s, gen_s, got))
        answers[ref["key"]] = [a.as_dict() for a in got]
        if keep:
            kept[ref["key"]] = gen
        else:
            gen.close()
    return _document(p, models, answers), kept


def _close_all(gens: dict) -> None:
    for g in gens.values():
        g.close()


def chat(gens: dict, labels: dict, run_dir: Path, stdin=None, width: int | None = None) -> int:
    """Read prompts from stdin until EOF, an empty line or 'exit'; every model answers each one."""
    stdin = stdin or sys.stdin
    width = width or shutil.get_terminal_size((160, 24)).columns
    mw = max(16, (width - 3 * len(gens) - 1) // len(gens))
    turns = 0
    print("\ninteractive: type a prompt (a raw continuation); an empty line, 'exit' or EOF ends", flush=True)
    while True:
        print("prompt> ", end="", flush=True)
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            break
        if not line or not line.strip() or line.strip() == "exit":
            break
        prompt = line.strip()
        try:
            got = {k: g.generate([prompt])[0] for k, g in gens.items()}
        except KeyboardInterrupt:
            break
        rows = [[f"{got[k].text}\n{_stats(got[k].as_dict(), gens[k].batched)}" for k in gens]]
        print(grid([labels[k] for k in gens], rows, [mw] * len(gens)), flush=True)
        with open(run_dir / "chat.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"prompt": prompt, "answers": {k: a.as_dict() for k, a in got.items()}},
                               ensure_ascii=False) + "\n")
        turns += 1
    print()
    return turns


def demo_stage(cfg: Config, dry_run: bool, interactive: bool) -> Path:
    """`make demo`: every demo prompt through base, CPT and LoRA; demo.json + demo.md in a new run dir.

    Returns the run's COMPLETE.json (the dry run: its plan.json). Raises StageError / RunError naming the fix.
    """
    cuda = cuda_available()
    p = plan(cfg, cuda)
    if not cuda:
        log(NO_CUDA_NOTE)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    # The demo always runs again: a nonce in the key, so open_run never finds it "done".
    key = {"nonce": f"{started}-{secrets.token_hex(4)}", "plan": p, "interactive": interactive, "format": FORMAT}
    inputs = {"models": {m["key"]: m["path"] for m in p["models"]}, "model_runs": {m["key"]: m["run"]
                                                                                   for m in p["models"]},
              "prompts_file": p["prompts_file"], "prompts_sha256": p["prompts_sha256"]}
    run, _ = runs.open_run(cfg, "demo", key, inputs=inputs, dry_run=dry_run)
    if dry_run:
        text = plan_text(p, interactive)
        print(text)
        write_json_atomic(run.dir / "plan.json", {**p, "interactive": interactive})
        write_text_atomic(run.dir / "plan.txt", text + "\n")
        return run.dir / "plan.json"

    doc, gens = run_models(p, run.dir, keep=interactive)
    doc["started_utc"] = started
    write_json_atomic(run.dir / "demo.json", doc)
    write_text_atomic(run.dir / "demo.md", render_markdown(doc))
    print(render_console(doc), flush=True)
    turns = 0
    try:
        if interactive:
            turns = chat(gens, {m["key"]: m["label"] for m in doc["models"]}, run.dir)
    finally:
        _close_all(gens)
    run.mark_complete({"demo_json": "demo.json", "demo_md": "demo.md", "method": doc["method"],
                       "prompts": len(doc["prompts"]), "chat_turns": turns,
                       "tokens_per_s": {m["key"]: m["tokens_per_s"] for m in doc["models"]}})
    log(f"demo written: {run.dir / 'demo.md'}")
    return run.dir / runs.MARKER


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "worker":
        sys.exit(worker_main(*sys.argv[2:]))
    sys.exit("usage: python -m jacpt.generate worker {hf,nemo} PATH SETTINGS_JSON {cuda,cpu}\n"
             "(an internal entry point of `jacpt demo`)")
