"""Task functions the NeMo-Run recipes call inside the launched process (a fresh interpreter).

They apply the kit's compatibility layer there, where it is needed (it is a no-op in the NeMo
container), then hand over to NeMo's own `llm.pretrain` / `llm.finetune`.
"""

from __future__ import annotations


def pretrain(model, data, trainer, log=None, resume=None, optim=None):
    from jacpt import nemo_compat

    nemo_compat.apply()
    from nemo.collections import llm

    return llm.pretrain(model=model, data=data, trainer=trainer, log=log, resume=resume, optim=optim)


def finetune(model, data, trainer, log=None, resume=None, optim=None, peft=None):
    from jacpt import nemo_compat

    nemo_compat.apply()
    from nemo.collections import llm

    return llm.finetune(model=model, data=data, trainer=trainer, log=log, resume=resume, optim=optim, peft=peft)
