"""The NeMo stages end to end on the tiny model (import -> CPT -> LoRA -> export), and their gates.

One chain per session (conftest.tiny_chain), each stage in its own process, offline
(HF_HUB_OFFLINE=1). Values are meaningless for a random tiny model; what is asserted is
that the right things were restored, written and refused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_kit

from jacpt import assets, optim_steps, runs
from jacpt.fsutil import sha256_file

pytestmark = pytest.mark.slow


def test_import_is_tied_and_keeps_the_qwen_tokenizer(tiny_chain, tokenizer_dir):
    imp = tiny_chain["import"]
    assert imp["tied"] is True and imp["params"] == 9_798_208  # 151936*64 once, not twice
    assert imp["tokenizer_fingerprint"] == assets.tokenizer_fingerprint(tokenizer_dir)
    model_yaml = (imp["dir"] / "model" / "context" / "model.yaml").read_text()
    assert "share_embeddings_and_output_weights: true" in model_yaml


def test_cpt_restored_the_import_and_trained(tiny_chain):
    cpt = tiny_chain["cpt"]
    assert "restore gate: weights at step 0 equal" in cpt["stderr"]
    assert cpt["steps"] == 10 and cpt["steps_logged"] == 10
    assert cpt["last_loss"] < cpt["first_loss"]  # lr 1e-3 on a random tiny model: loss goes down
    recipe = (cpt["dir"] / "recipe.yaml").read_text()
    assert "PreTrainingDataModule" in recipe and "MockDataModule" not in recipe
    assert f"path: {tiny_chain['import']['dir'] / 'model'}" in recipe  # restore_config
    assert "ckpt_async_save: false" in recipe and "pretrained_model_name:" in recipe
    # SwiGLU fused while training only: the saved model config keeps Megatron's flag off (generation).
    assert "fused_swiglu: true" in recipe and "SwiGLU fused into one kernel each way while training" in cpt["stderr"]
    assert optim_steps.ZERO_COUNT_NOTE in cpt["stderr"]  # Megatron-Core 0.12 counts gradient zeros only when asked
    ckpt_config = (cpt["dir"] / cpt["checkpoint"] / "context" / "model.yaml").read_text()
    assert "gated_linear_unit: true" in ckpt_config and "bias_activation_fusion: true" not in ckpt_config
    info = json.loads((cpt["dir"] / "run.json").read_text())
    assert info["inputs"]["data_manifest_sha256"] == sha256_file(Path(info["inputs"]["data_manifest"]))
    assert info["settings"]["cpt.max_steps"] == 10 and info["versions"]["nemo-toolkit"].startswith("2.3")
    assert list((cpt["dir"] / "wandb").rglob("*.wandb")), "wandb offline run files"
    assert list((cpt["dir"] / "tb_logs").rglob("events.out.tfevents.*")), "TensorBoard event files"


def test_lora_restored_cpt_and_saved_adapters_only(tiny_chain):
    lora = tiny_chain["lora"]
    ckpt = lora["dir"] / lora["checkpoint"]
    meta = json.loads((ckpt / "weights" / "adapter_metadata.json").read_text())
    assert meta["model_ckpt_path"] == str(tiny_chain["cpt"]["dir"] / tiny_chain["cpt"]["checkpoint"])
    recipe = (lora["dir"] / "recipe.yaml").read_text()
    assert "FineTuningDataModule" in recipe and "Squad" not in recipe and "nemo://" not in recipe
    assert "dim: 8" in recipe and "alpha: 16" in recipe
    assert "fused_swiglu: true" in recipe and "SwiGLU fused into one kernel each way while training" in lora["stderr"]
    assert optim_steps.ZERO_COUNT_NOTE in lora["stderr"]


def test_export_is_tied_qwen2_with_card_and_checksums(tiny_chain, tiny_model_dir):
    from transformers import AutoConfig

    exp = tiny_chain["export"]
    base = json.loads((tiny_model_dir / "config.json").read_text())
    for kind in ("cpt", "lora"):
        d = exp["dir"] / exp["models"][kind]
        cfg = AutoConfig.from_pretrained(d)
        assert cfg.tie_word_embeddings is True
        assert cfg.max_position_embeddings == base["max_position_embeddings"]
        assert (d / "generation_config.json").read_bytes() == (tiny_model_dir / "generation_config.json").read_bytes()
        sums = dict(reversed(line.split("  ")) for line in (d / "SHA256SUMS").read_text().splitlines())
        assert sums and all(sha256_file(d / n) == h for n, h in sums.items())
        card = (d / "README.md").read_text()
        assert "license: cc-by-sa-4.0" in card and "AutoModelForCausalLM.from_pretrained" in card
    assert exp["wandb"] == "offline"
    assert list((exp["dir"] / "wandb").rglob("*.wandb"))


def test_export_loads_and_generates_with_transformers(tiny_chain):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tiny_chain["export"]["dir"] / "hf" / "lora"
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
    ids = tok("日本の首都は", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] == ids.input_ids.shape[1] + 6


ROUND_TRIP = """
import sys
from jacpt import nemo_compat, qwen
def main():
    nemo_compat.apply()
    from nemo.collections import llm
    llm.export_ckpt(path=sys.argv[1], target="hf", output_path=sys.argv[2], overwrite=True)
if __name__ == "__main__":
    main()
"""


def test_hf_nemo_hf_round_trip_is_bit_exact(tiny_chain, tiny_model_dir, tmp_path, chain_env):
    from safetensors.torch import load_file

    script = tmp_path / "rt.py"
    script.write_text(ROUND_TRIP)
    subprocess.run([sys.executable, str(script), str(tiny_chain["import"]["dir"] / "model"), str(tmp_path / "hf")],
                   env=chain_env, check=True, capture_output=True, timeout=300)
    a, b = load_file(tiny_model_dir / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(a) == sorted(b) and "lm_head.weight" not in b
    assert all(a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()) for k in a)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True


def test_rerun_with_same_inputs_does_nothing(tiny_chain, chain_env):
    proc = run_kit(["cpt"], chain_env)
    assert "up to date" in proc.stderr
    assert Path(proc.stdout.strip().splitlines()[-1]) == tiny_chain["cpt"]["path"]


def test_dry_run_prints_recipe_and_launch_and_trains_nothing(tiny_chain, chain_env):
    proc = run_kit(["cpt", "--dry-run", "cpt.max_steps=3"], chain_env)
    assert "_target_: nemo.collections.llm.gpt.data.pre_training.PreTrainingDataModule" in proc.stdout
    for cls in ("ParamCounter", "MetricsRecorder", "TrainingGuard"):  # the training-hygiene callbacks
        assert f"_target_: jacpt.callbacks.{cls}" in proc.stdout
    assert "# launch:" in proc.stdout and "fdl_runner" in proc.stdout
    dry = Path(proc.stdout.strip().splitlines()[-1])
    assert dry.name == "recipe.yaml" and dry.parent.name == "cpt-dry-run"
    assert (dry.parent / "launch.txt").is_file()
    assert not list(dry.parent.rglob("*.distcp"))


def test_bad_setting_fails_before_any_model_is_built(chain_env):
    proc = run_kit(["cpt", "cpt.max_stepz=3"], chain_env, check=False)
    assert proc.returncode == 2 and "did you mean cpt.max_steps?" in proc.stderr
    proc = run_kit(["lora", "lora.dropout=2"], chain_env, check=False)
    assert proc.returncode == 2 and "between 0 and 1" in proc.stderr


def test_later_stage_without_its_input_names_the_command(chain_env, tmp_path):
    env = dict(chain_env, JACPT_RUNS_DIR=str(tmp_path / "empty-runs"))
    proc = run_kit(["lora"], env, check=False)
    assert proc.returncode == 1 and "no complete cpt run for profile tiny-cpu" in proc.stderr
    assert "make cpt PROFILE=tiny-cpu" in proc.stderr


def _kill_by_environment(key: str, value: str) -> None:
    """SIGKILL the processes whose environment has key=value. After a hard kill the trainer's multiprocessing
    spawn server (Megatron-Core's async checkpoint writer keeps a Manager queue) is left orphaned, and its
    command line names nothing of the run; it inherited the run's environment."""
    needle = f"{key}={value}".encode()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            pid = int(environ.parent.name)
            if pid not in (os.getpid(), os.getppid()) and needle in environ.read_bytes().split(b"\0"):
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            continue


def test_killed_cpt_resumes_from_its_last_checkpoint(tiny_chain, chain_env):
    """Kill a CPT run after its first checkpoint; the same command resumes and ends at max_steps."""
    args = [sys.executable, "-m", "jacpt.cli", "cpt", "cpt.max_steps=14", "cpt.ckpt_every_n_steps=4"]
    proc = subprocess.Popen(args, env=chain_env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd=str(Path(chain_env["JACPT_RUNS_DIR"]).parent))
    runs_dir = Path(chain_env["JACPT_RUNS_DIR"]) / "tiny-cpu"
    deadline = time.monotonic() + 240
    ckpt = None
    while time.monotonic() < deadline and ckpt is None and proc.poll() is None:
        time.sleep(0.5)
        found = [p for p in runs_dir.glob("cpt-*/cpt/checkpoints/*step=7*") if (p / "weights").is_dir()
                 and not Path(f"{p}-unfinished").exists()]
        ckpt = found[0] if found else None
    assert ckpt is not None, "no checkpoint appeared before the deadline"
    # A hard kill (OOM killer, power cut): the CLI and NeMo-Run's training child, which runs in a
    # session of its own, die together.
    os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-KILL", "-f", chain_env["NEMORUN_HOME"]], check=False)
    _kill_by_environment("NEMORUN_HOME", chain_env["NEMORUN_HOME"])
    proc.wait(timeout=30)
    run_dir = ckpt.parents[2]
    assert not (run_dir / runs.MARKER).exists()

    done = run_kit(args[3:], chain_env)
    assert f"resuming {run_dir}" in done.stderr
    marker = json.loads((run_dir / runs.MARKER).read_text())
    assert marker["steps"] == 14 and "step=13" in marker["checkpoint"]
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]  # optimizer steps completed, 1-based
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]) if steps != sorted(set(steps)) \
        else None
    assert steps[-1] == 14 and steps.count(1) == 1  # finished, and never started over from scratch
    # Picked up after a saved checkpoint (every 4 steps, and at validation every 5): which one depends on
    # whether the kill landed inside a save, whose -unfinished checkpoint NeMo then skips.
    assert restart is None or steps[restart] in (5, 6, 9, 11)


def test_rehearsal_of_the_tiny_chain_passes_offline(tiny_chain, chain_env):
    """The CI rehearsal: the shipped tiny script, offline, through make, on the session's chain.

    The stages already run say "up to date" and print their marker, which the script expects.
    """
    proc = run_kit(["rehearse", "--offline"], chain_env, timeout=1500)
    marker = Path(proc.stdout.strip().splitlines()[-1])
    assert marker.name == runs.MARKER
    doc = json.loads((marker.parent / "rehearse.json").read_text())
    steps = doc["steps"]
    assert [s["name"] for s in steps] == ["data", "import", "cpt", "lora", "export", "demo", "eval"]
    assert all(s["status"] == "pass" for s in steps), steps
