"""The Fisher of sequence models: per-token examples and -100 padding (issue 24, items 1 and 2).

Every kind (empirical, Monte Carlo, true) against a dense float64 per-token reference built here
from ``torch.autograd.functional.jacobian`` of the per-token losses and of the logits (nothing of
tinysubspace): two batches of unequal size and unequal padding, with and without the size hook
that counts tokens; and the issue's reproducer (a linear classifier with three of eight labels
-100), where the true Fisher must be the GGN.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional

import tinysubspace as ts
from reference import relative_error
from tinysubspace.curvature.data import Batch

pytestmark = pytest.mark.usefixtures("global_rng_untouched")

F64 = torch.float64
TOL = 1e-10
V, D = 5, 4


class TinyLM(nn.Module):
    """Embedding -> LayerNorm -> tanh -> logits over the V tokens, per position."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(V, D)
        self.ln = nn.LayerNorm(D)
        self.head = nn.Linear(D, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.ln(self.wte(x))))


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))


def _problem():
    """Two batches: 3 sequences of 4 with 4 padded labels, 2 sequences with 5 (one all padding)."""
    gen = torch.Generator().manual_seed(3)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = TinyLM().double()
        with torch.no_grad():
            model.ln.weight.add_(0.3 * torch.randn(D))
            model.ln.bias.add_(0.3 * torch.randn(D))
    X1, Y1 = torch.randint(V, (3, 4), generator=gen), torch.randint(V, (3, 4), generator=gen)
    X2, Y2 = torch.randint(V, (2, 4), generator=gen), torch.randint(V, (2, 4), generator=gen)
    Y1[0, :2] = -100
    Y1[2, 3] = -100
    Y1[1, 0] = -100
    Y2[1] = -100
    Y2[0, 3] = -100
    return model, [(X1, Y1), (X2, Y2)]


def _theta(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _call(model, theta, x):
    state, start = {}, 0
    for name, p in model.named_parameters():
        state[name] = theta[start:start + p.numel()].reshape(p.shape)
        start += p.numel()
    return functional_call(model, state, (x,))


def _token_gradients(model, x, y):
    """``(B·T, p)``: gradient of each token's loss (zero rows for -100 labels)."""
    def losses(theta):
        z = _call(model, theta, x)
        return functional.cross_entropy(z.reshape(-1, V), y.reshape(-1), reduction="none")

    return torch.autograd.functional.jacobian(losses, _theta(model))


def _logit_jacobian(model, x):
    """``(B·T, V, p)``."""
    J = torch.autograd.functional.jacobian(lambda t: _call(model, t, x).reshape(-1),
                                           _theta(model))
    return J.reshape(-1, V, J.shape[-1])


def _dense(op):
    return op @ torch.eye(op.shape[0], dtype=F64)


def _weighted(per_batch, sizes):
    return sum(n * F for n, F in zip(sizes, per_batch, strict=True)) / sum(sizes)


def _empirical_reference(model, batches, sizes):
    per_batch = []
    for x, y in batches:
        g = _token_gradients(model, x, y)
        per_batch.append(g.T @ g / int((y != -100).sum()))
    return _weighted(per_batch, sizes)


def _true_reference(model, batches, sizes):
    per_batch = []
    for x, y in batches:
        J = _logit_jacobian(model, x)
        p = torch.softmax(_call(model, _theta(model), x).detach().reshape(-1, V), -1)
        M = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        keep = (y.reshape(-1) != -100).to(F64)
        per_batch.append(torch.einsum("t,tap,tab,tbq->pq", keep, J, M, J) / keep.sum())
    return _weighted(per_batch, sizes)


def _hooked(batches):
    return [Batch(x, y, size=int((y != -100).sum())) for x, y in batches]


@pytest.mark.parametrize("hook", [False, True], ids=["rows", "tokens"])
def test_empirical_token_fisher_matches_the_per_token_reference(hook):
    model, batches = _problem()
    data = _hooked(batches) if hook else batches
    sizes = [b.size for b in data] if hook else [len(x) for x, _ in batches]
    op = ts.FisherOperator(model, token_ce, data, kind="empirical")
    expected = _empirical_reference(model, batches, sizes)
    assert relative_error(_dense(op), expected) < TOL
    if hook:  # one mean over every counted token of the data set
        all_g = torch.cat([_token_gradients(model, x, y) for x, y in batches])
        assert relative_error(_dense(op), all_g.T @ all_g / sum(sizes)) < TOL


@pytest.mark.parametrize("hook", [False, True], ids=["rows", "tokens"])
def test_true_token_fisher_is_the_reference_and_the_ggn(hook):
    model, batches = _problem()
    data = _hooked(batches) if hook else batches
    sizes = [b.size for b in data] if hook else [len(x) for x, _ in batches]
    op = ts.FisherOperator(model, token_ce, data, kind="true", likelihood="categorical")
    expected = _true_reference(model, batches, sizes)
    assert relative_error(_dense(op), expected) < TOL
    assert relative_error(_dense(ts.GGNOperator(model, token_ce, data)), expected) < TOL


@pytest.mark.parametrize("hook", [False, True], ids=["rows", "tokens"])
def test_monte_carlo_token_fisher_matches_the_reference_with_the_same_targets(hook):
    model, batches = _problem()
    data = _hooked(batches) if hook else batches
    sizes = [b.size for b in data] if hook else [len(x) for x, _ in batches]
    op = ts.FisherOperator(model, token_ce, data, kind="mc", likelihood="categorical",
                           mc_samples=3, seed=5)
    per_batch = []
    for index, (x, y) in enumerate(batches):
        z = _call(model, _theta(model), x).detach()
        draws = op.sample_targets(z, index)
        assert draws.shape == (3, *y.shape)
        total = 0
        for drawn in draws:
            drawn = torch.where(y == -100, -100, drawn)  # padding is not an example
            g = _token_gradients(model, x, drawn)
            total = total + g.T @ g
        per_batch.append(total / (3 * int((y != -100).sum())))
    assert relative_error(_dense(op), _weighted(per_batch, sizes)) < TOL


def test_many_monte_carlo_samples_approach_the_true_token_fisher():
    model, batches = _problem()
    data = _hooked(batches)
    true = _dense(ts.FisherOperator(model, token_ce, data, kind="true",
                                    likelihood="categorical"))
    many = _dense(ts.FisherOperator(model, token_ce, data, kind="mc", likelihood="categorical",
                                    mc_samples=300, seed=1))
    assert relative_error(many, true) < 0.15


def test_tokens_are_the_default_and_sequences_a_choice():
    """``examples="auto"`` is per token for (B, T, V) logits; ``"sequence"`` takes each row's
    gradient ``g_s = m_seq ∇ ℓ_j`` restricted to its tokens, which average to the batch
    gradient."""
    model, batches = _problem()
    token = _dense(ts.FisherOperator(model, token_ce, batches, examples="token"))
    auto = _dense(ts.FisherOperator(model, token_ce, batches))
    assert torch.equal(auto, token)
    sequence = _dense(ts.FisherOperator(model, token_ce, batches, examples="sequence"))
    per_batch = []
    for x, y in batches:
        g = _token_gradients(model, x, y).reshape(len(x), -1, len(_theta(model)))
        counted = (y != -100)
        m_seq, m_tok = int(counted.any(1).sum()), int(counted.sum())
        g_seq = g.sum(1) * m_seq / m_tok
        per_batch.append(g_seq.T @ g_seq / m_seq)
    expected = _weighted(per_batch, [len(x) for x, _ in batches])
    assert relative_error(sequence, expected) < TOL
    assert relative_error(sequence, token) > 0.1  # the two conventions differ


def test_the_issue_reproducer_true_fisher_equals_the_ggn():
    """``nn.Linear(4, 3)``, 8 rows, ``y[:3] = -100``: the true Fisher was 0.67 off the GGN."""
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Linear(4, 3).double()
    X = torch.randn(8, 4, dtype=F64, generator=gen)
    y = torch.randint(0, 3, (8,), generator=gen)
    y[:3] = -100
    ggn = _dense(ts.GGNOperator(model, functional.cross_entropy, (X, y)))
    true = _dense(ts.FisherOperator(model, functional.cross_entropy, (X, y), kind="true"))
    assert relative_error(true, ggn) < TOL
    g = torch.autograd.functional.jacobian(
        lambda t: functional.cross_entropy(_call(model, t, X), y, reduction="none"),
        _theta(model))
    expected = g.T @ g / 5
    for data in ((X, y), [Batch(X, y, size=5)]):  # rows, and the size hook counting labels
        emp = _dense(ts.FisherOperator(model, functional.cross_entropy, data))
        assert relative_error(emp, expected) < TOL
        mc = ts.FisherOperator(model, functional.cross_entropy, data, kind="mc", mc_samples=2)
        assert torch.isfinite(_dense(mc)).all()
        assert relative_error(_dense(ts.FisherOperator(
            model, functional.cross_entropy, data, kind="true")), ggn) < TOL


def test_a_batch_of_padding_only_adds_no_curvature():
    """A batch whose labels are all -100 (size 1 by the hook) contributes zero, weighted 1."""
    model, batches = _problem()
    x, y = batches[0]
    n = int((y != -100).sum())
    data = [Batch(x, y, n), Batch(x[:1], torch.full_like(y[:1], -100), 1)]
    op = ts.FisherOperator(model, token_ce, data, kind="true", likelihood="categorical")
    alone = ts.FisherOperator(model, token_ce, [Batch(x, y, n)], kind="true",
                              likelihood="categorical")
    assert relative_error(_dense(op), _dense(alone) * n / (n + 1)) < TOL


def test_bad_examples_are_named():
    model, batches = _problem()
    with pytest.raises(ValueError, match=r"examples must be one of \('auto', 'token', "
                                         r"'sequence'\), got 'word'"):
        ts.FisherOperator(model, token_ce, batches, examples="word")
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(6, 4, 2, dtype=F64, generator=gen), torch.randint(3, (6, 2), generator=gen)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        conv = nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.Unflatten(1, (3, 2))).double()
    op = ts.FisherOperator(conv, nn.CrossEntropyLoss(), (X, Y), examples="token")
    with pytest.raises(ValueError, match=r"examples='token' .* got outputs \(6, 3, 2\) and "
                                         r"targets \(6, 2\)"):
        op @ torch.ones(op.shape[0], dtype=F64)
    seq = ts.FisherOperator(model, token_ce, batches, kind="true", likelihood="categorical",
                            examples="sequence")
    with pytest.raises(ValueError, match=r"outputs of shape \(batch, classes\), got shape "
                                         r"\(3, 4, 5\)"):
        seq @ torch.ones(seq.shape[0], dtype=F64)


def test_class_means_leave_padding_out():
    """Rows labelled -100 change no class mean, count or weight: the same as without them; and
    with classes as points (Papyan's M = G), M is the padded GGN."""
    from tinysubspace.curvature.class_means import class_gradient_means, papyan_basis

    gen = torch.Generator().manual_seed(1)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X = torch.randn(12, 4, dtype=F64, generator=gen)
    Y = torch.arange(12) % 3
    padded = Y.clone()
    padded[[1, 5, 6]] = -100
    keep = padded != -100
    with_pad = class_gradient_means(ts.GGNOperator(model, functional.cross_entropy,
                                                   (X, padded), batch_size=5), 3)
    without = class_gradient_means(ts.GGNOperator(model, functional.cross_entropy,
                                                  (X[keep], Y[keep]), batch_size=5), 3)
    assert torch.equal(with_pad.counts, without.counts) and int(with_pad.counts.sum()) == 9
    assert relative_error(with_pad.means, without.means) < 1e-12
    assert relative_error(with_pad.weights, without.weights) < 1e-12
    centres = X[:3]
    op = ts.GGNOperator(model, functional.cross_entropy, (centres[Y], padded))
    values, vectors = papyan_basis(class_gradient_means(op, 3), 6)
    G = _dense(op)
    assert relative_error(vectors @ torch.diag(values) @ vectors.T, G) < 1e-10
