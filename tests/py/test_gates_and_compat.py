"""The training gates and the compatibility layer, without training anything."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

from jacpt import callbacks, nemo_compat, train
from jacpt.callbacks import GateError


class Tiny(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))


def trainer(step: int = 0):
    return types.SimpleNamespace(global_step=step)


def test_fingerprint_ignores_wrappers_and_precision_but_not_values():
    a, b = Tiny(0), Tiny(0)
    assert callbacks.param_fingerprint(a.named_parameters()) == callbacks.param_fingerprint(
        [("module." + n, p) for n, p in b.named_parameters()])  # DDP/Float16Module prefixes
    bf = [(n, p.detach().to(torch.bfloat16)) for n, p in a.named_parameters()]
    fp = [(n, p.to(torch.float32)) for n, p in bf]
    assert callbacks.param_fingerprint(bf) == callbacks.param_fingerprint(fp)  # bf16 restored into fp32
    assert callbacks.param_fingerprint(Tiny(1).named_parameters()) != callbacks.param_fingerprint(a.named_parameters())


def test_restore_gate_stops_a_model_that_was_not_restored():
    expected = callbacks.param_fingerprint(Tiny(0).named_parameters())
    callbacks.RestoreGate(expected, "import").on_train_start(trainer(0), Tiny(0))  # restored: passes
    with pytest.raises(GateError, match="not those of import"):
        callbacks.RestoreGate(expected, "import").on_train_start(trainer(0), Tiny(1))
    callbacks.RestoreGate(expected, "import").on_train_start(trainer(5), Tiny(1))  # resumed run: own weights


@pytest.mark.parametrize("loss, ok", [(2.7, True), (11.9, False), (float("nan"), False)])
def test_loss_gate_on_the_first_step(loss, ok):
    gate = callbacks.LossGate(6.0)
    call = lambda: gate.on_train_batch_end(trainer(1), None, torch.tensor(loss), None, 0)  # noqa: E731
    if ok:
        call()
    else:
        with pytest.raises(GateError, match="loss gate: the first step's loss"):
            call()


def test_loss_gate_checks_only_the_first_step_and_can_be_off():
    gate = callbacks.LossGate(6.0)
    gate.on_train_batch_end(trainer(1), None, torch.tensor(3.0), None, 0)
    gate.on_train_batch_end(trainer(2), None, torch.tensor(50.0), None, 0)  # later spikes are not its job
    callbacks.LossGate(0).on_train_batch_end(trainer(1), None, torch.tensor(11.9), None, 0)


@pytest.mark.parametrize("n_val, gbs, ok", [(8, 32, False), (8, 8, True), (200, 32, True), (31, 32, False), (0, 4, False)])
def test_lora_validation_gate_needs_one_global_batch_of_examples(n_val, gbs, ok):
    # NeMo validates in whole global batches: fewer examples than one means no val_loss and no checkpoint
    # (seen with the sample corpus under a real profile's global batch of 32).
    manifest = {"lora": {"dir_path": "/d/lora", "examples": {"training.jsonl": 144, "validation.jsonl": n_val}}}
    if ok:
        train.lora_validation_gate(manifest, gbs)
        return
    with pytest.raises(train.StageError) as e:
        train.lora_validation_gate(manifest, gbs)
    msg = str(e.value)
    assert f"/d/lora/validation.jsonl) has {n_val} examples" in msg and f"lora.global_batch_size={gbs}" in msg
    assert "more validation examples" in msg
    if n_val == 0:  # no global batch can be filled: only more examples help
        assert "OVERRIDES" not in msg
        return
    suggested = int(msg.split('OVERRIDES="lora.global_batch_size=')[1].split('"')[0])
    assert suggested <= n_val and gbs % suggested == 0


def test_lora_validation_gate_suggests_a_micro_batch_that_divides_the_smaller_global_batch():
    manifest = {"lora": {"dir_path": "/d/lora", "examples": {"training.jsonl": 144, "validation.jsonl": 12}}}
    with pytest.raises(train.StageError, match=r'OVERRIDES="lora.global_batch_size=8 lora.micro_batch_size=8"'):
        train.lora_validation_gate(manifest, 32, micro_batch_size=32)  # a profile's one micro-batch a step
    with pytest.raises(train.StageError, match=r'OVERRIDES="lora.global_batch_size=8"'):
        train.lora_validation_gate(manifest, 32, micro_batch_size=4)  # 4 divides 8: the micro-batch can stay


def test_tokenizer_gate_names_both_sides():
    manifest = {"tokenizer": {"dir": "/data/tok", "fingerprint": "a" * 64}}
    train.tokenizer_gate(manifest, "a" * 64, "the import")
    with pytest.raises(train.StageError, match="tokenizer mismatch: the data was tokenised with /data/tok"):
        train.tokenizer_gate(manifest, "b" * 64, "the import")


INERT = """
import torch, torch.distributed.checkpoint.filesystem as tfs
from jacpt import nemo_compat as c
c.need_cpu = lambda: False
c.need_no_te = lambda: False
c._torch_needs_write_item_binding = lambda: False
c._numpy_lacks_product = lambda: False
before = (torch.cuda.synchronize, torch.tensor, torch.Tensor.to, torch.Tensor.cuda, tfs._write_item)
assert c.apply() == [], c.APPLIED
assert before == (torch.cuda.synchronize, torch.tensor, torch.Tensor.to, torch.Tensor.cuda, tfs._write_item)
assert c.no_te_model_overrides() == {} and c.no_te_optimizer_overrides() == {} and c.cpu_trainer_overrides() == {}
print("INERT")
"""


def test_compat_layer_is_inert_with_cuda_and_te():
    """What the NeMo container looks like (CUDA, TE, torch < 2.8): nothing is patched or overridden."""
    out = subprocess.run([sys.executable, "-c", INERT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "INERT" in out.stdout, out.stderr[-2000:]


def test_compat_conditions_here_are_cpu_and_no_te():
    cond = nemo_compat.conditions()
    assert cond["cpu"] is (not torch.cuda.is_available())
    assert cond["no_te"] is True  # no Transformer Engine in the CPU venv


def test_local_norm_mapping_only_for_local_spec():
    mapping = {"model.layers.*.input_layernorm.weight": "decoder.layers.*.self_attention.linear_qkv.layer_norm_weight",
               "model.norm.weight": "decoder.final_layernorm.weight"}
    te_keys = ["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"]
    local_keys = ["decoder.layers.0.input_layernorm.weight", "decoder.layers.0.pre_mlp_layernorm.weight"]
    assert nemo_compat.local_norm_mapping(mapping, te_keys) == mapping
    local = nemo_compat.local_norm_mapping(mapping, local_keys)
    assert local["model.layers.*.input_layernorm.weight"] == "decoder.layers.*.input_layernorm.weight"
    assert local["model.norm.weight"] == "decoder.final_layernorm.weight"
