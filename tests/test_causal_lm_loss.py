"""A Hugging Face causal LM measured in float64 (issue 24, item 4).

Its own ``outputs.loss`` is computed after ``logits.float()``: float32 even when the operator
measures in float64. ``ts.causal_lm_loss`` is the same shifted, -100-masked mean cross-entropy in
the logits' dtype. A tiny GPT-2 is built from a config (nothing downloaded); the references are
plain float64 autograd of an explicitly written cross-entropy.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import tinysubspace as ts
from reference import relative_error
from tinysubspace.curvature.data import Batch, count_tokens

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
pytestmark = pytest.mark.usefixtures("global_rng_untouched")

F64 = torch.float64
V, T = 11, 6


def _gpt2():
    config = transformers.GPT2Config(vocab_size=V, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                     attn_implementation="eager")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(V, (3, T), generator=gen)
    labels = ids.clone()
    labels[0, 4:] = -100
    labels[2, 2:] = -100
    return model, ids, labels


def _explicit_ce(logits, labels):
    """Σ over counted next-token targets of −log softmax, divided by their number (float64)."""
    z = logits[:, :-1].to(F64)
    y = labels[:, 1:]
    logp = z - torch.logsumexp(z, dim=-1, keepdim=True)
    keep = y != -100
    picked = logp.gather(-1, y.clamp_min(0)[..., None])[..., 0]
    return -(picked * keep).sum() / keep.sum()


def _data(ids, labels):
    return [Batch({"input_ids": ids[:2], "labels": labels[:2]}, labels[:2],
                  count_tokens(labels[:2], shift=True)),
            Batch({"input_ids": ids[2:], "labels": labels[2:]}, labels[2:],
                  count_tokens(labels[2:], shift=True))]


def test_causal_lm_loss_is_the_models_loss_in_float64():
    model, ids, labels = _gpt2()
    with torch.no_grad():
        out64 = model.to(F64)(input_ids=ids, labels=labels)
    assert out64.loss.dtype == torch.float32  # Hugging Face's own loss: float32
    ours = ts.causal_lm_loss(out64, labels)
    assert ours.dtype == F64
    assert abs(float(ours) - float(_explicit_ce(out64.logits, labels))) < 1e-14
    assert abs(float(ours) - float(out64.loss)) < 1e-6  # the same loss, to float32
    with torch.no_grad():
        out32 = model.float()(input_ids=ids, labels=labels)
    assert ts.causal_lm_loss(out32, labels).dtype == torch.float32
    assert abs(float(ts.causal_lm_loss(out32, labels)) - float(out32.loss)) < 1e-6
    half = ts.causal_lm_loss(out32.logits.bfloat16(), labels)
    assert half.dtype == torch.float32  # half precision is computed in float32
    with pytest.raises(ValueError, match=r"labels must have the logits' leading shape \(3, 6\)"):
        ts.causal_lm_loss(out32, labels[:, 1:])
    with pytest.raises(TypeError, match="expected logits"):
        ts.causal_lm_loss({"loss": out32.loss}, labels)


def test_float64_measurement_of_gpt2_reaches_float64():
    """Loss, gradient and H·v in float64 with ``causal_lm_loss`` agree with plain float64
    autograd of the explicit cross-entropy to 1e-12; the model's own loss is 1e-9 or more off."""
    model, ids, labels = _gpt2()
    names = [n for n, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1).to(F64) for p in model.parameters()])
    model64 = copy.deepcopy(model).to(F64)

    def loss_of(flat):
        state, start = {}, 0
        for name, p in zip(names, model64.parameters(), strict=True):
            state[name] = flat[start:start + p.numel()].reshape(p.shape)
            start += p.numel()
        total = 0
        for batch in _data(ids, labels):
            out = torch.func.functional_call(model64, state, (), batch.inputs)
            total = total + batch.size * _explicit_ce(out.logits, batch.targets)
        return total / sum(b.size for b in _data(ids, labels))

    gen = torch.Generator().manual_seed(2)
    v = torch.randn(theta.numel(), generator=gen, dtype=F64)
    loss_ref = loss_of(theta)
    g_ref = torch.autograd.functional.jacobian(loss_of, theta)
    _, Hv_ref = torch.autograd.functional.hvp(loss_of, theta, v)
    model32 = model
    ours = ts.HessianOperator(model32, ts.causal_lm_loss, _data(ids, labels), dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from tinysubspace.integrations.transformers import model_loss
        own = ts.HessianOperator(model32, model_loss, _data(ids, labels), dtype=F64)
        own_loss, own_g = own.loss_and_gradient()
        own_Hv = own @ v
    loss, g = ours.loss_and_gradient()
    assert abs(loss - float(loss_ref)) < 1e-12 * abs(float(loss_ref))
    assert relative_error(g, g_ref) < 1e-12
    assert relative_error(ours @ v, Hv_ref) < 1e-12
    errors = (abs(own_loss - float(loss_ref)) / float(loss_ref), relative_error(own_g, g_ref),
              relative_error(own_Hv, Hv_ref))
    assert max(errors) > 1e-9  # what the model's own float32 loss costs


def test_the_models_own_loss_warns_and_the_callback_switches():
    from tinysubspace.integrations.transformers import measured_loss, model_loss

    model, ids, labels = _gpt2()
    with torch.no_grad():
        out = model.to(F64)(input_ids=ids, labels=labels)
    with pytest.warns(UserWarning, match=r"own loss is torch.float32 while its logits are "
                                         r"torch.float64.*causal_lm_loss"):
        model_loss(out, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model_loss(model.float()(input_ids=ids, labels=labels), labels)  # float32: silent
    assert measured_loss(model, model_loss, torch.float64) is ts.causal_lm_loss
    assert measured_loss(model, model_loss, "float64") is ts.causal_lm_loss
    assert measured_loss(model, model_loss, None) is model_loss
    assert measured_loss(torch.nn.Identity(), model_loss, torch.float64) is model_loss
