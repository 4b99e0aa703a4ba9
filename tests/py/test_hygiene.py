"""Training hygiene: parameter counts, grad-norm watch, non-finite loss stop, early stopping, model_info.json.

The callbacks are tested on small modules and fake trainers (no NeMo); what the chain wrote is
tested on the session's tiny chain (conftest.tiny_chain), which this file does not run again.
"""

from __future__ import annotations

import json
import math
import re
import types
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from jacpt import callbacks, config, runs, train
from jacpt.callbacks import GateError
from jacpt.fsutil import sha256_file

# ----------------------------------------------------------------------------- parameter counts


class TiedLM(torch.nn.Module):
    """Embedding 10x4 tied to the output layer, a frozen 4x4 body with bias, a trainable 4x2 head."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(10, 4)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
        self.head = torch.nn.Linear(4, 2, bias=False)
        self.output = torch.nn.Linear(4, 10, bias=False)
        self.output.weight = self.embedding.weight  # tied: one parameter
        for p in self.layers.parameters():
            p.requires_grad_(False)


class Wrapped(torch.nn.Module):
    """What Megatron's DDP and Float16Module do to names: module.module.<name>."""

    def __init__(self, inner):
        super().__init__()
        self.module = inner


def test_param_count_of_a_partly_frozen_tied_wrapped_model():
    model = Wrapped(Wrapped(TiedLM()))
    got = callbacks.count_params(model.named_parameters(remove_duplicate=False))
    # embedding 40 (once, not twice) + head 8 trainable; layers 2 x (16 + 4) = 40 frozen
    assert (got["trainable"], got["total"], got["frozen"]) == (48, 88, 40)
    assert got["trainable_pct"] == round(100 * 48 / 88, 4)
    assert got["trainable_by_name"] == {"embedding.weight": 40, "head.weight": 8}  # no module. prefixes


def test_trainable_by_name_groups_layers():
    model = TiedLM()
    for p in model.layers.parameters():
        p.requires_grad_(True)
    got = callbacks.count_params(model.named_parameters(remove_duplicate=False))
    assert got["trainable"] == got["total"] == 88 and got["trainable_pct"] == 100.0
    assert got["trainable_by_name"]["layers.*.weight"] == 32 and got["trainable_by_name"]["layers.*.bias"] == 8


def fake_trainer(step: int = 0, rank: int = 0, **metrics):
    return types.SimpleNamespace(global_step=step, global_rank=rank, callback_metrics=metrics, should_stop=False,
                                 fast_dev_run=False, current_epoch=0,
                                 strategy=types.SimpleNamespace(reduce_boolean_decision=lambda d, all=True: d))


def test_param_counter_writes_params_json_once_and_prints_one_line(tmp_path, capsys):
    cb = callbacks.ParamCounter(str(tmp_path / "params.json"), "lora")
    cb.on_train_batch_start(fake_trainer(0), Wrapped(TiedLM()), None, 0)
    doc = json.loads((tmp_path / "params.json").read_text())
    assert doc["stage"] == "lora" and (doc["trainable"], doc["total"]) == (48, 88)
    lines = [x for x in capsys.readouterr().err.splitlines() if "parameters" in x]
    assert lines == ["[jacpt] parameters (lora): 48 trainable of 88 (54.55%); params.json in the run dir"]
    (tmp_path / "params.json").unlink()
    cb.on_train_batch_start(fake_trainer(1), TiedLM(), None, 1)  # later batches: nothing
    assert not (tmp_path / "params.json").exists()


def test_param_counter_writes_only_on_rank_zero(tmp_path):
    callbacks.ParamCounter(str(tmp_path / "params.json"), "cpt").on_train_batch_start(fake_trainer(0, rank=1),
                                                                                       TiedLM(), None, 0)
    assert not (tmp_path / "params.json").exists()


# ----------------------------------------------------------------------------- grad norm and loss

def run_guard(norms, losses=None, factor=10.0, min_history=5):
    guard = callbacks.TrainingGuard("cpt", lr=3e-5, explode_factor=factor, min_history=min_history)
    model = TiedLM()
    for i, gn in enumerate(norms, 1):
        loss = torch.tensor(losses[i - 1] if losses else 2.5)
        guard.on_train_batch_end(fake_trainer(i, grad_norm=torch.tensor(gn)), model, {"loss": loss}, None, i)
    return guard


def warnings_in(err: str) -> list[str]:
    return [x for x in err.splitlines() if "grad-norm warning" in x]


def test_normal_grad_norms_do_not_warn(capsys):
    guard = run_guard([1.2, 1.0, 0.9, 1.1, 0.8, 0.7, 2.5, 0.9, 0.6, 4.0, 0.5])  # warm-up noise, 4x at most
    assert warnings_in(capsys.readouterr().err) == [] and guard.counts == {"explode": 0, "nonfinite": 0}


def test_a_spike_past_the_factor_warns_once(capsys):
    guard = run_guard([1.0, 1.1, 0.9, 1.0, 1.2, 1.0, 15.0, 1.0, 40.0, 1.0])
    (line,) = warnings_in(capsys.readouterr().err)
    assert "the gradient norm at step 7 of cpt is 15, 15.0x the running median 1" in line
    assert "cpt.grad_explode_factor=10" in line and "cpt.lr=3e-05" in line and "RUNBOOK.md" in line
    assert guard.counts["explode"] == 2 and guard.first == {"explode": 7}  # the second is counted, not printed


def test_no_spike_verdict_before_enough_history(capsys):
    run_guard([0.01, 50.0, 1.0], min_history=5)  # step 2 is 5000x step 1, but 1 step is no median
    assert warnings_in(capsys.readouterr().err) == []


def test_spike_check_can_be_off_but_inf_still_warns(capsys):
    guard = run_guard([1.0] * 6 + [1000.0, float("inf"), float("nan")], factor=0)
    (line,) = warnings_in(capsys.readouterr().err)
    assert "at step 8 of cpt is inf (not finite)" in line
    assert guard.counts == {"explode": 0, "nonfinite": 2}


def test_summary_at_train_end(capsys):
    guard = run_guard([1.0] * 6 + [50.0])
    guard.on_train_end(fake_trainer(7), None)
    assert "grad-norm summary (cpt): 1 step(s) above 10x the running median, 0 non-finite" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_naming_the_step_and_the_fix(bad):
    with pytest.raises(GateError) as e:
        run_guard([1.0, 1.0, 1.0, 1.0], losses=[2.5, 2.4, bad, 2.3])
    msg = str(e.value)
    assert msg.startswith(f"loss stop: the training loss at step 3 of cpt is {bad}")
    assert "lower the learning rate (cpt.lr=3e-05; try cpt.lr=1.5e-05)" in msg
    assert "check the data" in msg and "RUNBOOK.md: 'loss stop'" in msg


MEGATRON_NAN = ("Rank 0, node vm, device cpu, iteration -1: Unexpected result nan (message='found NaN in local grad "
                "norm for bucket #0 in backward pass before data-parallel communication collective')")


def test_megatrons_nan_gradient_error_gets_the_stop_message_in_front(capsys):
    """With NeMo's DDP default (check_for_nan_in_grad) a nan loss stops inside the backward pass first."""
    guard = callbacks.TrainingGuard("lora", lr=1e-4, explode_factor=10.0)
    exc = RuntimeError(MEGATRON_NAN)
    guard.on_exception(fake_trainer(41), TiedLM(), exc)
    first, second = str(exc).split("\n")
    assert first.startswith("loss stop: the gradients at step 42 of lora are not finite (nan)")
    assert "lora.lr=0.0001; try lora.lr=5e-05" in first and "RUNBOOK.md: 'loss stop'" in first
    assert second == f"  Megatron-Core's check said: {MEGATRON_NAN}"  # the original kept
    assert "[jacpt] loss stop: the gradients at step 42" in capsys.readouterr().err
    guard.on_exception(fake_trainer(41), TiedLM(), exc)  # a second pass leaves it as it is
    assert str(exc).count("loss stop:") == 1
    other = RuntimeError("CUDA out of memory")
    guard.on_exception(fake_trainer(41), TiedLM(), other)
    assert str(other) == "CUDA out of memory"


def test_grad_norm_of_prefers_megatron_then_main_grad_then_grad():
    model = TiedLM()
    assert callbacks.grad_norm_of(fake_trainer(1, grad_norm=torch.tensor(2.0)), model) == (2.0, "megatron")
    assert callbacks.grad_norm_of(fake_trainer(1), model) == (None, "none")
    model.head.weight.grad = torch.full((2, 4), 1.0)  # norm sqrt(8)
    model.embedding.weight.main_grad = torch.full((10, 4), 0.5)  # Megatron's buffer: norm sqrt(10)
    model.embedding.weight.grad = torch.full((10, 4), 100.0)  # ignored: main_grad is the real one
    model.layers[0].weight.grad = torch.full((4, 4), 100.0)  # frozen: not counted
    trainer = fake_trainer(1)
    value, source = callbacks.grad_norm_of(trainer, model)
    assert source == "computed" and value == pytest.approx(math.sqrt(18))
    # asked again in the same step (the recorder and the guard both ask): computed once
    model.head.weight.grad = torch.full((2, 4), 2.0)
    assert callbacks.grad_norm_of(trainer, model) == (value, "computed")
    trainer.global_step = 2  # the next step sees the new gradients
    assert callbacks.grad_norm_of(trainer, model)[0] == pytest.approx(math.sqrt(32 + 10))


class LightningTiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.norms = []  # each step's gradient norm, as torch computes it

    def on_before_optimizer_step(self, optimizer):
        self.norms.append(math.sqrt(sum(float(p.grad.norm()) ** 2 for p in self.parameters())))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 4, generator=g)
        return torch.utils.data.DataLoader(list(zip(x, x.sum(1, keepdim=True))), batch_size=4)


def test_without_megatron_the_grad_norm_is_computed_and_logged(tmp_path):
    """A plain optimizer reports no grad norm: the callbacks compute it, log it and record it per step."""
    trainer = pl.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callbacks.MetricsRecorder(str(tmp_path / "metrics.jsonl")),
                                    callbacks.TrainingGuard("lora", lr=0.01, explode_factor=10.0)])
    model = LightningTiny()
    trainer.fit(model)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert [r["grad_norm"] for r in recs] == pytest.approx(model.norms)  # each step's own, never the last one's
    assert len(set(model.norms)) == 5 and all(n > 0 for n in model.norms)
    assert float(trainer.callback_metrics["grad_norm"]) == pytest.approx(model.norms[-1])


# ----------------------------------------------------------------------------- early stopping

def test_early_stop_counts_validations_and_says_why(capsys):
    es = callbacks.EarlyStop("lora", patience=2, min_delta=0.05, max_steps=100)
    stops = []
    for step, val in ((10, 3.0), (20, 2.9), (30, 2.88), (40, 2.87)):
        t = fake_trainer(step, val_loss=torch.tensor(val))
        es._run_early_stopping_check(t)
        stops.append(t.should_stop)
    assert stops == [False, False, False, True]  # 2.88 and 2.87 are not 0.05 below 2.9
    assert ("[jacpt] early stop (lora): val_loss has not improved by more than 0.05 in 2 validation check(s) "
            "(best 2.9000, now 2.8700); stopping at step 40 of 100") in capsys.readouterr().err


def lora_cfg(*overrides):
    return config.load("tiny-cpu", list(overrides), env={})


def test_recipe_callbacks_have_early_stopping_only_when_enabled(tmp_path):
    pytest.importorskip("nemo_run", reason="needs nemo_run (make setup)")
    from lightning.pytorch.callbacks import EarlyStopping

    on = train.hygiene_callbacks(lora_cfg("lora.early_stop_patience=4", "lora.early_stop_min_delta=0.02"), "lora",
                                 tmp_path)
    assert [c.__fn_or_cls__ for c in on] == [callbacks.ParamCounter, callbacks.MetricsRecorder,
                                            callbacks.TrainingGuard, callbacks.EarlyStop]
    es = on[-1]
    assert issubclass(es.__fn_or_cls__, EarlyStopping)
    assert (es.patience, es.min_delta, es.stage, es.max_steps) == (4, 0.02, "lora", 10)
    assert on[0].path == str(tmp_path / "params.json") and on[2].explode_factor == 10.0
    off = train.hygiene_callbacks(lora_cfg("lora.early_stop_patience=0"), "lora", tmp_path)
    assert callbacks.EarlyStop not in [c.__fn_or_cls__ for c in off]
    cpt = train.hygiene_callbacks(lora_cfg("cpt.grad_explode_factor=3"), "cpt", tmp_path)  # CPT: off by default
    assert callbacks.EarlyStop not in [c.__fn_or_cls__ for c in cpt] and cpt[2].explode_factor == 3.0


def test_the_gpu_profiles_stop_lora_early_and_not_cpt():
    for profile in ("rtx6000ada-48g", "h100-80g"):
        cfg = config.load(profile, env={})
        assert cfg["lora.early_stop_patience"] > 0 and cfg["cpt.early_stop_patience"] == 0
        # patience is counted in validations: they must come often enough to act before max_steps
        assert cfg["lora.val_check_interval"] * (cfg["lora.early_stop_patience"] + 1) < cfg["lora.max_steps"]


def test_lora_has_its_own_log_interval(tmp_path):
    pytest.importorskip("nemo_run", reason="needs nemo_run (make setup)")
    ns = types.SimpleNamespace
    recipe = ns(trainer=ns(callbacks=None, strategy=ns()), optim=ns(config=ns()), data=ns(),
                log=ns(ckpt=ns()))
    cfg = lora_cfg("cpt.log_every_n_steps=3", "lora.log_every_n_steps=7", "wandb.mode=disabled")
    train._common(recipe, cfg, "lora", tmp_path)
    assert recipe.trainer.log_every_n_steps == 7
    assert callbacks.EarlyStop in [c.__fn_or_cls__ for c in recipe.trainer.callbacks]  # tiny-cpu: lora patience 2


@pytest.mark.parametrize("item", ["cpt.grad_explode_factor=0.5", "lora.grad_explode_factor=-1"])
def test_explode_factor_is_validated(item):
    key = item.split("=")[0]
    with pytest.raises(config.ConfigError, match=re.escape(f"{key} = ") + r".*must be 0 \(off\) or above 1"):
        config.load("tiny-cpu", [item], env={})
    assert config.load("tiny-cpu", [f"{key}=0"], env={})[key] == 0.0


# ----------------------------------------------------------------------------- actual steps

def write_metrics(run_dir: Path, steps, vals=()) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": s, "loss": 3.0 - s / 100, "grad_norm": 1.0}) for s in steps]
    lines += [json.dumps({"step": s, "val_loss": v}) for s, v in vals]
    (run_dir / "metrics.jsonl").write_text("".join(x + "\n" for x in lines))


def fake_ckpt(run_dir: Path, stage: str, name: str) -> Path:
    d = run_dir / stage / "checkpoints" / name
    (d / "context").mkdir(parents=True)
    (d / "weights").mkdir()
    return d


def test_steps_done_reads_the_last_step_of_metrics(tmp_path):
    write_metrics(tmp_path, [1, 2, 3, 4, 5, 6])
    assert train.steps_done(tmp_path) == 6
    assert train.steps_done(tmp_path, tmp_path / "m--step=5-consumed_samples=12.0-last") == 6
    write_metrics(tmp_path, [1, 2, 3, 4, 5, 6, 5, 6, 7, 8])  # resumed after step 4's checkpoint
    assert train.steps_done(tmp_path) == 8


def test_steps_done_refuses_a_checkpoint_older_than_the_last_step(tmp_path):
    write_metrics(tmp_path, [1, 2, 3, 4, 5, 6])
    with pytest.raises(train.StageError, match="saved after step 5 but the run ended at step 6"):
        train.steps_done(tmp_path, tmp_path / "m--step=4-consumed_samples=10.0-last")


def test_steps_done_without_metrics_trusts_the_checkpoint_or_fails(tmp_path):
    assert train.steps_done(tmp_path, tmp_path / "m--step=9-consumed_samples=20.0") == 10
    with pytest.raises(train.StageError, match="has no training step"):
        train.steps_done(tmp_path)


def test_an_early_stopped_run_records_its_actual_steps_and_last_checkpoint(tmp_path, capsys):
    from jacpt import stages

    run_dir = tmp_path / "lora-20260101-000000"
    write_metrics(run_dir, range(1, 7), vals=[(2, 3.0), (4, 3.0), (6, 3.0)])
    (run_dir / "params.json").write_text(json.dumps({"trainable": 13312, "total": 9811520,
                                                     "trainable_pct": 0.1357}))
    fake_ckpt(run_dir, "lora", "model_name=0--step=3-consumed_samples=8.0")
    fake_ckpt(run_dir, "lora", "model_name=0--step=3-consumed_samples=8.0-last")
    fake_ckpt(run_dir, "lora", "model_name=0--step=5-consumed_samples=12.0-last")
    cfg = lora_cfg("lora.val_check_interval=2", "lora.early_stop_patience=2")
    ckpt = train.last_checkpoint(run_dir, "lora")
    assert ckpt.name == "model_name=0--step=5-consumed_samples=12.0-last"
    out = stages.train_outputs(cfg, "lora", run_dir, ckpt, "tok")
    assert out["steps"] == 6 and out["max_steps"] == 10 and out["stopped_early"] is True
    assert out["tokens"] == 6 * 2 * 256 and out["checkpoint"] == f"lora/checkpoints/{ckpt.name}"
    assert (out["trainable_params"], out["total_params"], out["val_loss"]) == (13312, 9811520, 3.0)
    assert "lora ended at step 6 of lora.max_steps=10 (early stopping on val_loss)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- model_info

def test_model_info_of_a_lora_checkpoint(tmp_path):
    run_info = {"settings": {"lora.dim": 8, "lora.alpha": 16, "lora.dropout": 0.0, "lora.targets": "linear_qkv"},
                "inputs": {"data_manifest_sha256": "d" * 64}}
    outputs = {"steps": 6, "tokens": 3072, "last_loss": 2.5, "val_loss": 2.6, "trainable_params": 10,
               "total_params": 100, "trainable_pct": 10.0, "tokenizer_fingerprint": "t"}
    parent = {"model_type": "CPT", "checkpoint": "/c", "steps": 10, "tokens_seen": 2560, "final_val_loss": 3.0,
              "lineage": [{"model_type": "base", "checkpoint": "/b"}], "base_model": {"name": "b"}}
    info = runs.model_info("LoRA", tmp_path, outputs, run_info, base_model=parent["base_model"],
                           lineage=[runs.lineage_entry(parent), *parent["lineage"]])
    assert info["model_type"] == "LoRA" and info["lora"] == {"dim": 8, "alpha": 16, "dropout": 0.0,
                                                              "targets": "linear_qkv"}
    assert (info["steps"], info["tokens_seen"], info["final_val_loss"], info["trainable_pct"]) == (6, 3072, 2.6, 10.0)
    assert info["data_manifest_sha256"] == "d" * 64 and info["config"] == run_info["settings"]
    assert [x["model_type"] for x in info["lineage"]] == ["CPT", "base"] and "torch" in info["versions"]
    runs.write_model_info(tmp_path, info)
    assert runs.read_model_info(tmp_path) == info and not list(tmp_path.glob(".*.tmp"))
    merged = runs.derived_info(info, "merged", tmp_path / "hf", exported_from=str(tmp_path))
    assert merged["model_type"] == "merged" and merged["lineage"][0]["model_type"] == "LoRA"
    assert merged["steps"] == 6 and merged["lora"] == info["lora"] and merged["exported_from"] == str(tmp_path)
    with pytest.raises(ValueError, match="use one of base, CPT, LoRA, merged"):
        runs.model_info("SFT", tmp_path, outputs, run_info, base_model={}, lineage=[])


# ----------------------------------------------------------------------------- the tiny chain

REQUIRED = {"format", "model_type", "checkpoint", "created_utc", "base_model", "data_manifest_sha256", "steps",
            "tokens_seen", "final_train_loss", "final_val_loss", "trainable_params", "total_params", "trainable_pct",
            "lora", "tokenizer_fingerprint", "lineage", "versions", "config"}
TINY_PARAMS = 9_798_208  # the tiny model, tied embeddings counted once


def tiny_lora_params() -> int:
    """Adapters of rank 8 on the tiny model's 2 layers: dim x (in + out) for each target module."""
    hidden, ffn, heads, kv_heads, rank = 64, 128, 4, 2, 8
    qkv_out = hidden + 2 * kv_heads * (hidden // heads)
    per_layer = rank * ((hidden + qkv_out) + (hidden + hidden) + (hidden + 2 * ffn) + (ffn + hidden))
    return 2 * per_layer


def chain_infos(tiny_chain) -> dict[str, tuple[Path, dict]]:
    c = tiny_chain
    dirs = {"import": c["import"]["dir"] / "model", "cpt": c["cpt"]["dir"] / c["cpt"]["checkpoint"],
            "lora": c["lora"]["dir"] / c["lora"]["checkpoint"],
            "hf-cpt": c["export"]["dir"] / c["export"]["models"]["cpt"],
            "hf-lora": c["export"]["dir"] / c["export"]["models"]["lora"]}
    return {k: (d, json.loads((d / "model_info.json").read_text())) for k, d in dirs.items()}


@pytest.mark.slow
def test_model_info_beside_every_consumed_checkpoint(tiny_chain):
    infos = chain_infos(tiny_chain)
    manifest = Path(json.loads((tiny_chain["cpt"]["dir"] / "run.json").read_text())["inputs"]["data_manifest"])
    for key, (d, info) in infos.items():
        assert REQUIRED <= set(info), (key, REQUIRED - set(info))
        assert info["checkpoint"] == str(d) and info["versions"]["nemo-toolkit"].startswith("2.3")
        assert info["base_model"]["hf_dir"] == tiny_chain["import"]["hf_dir"]
        assert info["config"]["profile"] == "tiny-cpu" and info["config"]["lora.dim"] == 8
        assert info["tokenizer_fingerprint"] == tiny_chain["import"]["tokenizer_fingerprint"]
    assert {k: i["model_type"] for k, (_, i) in infos.items()} == {
        "import": "base", "cpt": "CPT", "lora": "LoRA", "hf-cpt": "CPT", "hf-lora": "merged"}

    base = infos["import"][1]
    assert (base["steps"], base["tokens_seen"], base["total_params"], base["lineage"]) == (0, 0, TINY_PARAMS, [])
    assert base["data_manifest_sha256"] is None and base["lora"] is None

    for key, seq in (("cpt", 128), ("lora", 256), ("hf-cpt", 128), ("hf-lora", 256)):
        info = infos[key][1]
        assert info["data_manifest_sha256"] == sha256_file(manifest), key
        assert info["steps"] == 10 and info["tokens_seen"] == 10 * 2 * seq, key  # steps x gbs x seq
        assert math.isfinite(info["final_train_loss"]) and math.isfinite(info["final_val_loss"]), key

    cpt, lora = infos["cpt"][1], infos["lora"][1]
    assert cpt["trainable_params"] == cpt["total_params"] == TINY_PARAMS and cpt["trainable_pct"] == 100.0
    assert cpt["lora"] is None and [x["model_type"] for x in cpt["lineage"]] == ["base"]
    assert lora["trainable_params"] == tiny_lora_params() and lora["total_params"] == TINY_PARAMS + tiny_lora_params()
    assert 0 < lora["trainable_pct"] < 100 and lora["trainable_pct"] < cpt["trainable_pct"]
    assert lora["lora"] == {"dim": 8, "alpha": 16, "dropout": 0.0,
                            "targets": "linear_qkv,linear_proj,linear_fc1,linear_fc2"}
    assert [x["checkpoint"] for x in lora["lineage"]] == [str(infos["cpt"][0]), str(infos["import"][0])]

    merged = infos["hf-lora"][1]
    assert merged["exported_from"] == str(infos["lora"][0]) and merged["lora"] == lora["lora"]
    assert [x["model_type"] for x in merged["lineage"]] == ["LoRA", "CPT", "base"]


@pytest.mark.slow
def test_model_info_was_there_before_the_next_stage_loaded_the_checkpoint(tiny_chain):
    """NeMo restored (CPT, LoRA), merged and exported checkpoints that already had a model_info.json."""
    infos = chain_infos(tiny_chain)
    started = {s: (tiny_chain[s]["dir"] / "run.json").stat().st_mtime for s in ("cpt", "lora", "export")}
    assert (infos["import"][0] / "model_info.json").stat().st_mtime < started["cpt"]
    assert (infos["cpt"][0] / "model_info.json").stat().st_mtime < started["lora"]
    assert (infos["lora"][0] / "model_info.json").stat().st_mtime < started["export"]
    for stage in ("import", "cpt", "lora"):  # and before the run was marked complete
        marker = tiny_chain[stage]["dir"] / runs.MARKER
        assert (infos[stage][0] / "model_info.json").stat().st_mtime <= marker.stat().st_mtime


@pytest.mark.slow
def test_exported_dirs_list_model_info_in_their_checksums(tiny_chain):
    for kind in ("cpt", "lora"):
        d = tiny_chain["export"]["dir"] / tiny_chain["export"]["models"][kind]
        sums = dict(reversed(line.split("  ")) for line in (d / "SHA256SUMS").read_text().splitlines())
        assert sums["model_info.json"] == sha256_file(d / "model_info.json")
        assert "model_info.json" in (d / "README.md").read_text()


@pytest.mark.slow
def test_params_json_and_complete_json_carry_the_counts(tiny_chain):
    for stage, trainable in (("cpt", TINY_PARAMS), ("lora", tiny_lora_params())):
        run = tiny_chain[stage]
        params = json.loads((run["dir"] / "params.json").read_text())
        assert params["stage"] == stage and params["at_step"] == 0 and params["trainable"] == trainable
        assert (run["trainable_params"], run["total_params"], run["trainable_pct"]) == (
            params["trainable"], params["total"], params["trainable_pct"])
        assert run["steps"] == run["max_steps"] == 10 and run["stopped_early"] is False
        assert f"parameters ({stage}): {trainable:,} trainable of {params['total']:,}" in run["stderr"]
    assert "adapter" in "".join(json.loads((tiny_chain["lora"]["dir"] / "params.json").read_text())
                                ["trainable_by_name"])


@pytest.mark.slow
def test_grad_norm_every_step_in_metrics_and_tensorboard(tiny_chain):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for stage in ("cpt", "lora"):
        d = tiny_chain[stage]["dir"]
        recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in recs if "loss" in r]
        assert [r["step"] for r in steps] == list(range(1, 11))
        assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in steps), stage
        (events,) = (d / "tb_logs").rglob("events.out.tfevents.*")
        acc = EventAccumulator(str(events))
        acc.Reload()
        assert "grad_norm" in acc.Tags()["scalars"], stage
        assert len(acc.Scalars("grad_norm")) == 10
        wandb_files = list((d / "wandb").rglob("*.wandb"))  # offline wandb: the same keys, protobuf-encoded
        assert wandb_files and all(b"grad_norm" in f.read_bytes() for f in wandb_files), stage


@pytest.mark.slow
def test_recipes_carry_the_hygiene_callbacks(tiny_chain):
    cpt = (tiny_chain["cpt"]["dir"] / "recipe.yaml").read_text()
    lora = (tiny_chain["lora"]["dir"] / "recipe.yaml").read_text()
    for text in (cpt, lora):
        for cls in ("ParamCounter", "MetricsRecorder", "TrainingGuard"):
            assert f"_target_: jacpt.callbacks.{cls}" in text
        assert "explode_factor: 10.0" in text
    assert "EarlyStop" not in cpt  # off for CPT by default
    es = lora.split("_target_: jacpt.callbacks.EarlyStop", 1)[1].split("_target_", 1)[0]
    assert "patience: 2" in es and "min_delta: 0.0" in es and "max_steps: 10" in es
