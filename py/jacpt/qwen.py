"""Qwen2.5 as it is: tied input/output embeddings from HF to NeMo and back.

NeMo 2.3's Qwen2 connectors untie the embeddings (nemo/collections/llm/gpt/model/qwen2.py:282
`share_embeddings_and_output_weights=False`, :227 maps `lm_head.weight` to a separate
`output_layer.weight`, :394 exports `tie_word_embeddings=False`): Qwen2.5-0.5B would train
630M parameters instead of 494M and hand off a different architecture. The connectors
below replace NeMo's for `llm.Qwen2Model` and "hf": the tie follows the HF config, the
mappings drop the separate output layer when tied, and everything else is NeMo's own
conversion (same class, same key mapping and transforms), so checkpoints stay loadable
by stock NeMo code. Importing this module registers them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch
from nemo.collections import llm
from nemo.collections.llm.gpt.model import qwen2 as nemo_qwen2
from nemo.lightning import io

from jacpt import nemo_compat


# What the last import in this process produced (the import stage records it in its run dir).
LAST_IMPORT: dict = {}


@contextlib.contextmanager
def _edited_transforms(*, drop_sources: set[str] = frozenset(), drop_targets: set[str] = frozenset(),
                       ignore_target_entries: tuple[str, ...] = (), local_norms_in=None) -> Iterator[None]:
    """Run NeMo's connector with its mapping edited, by wrapping `io.apply_transforms` for the duration.

    NeMo's connectors build their mapping inside `convert_state` and pass it straight to
    `io.apply_transforms`; editing it there keeps the rest of NeMo's conversion as is.
    """
    orig = io.apply_transforms

    def apply_transforms(source, target, mapping, transforms=(), state_dict_ignored_entries=()):
        mapping = {s: t for s, t in mapping.items() if s not in drop_sources and t not in drop_targets}
        transforms = [t for t in transforms
                      if not (set(_as_tuple(t.source_key)) & drop_sources or set(_as_tuple(t.target_key)) & drop_targets)]
        if local_norms_in is not None:
            nemo = target if local_norms_in == "target" else source
            mapping = nemo_compat.local_norm_mapping(mapping, _module(nemo).state_dict().keys())
            nemo_compat.match_local_norm_dtype(_module(nemo))
        return orig(source, target, mapping=mapping, transforms=list(transforms),
                    state_dict_ignored_entries=list(state_dict_ignored_entries) + list(ignore_target_entries))

    io.apply_transforms = apply_transforms
    try:
        yield
    finally:
        io.apply_transforms = orig


def _as_tuple(key) -> tuple:
    return key if isinstance(key, tuple) else (key,)


def _module(m):
    return getattr(m, "module", m)


@io.model_importer(llm.Qwen2Model, "hf")
class HFQwen2TiedImporter(nemo_qwen2.HFQwen2Importer):
    """NeMo's Qwen2 importer, with the embedding tie taken from the HF config."""

    @property
    def config(self) -> llm.Qwen2Config:
        from transformers import AutoConfig

        tied = bool(AutoConfig.from_pretrained(str(self)).tie_word_embeddings)
        # replace(), not setattr: NeMo serialises a config from its __init__ arguments.
        return dataclasses.replace(super().config, share_embeddings_and_output_weights=tied,
                                   **nemo_compat.no_te_model_overrides())

    def convert_state(self, source, target):
        from jacpt.callbacks import param_fingerprint

        tied = target.config.share_embeddings_and_output_weights
        with _edited_transforms(drop_sources={"lm_head.weight"} if tied else set(), local_norms_in="target"):
            out = super().convert_state(source, target)
        LAST_IMPORT.update(param_fingerprint=param_fingerprint(target.named_parameters()),
                           params=param_count(target), tied=tied)
        return out


@io.model_exporter(llm.Qwen2Model, "hf")
class HFQwen2TiedExporter(nemo_qwen2.HFQwen2Exporter):
    """NeMo's Qwen2 exporter, writing a tied `lm_head` when the NeMo model is tied."""

    def _tied(self) -> bool:
        return bool(io.load_context(str(self)).model.config.share_embeddings_and_output_weights)

    @property
    def config(self):
        cfg = super().config  # a transformers config: plain attributes
        cfg.tie_word_embeddings = self._tied()
        cfg.use_sliding_window, cfg.sliding_window = False, None
        return cfg

    def convert_state(self, source, target):
        tied = self._tied()
        with _edited_transforms(drop_sources={"output_layer.weight"} if tied else set(),
                                ignore_target_entries=("lm_head.weight",) if tied else (),
                                local_norms_in="source"):
            target = super().convert_state(source, target)
        if tied:
            target.tie_weights()  # apply_transforms re-registered embed_tokens; point lm_head at it again
        return target


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
