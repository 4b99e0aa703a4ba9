"""Task functions the NeMo-Run recipes call inside the launched process (a fresh interpreter).

They apply the kit's compatibility layer there, where it is needed (it is a no-op in the NeMo
container), route the loss through chunks when `loss_chunk_tokens` > 0 (jacpt/chunked_loss.py), compute
SwiGLU in one kernel each way while training when `fused_swiglu` (jacpt/swiglu.py), fuse LoRA's update into
the matmuls when `fused_lora_update` (jacpt/lora_update.py), keep Megatron-Core 0.12's optimizer from counting
gradient zeros nobody asked for unless `megatron_zero_count` (jacpt/optim_steps.py), then hand over to NeMo's
own `llm.pretrain` / `llm.finetune`.
"""

from __future__ import annotations


def _prepare(loss_chunk_tokens: int, fused_swiglu: bool = False, fused_lora_update: bool = False,
             megatron_zero_count: bool = False) -> None:
    from jacpt import chunked_loss, log, lora_update, nemo_compat, optim_steps, swiglu

    nemo_compat.apply()
    if not megatron_zero_count and optim_steps.fix_zero_count():
        log(optim_steps.ZERO_COUNT_NOTE)
    if chunked_loss.install(loss_chunk_tokens):
        log(f"output layer + cross entropy in chunks of {loss_chunk_tokens} tokens")
    if fused_swiglu:
        swiglu.install()
        log("SwiGLU fused into one kernel each way while training")
    if fused_lora_update:
        lora_update.install()
        log("LoRA layers and their adapters' updates in fused matmuls")


def pretrain(model, data, trainer, log=None, resume=None, optim=None, loss_chunk_tokens: int = 0,
             fused_swiglu: bool = False, megatron_zero_count: bool = False):
    _prepare(loss_chunk_tokens, fused_swiglu, megatron_zero_count=megatron_zero_count)
    from nemo.collections import llm

    return llm.pretrain(model=model, data=data, trainer=trainer, log=log, resume=resume, optim=optim)


def finetune(model, data, trainer, log=None, resume=None, optim=None, peft=None, loss_chunk_tokens: int = 0,
             fused_swiglu: bool = False, fused_lora_update: bool = False, megatron_zero_count: bool = False):
    _prepare(loss_chunk_tokens, fused_swiglu, fused_lora_update, megatron_zero_count)
    from nemo.collections import llm

    return llm.finetune(model=model, data=data, trainer=trainer, log=log, resume=resume, optim=optim, peft=peft)
