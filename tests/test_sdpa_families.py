"""The families of ``test_families.py`` built as a user builds them, with **no** ``attn_implementation``
argument (issue 14): transformers then gives every family that supports it
``scaled_dot_product_attention`` calls, and the rest eager attention (which ``test_families.py``
already covers). Each SDPA family is compiled with ``strict=True``, so an SDPA site neither taken nor
reported as kept (already optimal) fails the compile; the taken sites are counted with the profiler,
forward and backward; outputs and every parameter gradient equal the uncompiled model's (its own
SDPA) in training mode with left padding, and outputs in inference.

Also ``generate`` (greedy, left-padded batch of two, static and dynamic caches) on default Llama,
Mistral (sliding window shorter than the sequence) and Qwen2: tokens equal to the uncompiled model's.

The default run covers a cheap subset (see ``INFERENCE`` and ``TRAINING``); ``-m slow`` runs every
family.
"""
from __future__ import annotations

import pytest
import torch

import fusion_pass

import test_families as fam
from helpers import max_rel_error, profiled_op_counts

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # conftest.py: Dynamo reset around each test

# name -> (taken, kept) SDPA sites per forward, with transformers 5.24. Taken: the mask is proven a
# predicate (causal / window with padding). Kept: SDPA already runs its best kernel (no mask,
# is_causal alone, or a mask that is data: T5's and Swin's position biases, Falcon's ALiBi built
# from the padding's cumsum).
SDPA_SITES = {
    "gpt2": (2, 0),
    "bert": (2, 0),          # (B, 1, 1, N) padding mask read per key
    "vit": (0, 2),           # no mask
    "llama-gqa": (2, 0),
    "llama-mqa": (2, 0),
    "mistral": (2, 0),       # sliding window 5 < 12 tokens, and padding
    "gpt-neox": (2, 0),
    "granite": (2, 0),
    "t5": (2, 4),            # self-attention carries the relative-position bias (data)
    "whisper": (0, 6),       # no padding mask: encoder and cross unmasked, decoder is_causal
    "bart": (4, 2),          # decoder self-attention is_causal alone (no decoder mask given)
    "pegasus": (4, 2),
    "clip-vision": (0, 2),
    "swin": (0, 4),          # relative-position bias and shifted-window mask: data
    "falcon-mqa": (2, 0),    # one K/V head that SDPA broadcasts over the query heads
    "falcon-alibi": (0, 2),  # ALiBi added into the mask: data
    "qwen2": (2, 0),
    "phi3": (2, 0),
    "opt": (2, 0),
    "qwen3": (2, 0),
    "gemma3": (2, 0),        # a sliding layer (window 5) and a global one
    "gptj": (2, 0),
    "gpt-bigcode": (2, 0),
    "m2m100": (4, 2),        # as BART: decoder self-attention is_causal alone
}
# name -> SDPA sites kept by default in inference on CPU as a few query rows (the decoder's
# cross-attention, in both layers) against more keys: see
# backend._decode_kept. They are fused with ``fuse_cpu_decode=True``, as in training.
FEW_ROWS_KEPT = {"bart": 2, "pegasus": 2, "t5": 2, "m2m100": 2}
# families whose model class has no SDPA implementation in transformers 5.24: the default is eager
# attention there, tested by test_families.py
EAGER_BY_DEFAULT = ["gemma2", "bloom", "gpt-neo", "mpt", "deberta-v2"]



def _params(quick):
    """Every SDPA family; those not in ``quick`` marked slow."""
    return [pytest.param(name, id=name, marks=[] if name in quick else [pytest.mark.slow])
            for name in SDPA_SITES]


# the default run: a taken window (Mistral), kept encoders (ViT), multi-query by broadcasting
# (Falcon), and an encoder-decoder with taken and kept sites (BART) trained; -m slow runs the rest
INFERENCE = _params({"mistral", "vit", "falcon-mqa"})
TRAINING = _params({"mistral", "bart"})


def _build_default(name, monkeypatch):
    """The family's model from its config with nothing said about attention: transformers' default."""
    monkeypatch.setattr(fam, "_eager", lambda cfg: cfg)
    torch.manual_seed(0)
    return fam.FAMILIES[name][0]()


def test_every_family_is_covered_with_its_default_attention(monkeypatch):
    assert set(SDPA_SITES) | set(EAGER_BY_DEFAULT) == set(fam.FAMILIES)
    for name in fam.FAMILIES:
        model, _ = _build_default(name, monkeypatch)
        want = "eager" if name in EAGER_BY_DEFAULT else "sdpa"
        assert model.config._attn_implementation == want, (name, model.config._attn_implementation)


def _statuses(expl):
    sites = [s for s in expl.sites if s.attention_like]
    return (sum(s.fused for s in sites), sum(s.kept for s in sites),
            [str(s) for s in sites if not (s.fused or s.kept)])


@pytest.mark.parametrize("name", INFERENCE)
def test_default_attention_inference_equal_to_uncompiled(name, monkeypatch):
    model, inputs = _build_default(name, monkeypatch)
    model.eval()
    taken, kept = SDPA_SITES[name]
    with torch.no_grad():
        # by default, sites of a few query rows against more keys (the decoder's 7 rows
        # cross-attending to 12 encoder keys) stay SDPA's call on CPU in inference; the rest as in
        # training
        default = fusion_pass.explain(model, **inputs)
        few = [s for s in default.sites if s.attention_like and s.kept and "7 query rows against "
               "12 keys on CPU with no gradient" in s.reason]
        assert len(few) == FEW_ROWS_KEPT.get(name, 0), str(default)
        assert _statuses(default) == (taken - len(few), kept + len(few), []), str(default)
        # the fused op is what is under test: the option takes those sites too
        with fusion_pass.configure(fuse_cpu_decode=True):
            expl = fusion_pass.explain(model, **inputs)
        assert _statuses(expl) == (taken, kept, []), str(expl)
        want = fam._output(model(**inputs))
        compiled = torch.compile(model, backend=fusion_pass.Backend(strict=True, fuse_cpu_decode=True))
        compiled(**inputs)  # compile
        got, n_fwd, _ = profiled_op_counts(lambda: fam._output(compiled(**inputs)))
    assert n_fwd == taken
    assert max_rel_error([got], [want]) < 1e-4


@pytest.mark.parametrize("name", TRAINING)
def test_default_attention_training_equal_to_uncompiled(name, monkeypatch):
    model, inputs = _build_default(name, monkeypatch)
    model.train()  # every dropout probability is 0: training is deterministic
    taken, kept = SDPA_SITES[name]
    expl = fusion_pass.explain(model, **inputs)
    assert _statuses(expl) == (taken, kept, []), str(expl)
    params = [p for p in model.parameters() if p.requires_grad]
    want = fam._output(model(**inputs))
    g = torch.randn_like(want)  # padded query rows included (they see no key: SDPA gives zeros)
    want_grads = torch.autograd.grad(want, params, g, allow_unused=True)

    compiled = torch.compile(model, backend=fusion_pass.Backend(strict=True))
    torch.autograd.grad(fam._output(compiled(**inputs)), params, g, allow_unused=True)  # compile
    got, n_fwd, _ = profiled_op_counts(lambda: fam._output(compiled(**inputs)))
    grads, _, n_bwd = profiled_op_counts(lambda: torch.autograd.grad(got, params, g, allow_unused=True))
    assert (n_fwd, n_bwd) == (taken, taken), f"{n_fwd} forward, {n_bwd} backward for {taken} sites"
    assert max_rel_error([got], [want]) < 1e-4
    assert max_rel_error(grads, want_grads) < 1e-4


# ---- generate with the default attention -----------------------------------------------------------

VOCAB, LAYERS, PROMPT, NEW_TOKENS = 100, 2, 7, 8


def _causal_lm(name):
    torch.manual_seed(0)
    # std 0.2 (not 0.02) so the tokens depend on what attention computes: see
    # test_real_models_soundness.INIT_STD
    common = dict(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, vocab_size=VOCAB,
                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=None,
                  initializer_range=0.2)
    if name == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif name == "mistral":  # window 5: prompt (7) and decoding both slide
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=5))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    assert model.config._attn_implementation == "sdpa"
    return model.eval()


def _left_padded_prompt():
    ids = torch.randint(3, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, PROMPT, dtype=torch.long)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


# Taken calls per generate, pinned (transformers 5.24): with a dynamic cache the prefill's causal +
# padding mask is a predicate (one call per layer); each decoding step's (B, 1, 1, Nk) mask has no
# tile to skip, and is kept. With a static cache the masks compare key positions with
# ``cache_position``, a forward input the pass cannot prove an arange: data, kept (SDPA reads it).
TAKEN_IN_GENERATE = {"dynamic": LAYERS, "static": 0}


@pytest.mark.parametrize("cache", ["dynamic", pytest.param("static", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", ["qwen2", pytest.param("llama", marks=pytest.mark.slow),
                                  pytest.param("mistral", marks=pytest.mark.slow)])
def test_generate_with_default_attention_gives_uncompiled_tokens(name, cache):
    model = _causal_lm(name)
    ids, mask = _left_padded_prompt()
    options = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                   output_logits=True, return_dict_in_generate=True)
    if cache == "static":
        options["cache_implementation"] = "static"
    want = model.generate(ids, **options)

    # strict: every SDPA call of the prefill and of each decoding step is taken or kept
    model.forward = torch.compile(model.forward, backend=fusion_pass.Backend(strict=True))
    first = model.generate(ids, **options)  # compiles: prefill, then decoding (maybe twice)
    got, n_fwd, n_bwd = profiled_op_counts(lambda: model.generate(ids, **options))
    assert (n_fwd, n_bwd) == (TAKEN_IN_GENERATE[cache], 0)
    for run in (first, got):
        same = torch.equal(run.sequences, want.sequences)
        err = max_rel_error(run.logits, want.logits)
        assert same and err < 1e-4, (
            f"tokens {'equal to' if same else 'differ from'} the uncompiled model's, logits differ "
            f"by {err:.2g} (relative):\n{run.sequences}\n{want.sequences}")


# ---- what transformers hands SDPA without padding (issue 14: take a site only when it gains) --------

def test_without_padding_transformers_passes_is_causal_and_the_site_is_kept(monkeypatch):
    """No attention_mask: transformers 5.24 calls SDPA with ``is_causal=True`` and no mask, the call
    SDPA already runs on its best kernel: kept, not taken. An all-ones mask (what a tokenizer
    returns) cannot be seen to be all ones while tracing, so transformers builds the causal +
    padding mask: proven a predicate and taken (the kernels read the (B, N) padding, not the mask)."""
    model, inputs = _build_default("llama-gqa", monkeypatch)
    model.eval()
    with torch.no_grad():
        expl = fusion_pass.explain(model, input_ids=inputs["input_ids"])
        assert _statuses(expl) == (0, 2, []), str(expl)
        assert all("is_causal alone" in str(s) for s in expl.sites), str(expl)
        ones = torch.ones_like(inputs["attention_mask"])
        expl = fusion_pass.explain(model, input_ids=inputs["input_ids"], attention_mask=ones)
        assert _statuses(expl) == (2, 0, []), str(expl)
        assert all("(j <= i)" in str(s) for s in expl.fused), str(expl)


def test_encoders_without_mask_and_causal_decoders_are_kept_with_their_reason(monkeypatch):
    """Whisper (no padding mask): the encoder's and the cross-attention's calls have no mask, the
    decoder's self-attention is_causal alone; ViT has no mask. Each kept, saying why."""
    for name, reasons in (("whisper", {"no mask": 4, "is_causal alone": 2}), ("vit", {"no mask": 2})):
        model, inputs = _build_default(name, monkeypatch)
        with torch.no_grad():
            expl = fusion_pass.explain(model.eval(), **inputs)
        assert _statuses(expl)[2] == [] and not expl.fused, str(expl)
        got = {r: sum(r in str(s) for s in expl.sites) for r in reasons}
        assert got == reasons, str(expl)
