"""Real Hugging Face models built from tiny configs (no weights downloaded), eager attention:
every layer's attention becomes one fusion_pass::attention call (counted with torch.profiler),
and outputs and every parameter gradient equal eager within fp32 rounding, in eval and training."""
import pytest
import torch

import fusion_pass

from helpers import max_rel_error, profiled_op_counts

transformers = pytest.importorskip("transformers")

LAYERS = 2  # more than one: each layer is its own site; the count does not change what is proven


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # conftest.py: Dynamo reset around each test


def bert():
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=101, max_position_embeddings=64,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  attn_implementation="eager")
    ids = torch.randint(0, 101, (2, 19))
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, 13:] = 0  # right padding on the second sequence
    return transformers.BertModel(cfg), dict(input_ids=ids, attention_mask=mask)


def vit():
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                                 intermediate_size=128, image_size=32, patch_size=8,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                 attn_implementation="eager")
    return transformers.ViTModel(cfg), dict(pixel_values=torch.randn(2, 3, 32, 32))


MODELS = {"bert": bert, "vit": vit}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("family", [pytest.param("bert"), pytest.param("vit", marks=pytest.mark.slow)])
def test_every_layer_fused_and_equal_to_eager(family, training):
    torch.manual_seed(0)
    model, inputs = MODELS[family]()
    model.train(training)
    params = [p for p in model.parameters() if p.requires_grad]

    ref = model(**inputs).last_hidden_state
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, params, g, allow_unused=True)

    compiled = torch.compile(model, backend="fusion_pass")
    torch.autograd.grad(compiled(**inputs).last_hidden_state, params, g, allow_unused=True)  # compile
    out, n_fwd, _ = profiled_op_counts(lambda: compiled(**inputs).last_hidden_state)
    grads, _, n_bwd = profiled_op_counts(lambda: torch.autograd.grad(out, params, g, allow_unused=True))

    assert n_fwd == LAYERS, f"{n_fwd} fused forward calls for {LAYERS} layers"
    assert n_bwd == LAYERS
    assert max_rel_error([out], [ref]) < 1e-4
    assert max_rel_error(grads, ref_grads) < 1e-4


def test_explain_bert_names_every_site():
    model, inputs = bert()
    expl = fusion_pass.explain(model.eval(), **inputs)
    assert len(expl.fused) == LAYERS and not expl.missed
    text = str(expl)
    assert "score_mod(s) = (s * 0.25) + m0[b, h, i, j]" in text
    assert "m0[b, h, i, j] = where(Ne(d0(b, j), 0), 0.0, " in text  # padding, read as a predicate
    assert "torch.ops.fusion_pass.attention.default" in text


def test_bert_dynamic_lengths_stay_fused():
    model, _ = bert()
    model.eval()
    compiled = torch.compile(model, backend="fusion_pass", dynamic=True)
    for n in (17, 29):
        ids = torch.randint(0, 101, (2, n))
        mask = torch.ones(2, n, dtype=torch.long)
        mask[0, : n // 3] = 0  # left padding this time
        with torch.no_grad():
            compiled(input_ids=ids, attention_mask=mask)
            out, nf, _ = profiled_op_counts(
                lambda: compiled(input_ids=ids, attention_mask=mask).last_hidden_state)
            ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert nf == LAYERS
        assert max_rel_error([out], [ref]) < 1e-4


def test_bert_training_with_attention_dropout_fuses_dropout():
    cfg_model, inputs = bert()
    cfg = cfg_model.config
    cfg.attention_probs_dropout_prob = 0.1
    model = transformers.BertModel(cfg).train()
    expl = fusion_pass.explain(model, **inputs)
    assert len(expl.fused) == LAYERS
    assert all(s.spec.dropout_p == 0.1 for s in expl.fused)
    compiled = torch.compile(model, backend="fusion_pass")
    w = model.encoder.layer[0].attention.self.query.weight
    g = torch.randn_like(compiled(**inputs).last_hidden_state)
    d = torch.randn_like(w)

    def loss(seed):
        torch.manual_seed(seed)  # the same seed draws the same dropout masks
        return (compiled(**inputs).last_hidden_state * g).sum()
    (grad,) = torch.autograd.grad(loss(7), w)
    # the backward must regenerate the forward's masks: a directional finite difference of the
    # same (seeded) function agrees with the gradient; a backward with other masks is far off
    eps = 1e-2
    with torch.no_grad():
        w += eps * d
        up = loss(7)
        w -= 2 * eps * d
        down = loss(7)
        w += eps * d
    fd = (up - down).item() / (2 * eps)
    assert abs(fd - (grad * d).sum().item()) <= 2e-2 * abs(fd) + 1e-3
