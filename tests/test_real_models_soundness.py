"""Soundness on real programs (issue 9): what a user runs must give eager's answer, with the attention
fused. Tiny Hugging Face models built from configs (no weights downloaded), eager attention.

- ``generate``: greedy tokens of a tiny Llama (GQA) and a tiny GPT-2, static and dynamic KV caches,
  ``model.forward`` compiled, equal to eager's; the fused op counted during generation.
- Convergence (STYLE.md 10b): the same two models trained 30 steps with AdamW, eager vs compiled; the
  loss curves agree within fp32 noise, and fused forward and backward ops are counted on one step.
- Activation checkpointing: HF's ``activation_checkpointing_enable`` and a hand-written
  ``torch.utils.checkpoint`` around an attention; equal to eager and fused inside the checkpointed body
  (its recomputation in the backward included).
- Mutations next to an attention: a step counter, a cache written by ``index_copy_``, an input scaled in
  place after the attention; every mutated tensor equals eager's after the call.

Every test compares against eager run from the same seed and counts the fused ops (STYLE.md 9): a
rewrite that silently stops fusing passes a numbers-only test, and a numbers-only test of an unfused
graph compares eager with itself.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import fusion_pass

from helpers import max_rel_error, profiled_op_counts

transformers = pytest.importorskip("transformers")

VOCAB, LAYERS = 100, 2


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # conftest.py: Dynamo reset around each test


# ---- the models: one builder each, deterministic (same seed -> same weights) ----------------------

# Weights drawn with std 0.2, not HF's 0.02: at 0.02 the scores of a random tiny model are so small
# that its attention is nearly uniform, and neither its tokens nor its losses depend much on what the
# attention computes (greedy decoding repeats one token; a softmax scale wrong by 1% moved the 30-step
# loss curve by only 2.5e-5). At 0.2 that 1% moves it by 2.4e-3 and the tokens vary.
INIT_STD = 0.2


def tiny_llama():
    """Llama with grouped-query attention: 4 query heads share 2 key/value heads (repeat_kv)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=None, initializer_range=INIT_STD,
        attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2():
    """GPT-2: Conv1D projections, a float causal mask, learned positions; no dropout."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=64, n_layer=LAYERS, n_head=4, n_inner=128, vocab_size=VOCAB, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=None, initializer_range=INIT_STD,
        attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg)


MODELS = {"llama-gqa": tiny_llama, "gpt2": tiny_gpt2}


# ---- 1. generate: tokens equal to eager, static and dynamic caches ---------------------------------

PROMPT, NEW_TOKENS = 7, 8


def _left_padded_prompt():
    """A batch of two prompts, the second left-padded by 3 tokens, as batched generation pads: its
    padded query rows see no key at all in the prefill, and every decode step masks the padding."""
    ids = torch.randint(3, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, PROMPT, dtype=torch.long)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


# default run: Llama's static cache (the index_copy_ writes) and GPT-2's dynamic one; -m slow the rest
@pytest.mark.parametrize("name,cache", [
    ("llama-gqa", "static"), ("gpt2", "dynamic"),
    pytest.param("llama-gqa", "dynamic", marks=pytest.mark.slow),
    pytest.param("gpt2", "static", marks=pytest.mark.slow)])
def test_generate_tokens_equal_to_eager(name, cache):
    model = MODELS[name]().eval()
    ids, mask = _left_padded_prompt()
    options = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                   output_logits=True, return_dict_in_generate=True)
    if cache == "static":
        # transformers' StaticCache writes each step's keys and values with index_copy_ into
        # preallocated tensors and attends over the whole buffer: a rewrite that deletes or
        # reorders that write attends over zeros (issue 9, item 1)
        options["cache_implementation"] = "static"

    want = model.generate(ids, **options)

    # the decoding steps' one-row sites fused too (kept for Inductor by default, test below)
    model.forward = torch.compile(model.forward, backend=fusion_pass.Backend(fuse_cpu_decode=True))
    first = model.generate(ids, **options)  # compiles: prefill, then decode (maybe twice)
    got, n_fwd, n_bwd = profiled_op_counts(lambda: model.generate(ids, **options))

    # one forward per new token (the prefill makes the first), one attention per layer in each;
    # counted on the second generate so that calls made while compiling are not counted
    assert (n_fwd, n_bwd) == (NEW_TOKENS * LAYERS, 0), f"{n_fwd} fused calls in {NEW_TOKENS} steps"
    _assert_same_generation((first, got), want)


def _assert_same_generation(runs, want):
    for run in runs:
        # the tokens are what the user sees; the logits catch a wrong attention that happens not to
        # change an argmax, and say by how much
        same = torch.equal(run.sequences, want.sequences)
        err = max_rel_error(run.logits, want.logits)
        assert same and err < 1e-4, (
            f"tokens {'equal to' if same else 'differ from'} eager's, logits differ by {err:.2g} "
            f"(relative):\n{run.sequences}\n{want.sequences}")


@pytest.mark.parametrize("name", ["gpt2", pytest.param("llama-gqa", marks=pytest.mark.slow)])
def test_generate_keeps_cpu_decoding_steps_for_inductor(name):
    """By default a decoding step's sites (one query row on CPU) are kept, each saying why: the
    prefill's are fused, the tokens and logits are eager's, and ``strict`` accepts the kept ones."""
    model = MODELS[name]().eval()
    ids, mask = _left_padded_prompt()
    options = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                   output_logits=True, return_dict_in_generate=True)
    want = model.generate(ids, **options)
    model.forward = torch.compile(model.forward, backend=fusion_pass.Backend(strict=True))
    with fusion_pass.collect_reports() as reports:
        first = model.generate(ids, **options)
    got, n_fwd, n_bwd = profiled_op_counts(lambda: model.generate(ids, **options))
    assert (n_fwd, n_bwd) == (LAYERS, 0), f"{n_fwd} fused calls: the prefill's {LAYERS} only"
    sites = [s for r in reports for s in r.sites if s.attention_like]
    fused = [s for s in sites if s.fused]
    kept = [s for s in sites if s.kept]
    assert len(fused) == LAYERS and kept and len(fused) + len(kept) == len(sites), sites
    assert all("one query row on CPU" in s.reason for s in kept), [s.reason for s in kept]
    _assert_same_generation((first, got), want)


# ---- 2 and 3. convergence, with and without activation checkpointing -------------------------------

STEPS, BATCH, SEQ = 30, 2, 23


def _token_batches():
    """Four fixed batches of random tokens, cycled: the model memorises them, so the loss falls
    (from 5.9 to 0.9 for Llama, 5.5 to 1.3 for GPT-2) and every step's gradient depends on the previous updates."""
    return torch.randint(0, VOCAB, (4, BATCH, SEQ), generator=torch.Generator().manual_seed(2))


def _train(model, run, batches):
    """30 AdamW steps of next-token prediction: the loss of each step (float64) and the first
    step's parameter gradients."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(STEPS):
        ids = batches[step % len(batches)]
        loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            first_grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64), first_grads


def _enable_checkpointing(model):
    # transformers 5 renamed gradient_checkpointing_enable (now a deprecated alias); both default to
    # use_reentrant=False, which is what puts each layer into a tag_activation_checkpoint subgraph
    # under Dynamo; said explicitly so that a change of default cannot change what is tested
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    assert model.is_gradient_checkpointing


# Tolerance from measurement (fp32 noise, 2 threads): the same eager training with
# attn_implementation="sdpa" instead of "eager" (same math, another op order) differs from eager by
# at most 3.0e-7 relative per step (Llama; GPT-2 1.9e-7); fusion_pass today by 6.0e-7 (GPT-2 3.3e-7).
# 1e-4 is 170x that noise, and under a tenth of what a softmax scale wrong by 0.1% does (1.3e-3). AdamW makes
# the curve blind to an error that rescales a whole gradient uniformly, hence the gradient check too.
LOSS_RTOL = 1e-4


@pytest.mark.parametrize("name, checkpointing", [
    pytest.param("gpt2", False, id="gpt2-plain"),
    pytest.param("llama-gqa", False, id="llama-gqa-plain"),
    pytest.param("llama-gqa", True, id="llama-gqa-checkpointed"),
    # the slowest test of the file; llama-gqa covers HF checkpointing in a run without slow tests
    pytest.param("gpt2", True, id="gpt2-checkpointed", marks=pytest.mark.slow),
])
def test_training_converges_like_eager(name, checkpointing):
    batches = _token_batches()

    eager = MODELS[name]().train()
    if checkpointing:
        _enable_checkpointing(eager)
    want, want_grads = _train(eager, eager, batches)

    model = MODELS[name]().train()
    if checkpointing:
        _enable_checkpointing(model)
    compiled = torch.compile(model, backend="fusion_pass")
    got, grads = _train(model, compiled, batches)

    # a backward that is right once but wrong in accumulation, or a forward wrong only after the
    # weights move, shows here and not in a one-step gradient check
    assert want[-1] < want[0] - 1.0, f"eager did not learn: {want[0]:.3f} -> {want[-1]:.3f}"
    rel = ((got - want).abs() / want.abs()).max().item()
    assert rel < LOSS_RTOL, f"loss curves differ by {rel:.2g} (relative):\n{got}\n{want}"
    # the gradients of the first step, before the weights diverge by rounding. Not the weights after
    # 30 steps: GPT-2's key bias has a gradient that is zero up to rounding (a softmax ignores a
    # shift of its row), and AdamW divides it by its own magnitude, so that bias takes full
    # lr-sized steps in directions set by rounding noise, eager against eager as well
    err = max_rel_error(grads, want_grads)
    assert err < 1e-4, f"first-step gradients differ from eager's by {err:.2g} (relative)"

    # one more step, counted: a forward call per layer, a backward call per layer, and with
    # checkpointing the recomputation in the backward runs the fused forward once more per layer
    # (an attention left unfused inside the checkpointed body counts 0 here: issue 9, item 9)
    ids = batches[0]
    loss, n_fwd, n_bwd_in_fwd = profiled_op_counts(lambda: compiled(input_ids=ids, labels=ids).loss)
    _, n_recompute, n_bwd = profiled_op_counts(loss.backward)
    assert (n_fwd, n_bwd_in_fwd) == (LAYERS, 0), f"forward: {n_fwd} fused calls for {LAYERS} layers"
    assert n_bwd == LAYERS, f"backward: {n_bwd} fused calls for {LAYERS} layers"
    if checkpointing:
        assert n_recompute == LAYERS, f"recomputation: {n_recompute} fused calls for {LAYERS} layers"


class CheckpointedCausalAttention(nn.Module):
    """A residual causal self-attention whose body runs under torch.utils.checkpoint, as a user who
    checkpoints by hand writes it. Head dim 20 and 37 positions: no power of two (STYLE.md 11b)."""

    def __init__(self, dim=40, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def attention(self, x):
        b, n, dim = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(dim // self.heads)
        keep = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
        return self.out((scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, dim))

    def forward(self, x):
        return x + checkpoint(self.attention, x, use_reentrant=False)


def test_hand_written_checkpoint_fused_and_equal_to_eager():
    torch.manual_seed(0)
    model = CheckpointedCausalAttention()
    x = torch.randn(2, 37, 40, requires_grad=True)
    inputs = [x, *model.parameters()]
    want = model(x)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, inputs, g)

    compiled = torch.compile(model, backend="fusion_pass")
    torch.autograd.grad(compiled(x), inputs, g)  # compile
    got, n_fwd, _ = profiled_op_counts(lambda: compiled(x))
    grads, n_recompute, n_bwd = profiled_op_counts(lambda: torch.autograd.grad(got, inputs, g))

    assert max_rel_error([got], [want]) < 1e-5
    assert max_rel_error(grads, want_grads) < 1e-5
    # the attention lives in the tag_activation_checkpoint body; a pass that walks only the top-level
    # graph counts 0 everywhere here (issue 9, item 9)
    assert (n_fwd, n_recompute, n_bwd) == (1, 1, 1), (
        f"{n_fwd} forward, {n_recompute} recomputed, {n_bwd} backward fused calls; want 1, 1, 1")


# ---- 4. mutations next to an attention -------------------------------------------------------------

class AttentionWithSideEffects(nn.Module):
    """An attention over a key/value cache, surrounded by the side effects real models have: a step
    counter, cache writes with index_copy_ (what a static KV cache does), and an input scaled in place
    after the attention has read it. None of their results is used, so a dead-code elimination that
    takes an in-place method call for pure deletes them (issue 9, item 1); a rewrite that moves
    v.mul_(2) above the cache write doubles the cached values and the output instead."""

    def __init__(self, batch=2, heads=2, max_len=19, head_dim=20):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("k_cache", torch.zeros(batch, heads, max_len, head_dim))
        self.register_buffer("v_cache", torch.zeros(batch, heads, max_len, head_dim))

    def forward(self, q, k, v, positions):
        self.calls.add_(1)
        self.k_cache.index_copy_(2, positions, k)
        self.v_cache.index_copy_(2, positions, v)
        # attends over the whole cache, as StaticCache does: slots not yet written hold zeros
        scores = q @ self.k_cache.transpose(-1, -2) / math.sqrt(q.shape[-1])
        out = scores.softmax(dim=-1) @ self.v_cache
        v.mul_(2)
        return out


def test_mutations_next_to_attention_kept():
    torch.manual_seed(0)
    eager = AttentionWithSideEffects()
    model = AttentionWithSideEffects()
    # 5 query rows against a 20-slot cache, no gradient: kept for Inductor by default (a few
    # decoding rows); fused here, where the fused op beside the mutations is under test
    compiled = torch.compile(model, backend=fusion_pass.Backend(fuse_cpu_decode=True))
    # two calls: the second writes other positions and sees the first call's writes in the cache
    calls = [(torch.randn(2, 2, 5, 20), torch.randn(2, 2, 5, 20), torch.randn(2, 2, 5, 20),
              torch.arange(0, 5)),
             (torch.randn(2, 2, 5, 20), torch.randn(2, 2, 5, 20), torch.randn(2, 2, 5, 20),
              torch.arange(5, 10))]
    for step, (q, k, v, positions) in enumerate(calls):
        v_eager = v.clone()
        want = eager(q, k, v_eager, positions)
        got, n_fwd, _ = profiled_op_counts(lambda: compiled(q, k, v, positions))
        if step:  # the first call compiles; counted from the second
            assert n_fwd == 1, f"{n_fwd} fused calls for 1 attention"
        mutated = {"calls": (model.calls, eager.calls), "k_cache": (model.k_cache, eager.k_cache),
                   "v_cache": (model.v_cache, eager.v_cache), "v (input)": (v, v_eager)}
        wrong = [name for name, (a, b) in mutated.items() if not torch.equal(a, b)]
        assert not wrong, f"call {step + 1}: mutated tensors differ from eager's: {wrong}"
        assert max_rel_error([got], [want]) < 1e-5, f"call {step + 1}: output differs from eager's"
