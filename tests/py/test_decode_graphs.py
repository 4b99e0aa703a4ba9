"""Generation's decode step on fixed buffers (nemo_compat.DecodeGraphs) against Megatron-Core's own decode step.

A 2-layer tied GPTModel with RoPE and grouped queries (local spec with the kit's SDPA attention) generates
greedily through Megatron-Core's GPT inference wrapper, step by step as its text-generation controller
drives it: a prefill, then one token per sequence. Once through the wrapper's own step, once with
DecodeGraphs installed over it; every step's logits must agree to fp32 rounding. On the CPU the fixed-buffer
step runs eagerly; on a GPU it is captured as a CUDA graph and replayed.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from jacpt import nemo_compat  # noqa: E402

VOCAB, PROMPT, NEW, BATCH = 301, 7, 9, 3


def _wrapper(device: str, **overrides):
    nemo_compat.apply()
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=128, use_cpu_initialization=True, masked_softmax_fusion=False,
                            bias_activation_fusion=False, gated_linear_unit=True, normalization="RMSNorm",
                            add_bias_linear=False, add_qkv_bias=True, hidden_dropout=0.0, attention_dropout=0.0,
                            init_method_std=0.2, **overrides)  # sharp logits: greedy choices far from ties
    model = GPTModel(cfg, get_gpt_layer_local_spec(normalization="RMSNorm"), VOCAB, PROMPT + NEW,
                     share_embeddings_and_output_weights=True, position_embedding_type="rope",
                     rotary_base=1000000).to(device)
    icfg = InferenceWrapperConfig(hidden_size=64, params_dtype=torch.float32, inference_batch_times_seqlen_threshold=-1,
                                  padded_vocab_size=VOCAB, inference_max_requests=BATCH,
                                  inference_max_seq_length=PROMPT + NEW)
    return GPTInferenceWrapper(model, icfg)


LENGTHS = (PROMPT, PROMPT - 3, PROMPT - 1)  # prompt lengths of the batch's rows: the shortest one starts the steps
STEPS = PROMPT + NEW - min(LENGTHS)


def _generate(wrapper, prompts):
    """Megatron-Core's static-batch loop (text_generation_controller.py:495-634), greedy; each step's logits.

    The prefill reads the shortest prompt's length; the next steps read the longer prompts on, one token a
    step, while the shorter ones already generate; "decode mode" begins once every row generates. After the
    prefill, the cache past it is filled with NaN: Megatron-Core allocates it with torch.empty, so it may hold
    anything, and Megatron-Core's own step never reads it."""
    ctx = wrapper.inference_context
    ctx.key_value_memory_dict = {}
    wrapper.prep_model_for_inference()
    tokens = torch.zeros(BATCH, PROMPT + NEW, dtype=torch.long, device=prompts.device)
    tokens[:, :PROMPT] = prompts
    lengths = torch.tensor(LENGTHS, device=prompts.device)
    inputs = wrapper.prep_inference_input(tokens)
    steps, start = [], 0
    with torch.no_grad():
        for end in range(min(LENGTHS), PROMPT + NEW):
            logits = wrapper.run_one_forward_step(wrapper.get_batch_for_context_window(inputs, start, end))
            last = logits[:, -1, :].clone()
            steps.append(last)
            started = lengths <= end
            tokens[started, end] = last.argmax(-1)[started]
            if start == 0:
                for key, value in ctx.key_value_memory_dict.values():
                    key[end:].fill_(float("nan"))
                    value[end:].fill_(float("nan"))
            start = end
            if bool(started.all()):
                ctx.enable_decode_mode()
    return steps, tokens.clone()


def _prompts(device: str, seed: int):
    return torch.randint(0, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(seed)).to(device)


def _compare(device: str, capture: bool, **overrides):
    """Megatron-Core's steps, then the same generations through DecodeGraphs; asserts they agree. Returns the
    DecodeGraphs and, per forward pass of the second run, whether it ran as the fixed-shape step and the
    lengths of the tensors Megatron-Core's RoPE function rotated in it."""
    import megatron.core.models.common.embeddings.rope_utils as rope_utils

    wrapper = _wrapper(device, **overrides)
    ref = [_generate(wrapper, _prompts(device, s)) for s in (1, 2)]
    stock, rope = wrapper.run_one_forward_step, rope_utils._apply_rotary_pos_emb_bshd
    graphs = nemo_compat.DecodeGraphs(wrapper, capture=capture)
    wrapper.run_one_forward_step = graphs
    passes = []  # per forward pass: (fixed step?, lengths rotated by Megatron-Core's RoPE)
    forward, ctx = wrapper._forward, wrapper.inference_context

    def spy(t, *args, **kwargs):
        passes[-1][1].append(t.size(0))
        return rope(t, *args, **kwargs)

    wrapper._forward = lambda inputs: passes.append((hasattr(ctx, nemo_compat.DECODE_STEP), [])) or forward(inputs)
    rope_utils._apply_rotary_pos_emb_bshd = spy
    try:
        got = [_generate(wrapper, _prompts(device, s)) for s in (1, 2)]
    finally:
        wrapper.run_one_forward_step, rope_utils._apply_rotary_pos_emb_bshd = stock, rope
        del wrapper._forward
    # Per generation: the prefill through Megatron-Core's step, then every step (also those still reading the
    # longer prompts) as the fixed step: run each time on the CPU, warmed up and captured once on a GPU.
    per_generation = [False] + [True] * (2 if capture else STEPS - 1)
    assert [fixed for fixed, _ in passes] == per_generation * 2 and not hasattr(ctx, nemo_compat.DECODE_STEP)
    for (ref_steps, ref_tokens), (steps, tokens) in zip(ref, got):
        assert len(steps) == len(ref_steps) == STEPS
        for i, (a, b) in enumerate(zip(steps, ref_steps)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, i=i: f"step {i}: {m}")
        assert torch.equal(tokens, ref_tokens)
    assert not torch.equal(ref[0][1], ref[1][1])  # two prompts, two different continuations
    return graphs, passes


def test_fixed_buffer_decode_step_gives_megatrons_logits(megatron_tp1, no_cuda_rng):
    graphs, passes = _compare("cpu", capture=False)
    assert graphs.captures == 0 and graphs.graph is None
    # Megatron-Core's RoPE rotates query and key of each of the 2 layers in the prefill (the shortest prompt),
    # then only the prefill's cached keys once, at the first fixed step; the fixed steps rotate the new
    # token's query and key themselves and never the cache again.
    prefill = min(LENGTHS)
    assert [rows for _, rows in passes] == ([[prefill] * 4, [prefill] * 2] + [[]] * (STEPS - 2)) * 2


def test_fixed_step_with_interleaved_rotary_embedding_gives_megatrons_logits(megatron_tp1, no_cuda_rng):
    """A RoPE variant the fixed step does not compute itself goes through Megatron-Core's function, a row at a time."""
    _, passes = _compare("cpu", capture=False, rotary_interleaved=True)
    assert [rows for _, rows in passes][2:STEPS] == [[1] * 4] * (STEPS - 2)  # query and key, 2 layers, 1 position


def test_a_longer_step_after_the_fixed_steps_began_is_refused(megatron_tp1, no_cuda_rng):
    wrapper = _wrapper("cpu")
    graphs = nemo_compat.DecodeGraphs(wrapper, capture=False)
    wrapper.run_one_forward_step = graphs
    ctx = wrapper.inference_context
    ctx.key_value_memory_dict = {}
    wrapper.prep_model_for_inference()
    tokens = torch.zeros(1, PROMPT + NEW, dtype=torch.long)
    inputs = wrapper.prep_inference_input(tokens)
    with torch.no_grad():
        graphs(wrapper.get_batch_for_context_window(inputs, 0, PROMPT - 2))
        graphs(wrapper.get_batch_for_context_window(inputs, PROMPT - 2, PROMPT - 1))
        with pytest.raises(RuntimeError, match="more than one token per sequence after the fixed steps began"):
            graphs(wrapper.get_batch_for_context_window(inputs, PROMPT - 1, PROMPT + 1))


def test_marker_free_decode_is_megatrons_own_code(megatron_tp1, no_cuda_rng, monkeypatch):
    """The patched key/value step defers to Megatron-Core unless a context carries the device position."""
    from megatron.core.transformer.attention import Attention

    nemo_compat.apply()
    patched = Attention._adjust_key_value_for_inference
    assert getattr(patched, "_jacpt", False)
    wrapper = _wrapper("cpu")
    steps, tokens = _generate(wrapper, _prompts("cpu", 1))
    assert not hasattr(wrapper.inference_context, nemo_compat.DECODE_STEP)
    monkeypatch.setattr(Attention, "_adjust_key_value_for_inference", patched.__wrapped__)  # Megatron-Core's own
    ref_steps, ref_tokens = _generate(wrapper, _prompts("cpu", 1))
    for a, b in zip(steps, ref_steps):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(tokens, ref_tokens)


def test_decode_switch_is_checked_and_eager_leaves_the_wrapper_alone(megatron_tp1, no_cuda_rng, monkeypatch):
    wrapper = _wrapper("cpu")
    monkeypatch.setenv(nemo_compat.DECODE_ENV, "fast")
    with pytest.raises(ValueError, match="JACPT_NO_TE_DECODE='fast': use 'graph' .* or 'eager'"):
        nemo_compat.decode_graphs(wrapper)
    monkeypatch.delenv(nemo_compat.DECODE_ENV)
    installed = lambda: isinstance(vars(wrapper).get("run_one_forward_step"), nemo_compat.DecodeGraphs)  # noqa: E731
    assert nemo_compat.decode_graphs(wrapper) is False and not installed()  # no CUDA: nothing to capture with
    # As on a GPU (installing captures nothing yet): eager leaves Megatron-Core's step; the default installs.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(nemo_compat.DECODE_ENV, "eager")
    assert nemo_compat.decode_graphs(wrapper) is False and not installed()
    monkeypatch.delenv(nemo_compat.DECODE_ENV)
    with monkeypatch.context() as m:  # Megatron-Core's attention (JACPT_NO_TE_ATTENTION=local) takes no mask
        m.setattr(nemo_compat, "APPLIED", [n for n in nemo_compat.APPLIED if n != nemo_compat.SDPA_NOTE])
        assert nemo_compat.decode_graphs(wrapper) is False and not installed()
    assert nemo_compat.decode_graphs(wrapper) is True and installed()


@pytest.mark.gpu
def test_decode_step_replayed_from_a_cuda_graph_gives_megatrons_logits(megatron_tp1):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    # fp32 arithmetic on both sides, whatever an earlier test or import switched on.
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        graphs, _ = _compare("cuda", capture=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert graphs.captures == 2  # one per generation: each new generation captures its own step again
