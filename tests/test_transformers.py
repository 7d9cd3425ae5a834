"""Exact Hessians through attention (issue 14): every H·V method and the gradient of the Hessian
operator on PyTorch's own ``nn.TransformerEncoderLayer``, a GPT block with causal
``scaled_dot_product_attention`` and tied embeddings, and Hugging Face style dict batches with
``labels`` — each against a dense float64 Hessian (``torch.autograd.functional.hessian``, STYLE.md
point 4) that is itself checked by central finite differences of the gradient computed with
PyTorch's default (fused) attention kernel. Also: the caller's attention settings are restored,
tokens (not sequences) weight the mean, the ``gpt`` model and the character corpora.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import tinysubspace as ts
from tinysubspace.curvature.attention import attention_backends, exact_attention
from tinysubspace.curvature.data import Batch, count_tokens
from tinysubspace.problems.datasets.text import TokenData, load_text, token_sequences
from tinysubspace.problems.models.gpt import build_gpt, gpt_parameter_count, token_cross_entropy

pytestmark = pytest.mark.usefixtures("global_rng_untouched")

F64 = torch.float64
METHODS = ("loop", "batched", "jvp")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _perturb_(model: nn.Module, seed: int, scale: float = 0.3) -> nn.Module:
    """Non-trivial weights everywhere (layer norms included), from ``seed``."""
    gen = _gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model.eval()


# ----------------------------------------------------------------------------- the problems
@dataclass
class AttentionProblem:
    """A model, a loss, the data as the operator takes it, and the whole-data-set loss as a
    function of the model (for the reference)."""

    model: nn.Module
    loss_fn: object
    data: object
    whole_loss: object  # whole_loss(call) -> mean loss over every token/example of the data


def encoder_problem() -> AttentionProblem:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True)
    _perturb_(layer, 1)
    gen = _gen(2)
    X, Y = torch.randn(7, 3, 4, generator=gen), torch.randn(7, 3, 4, generator=gen)

    def loss(outputs, targets):  # not nn.MSELoss: in torch 2.13 F.mse_loss fails under
        return (outputs - targets).square().mean()  # jvp(grad) ("ZeroTensors are immutable")
    return AttentionProblem(layer, loss, [(X[:2], Y[:2]), (X[2:], Y[2:])],
                            lambda call: loss(call(X.double()), Y.double()))


def gpt_problem(tie_weights: bool = True) -> AttentionProblem:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_gpt((4,), 5, n_layer=1, n_head=2, n_embd=4, tie_weights=tie_weights)
    _perturb_(model, 3)
    gen = _gen(4)
    ids = torch.randint(5, (6, 5), generator=gen)
    X, Y = ids[:, :-1], ids[:, 1:]
    return AttentionProblem(model, token_cross_entropy, (X, Y),
                            lambda call: token_cross_entropy(call(X), Y))


@dataclass
class CausalLMOutput:
    """What a Hugging Face causal LM returns (the fields used here)."""

    loss: torch.Tensor | None
    logits: torch.Tensor


class TinyCausalLM(nn.Module):
    """``model(input_ids=..., attention_mask=..., labels=...)`` the Hugging Face way: the loss is
    the mean cross-entropy of ``labels[:, 1:]`` (``-100`` ignored) from the positions before."""

    def __init__(self) -> None:
        super().__init__()
        self.gpt = build_gpt((4,), 5, n_layer=1, n_head=2, n_embd=4)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.gpt(input_ids)
        loss = None
        if labels is not None:
            loss = token_cross_entropy(logits[:, :-1], labels[:, 1:])
        return CausalLMOutput(loss, logits)


def _hf_batches() -> tuple[list[dict], torch.Tensor]:
    """Three dict batches with ragged padding (labels -100) and all labels stacked."""
    gen = _gen(5)
    ids = torch.randint(5, (5, 4), generator=gen)
    labels = ids.clone()
    labels[0, 3:] = -100  # padded positions of unequal length
    labels[2, 2:] = -100
    labels[4, 1:] = -100
    cuts = [(0, 1), (1, 3), (3, 5)]
    batches = [{"input_ids": ids[a:b], "attention_mask": (labels[a:b] != -100).long(),
                "labels": labels[a:b]} for a, b in cuts]
    return batches, ids, labels


def hf_problem(loss_kind: str = "outputs.loss") -> AttentionProblem:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyCausalLM()
    _perturb_(model, 6)
    batches, ids, labels = _hf_batches()
    if loss_kind == "outputs.loss":
        def loss_fn(outputs, targets):
            return outputs.loss
    else:  # cross-entropy from the logits and the batch's labels
        def loss_fn(outputs, targets):
            return token_cross_entropy(outputs.logits[:, :-1], targets[:, 1:])
    data = [Batch(b, b["labels"], count_tokens(b["labels"], shift=True)) for b in batches]
    return AttentionProblem(model, loss_fn, data,
                            lambda call: call(input_ids=ids, labels=labels).loss)


PROBLEMS = {"encoder": encoder_problem, "gpt": gpt_problem, "hf-outputs-loss": hf_problem,
            "hf-logits-ce": lambda: hf_problem("logits")}


# ------------------------------------------------------------------------------ references
class FlatFunction:
    """``L(θ)``: ``whole_loss`` of a float64 copy of the model as a function of flat ``θ``."""

    def __init__(self, problem: AttentionProblem) -> None:
        self.model = copy.deepcopy(problem.model).double().eval()
        self.whole_loss = problem.whole_loss
        named = dict(self.model.named_parameters())
        self.names = list(named)
        self.shapes = [named[n].shape for n in self.names]
        self.theta0 = torch.cat([named[n].detach().reshape(-1) for n in self.names])

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        state, start = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = shape.numel()
            state[name] = theta[start:start + size].view(shape)
            start += size

        def call(*args, **kwargs):
            return functional_call(self.model, state, args, kwargs)

        return self.whole_loss(call)

    def gradient(self, theta: torch.Tensor) -> torch.Tensor:
        """With PyTorch's default kernels (first derivatives exist for the fused ones)."""
        theta = theta.detach().clone().requires_grad_(True)
        return torch.autograd.grad(self(theta), theta)[0]

    def hessian(self) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.MATH):
            return torch.autograd.functional.hessian(self, self.theta0.clone())

    def finite_difference_hessian(self, step: float = 1e-5) -> torch.Tensor:
        columns = []
        for i in range(self.theta0.numel()):
            e = torch.zeros_like(self.theta0)
            e[i] = step
            columns.append((self.gradient(self.theta0 + e) - self.gradient(self.theta0 - e))
                           / (2 * step))
        return torch.stack(columns, 1)


_CACHE: dict[str, tuple[FlatFunction, torch.Tensor]] = {}


def reference(name: str) -> tuple[FlatFunction, torch.Tensor]:
    if name not in _CACHE:
        f = FlatFunction(PROBLEMS[name]())
        _CACHE[name] = (f, f.hessian())
    return _CACHE[name]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _dense(op) -> torch.Tensor:
    return op @ torch.eye(op.shape[0], dtype=F64)


# ---------------------------------------------------------------------------------- tests
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_reference_agrees_with_finite_differences(name):
    f, H = reference(name)
    assert _rel(H.T, H) < 1e-13
    assert _rel(f.finite_difference_hessian(), H) < 1e-7


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_hessian_through_attention_is_exact(name, method):
    problem = PROBLEMS[name]()
    f, H = reference(name)
    op = ts.HessianOperator(problem.model, problem.loss_fn, problem.data, dtype=F64,
                            hvp_method=method)
    assert op.shape[0] == f.theta0.numel()
    assert _rel(_dense(op), H) < 1e-10
    v = torch.randn(op.shape[0], generator=_gen(7), dtype=F64)
    assert _rel(op @ v, H @ v) < 1e-10


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_loss_and_gradient_through_attention(name):
    problem = PROBLEMS[name]()
    f, _ = reference(name)
    op = ts.HessianOperator(problem.model, problem.loss_fn, problem.data, dtype=F64)
    loss, g = op.loss_and_gradient()
    assert loss == pytest.approx(float(f(f.theta0)), rel=1e-12)
    assert _rel(g, f.gradient(f.theta0)) < 1e-12


def test_fused_kernels_lack_second_derivatives_and_the_operator_avoids_them():
    """Why the operator selects the math kernel: double backward through the default kernel
    fails on this machine's torch; inside the operator it is exact."""
    problem = encoder_problem()
    f, _ = reference("encoder")
    theta = f.theta0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(theta), theta, create_graph=True)
    with pytest.raises(RuntimeError, match=r"derivative for .*attention.* is not implemented"):
        torch.autograd.grad(g.sum(), theta)
    ts.HessianOperator(problem.model, problem.loss_fn, problem.data) @ torch.ones(f.theta0.numel())


def test_tied_embeddings_are_the_sum_of_the_untied_blocks():
    """``θ = (E)`` used twice: ``H_tied = Pᵀ H_untied P`` with ``P = [I; I]`` on ``E``."""
    tied, untied = gpt_problem(True), gpt_problem(False)
    with torch.no_grad():
        for name, p in tied.model.named_parameters():
            dict(untied.model.named_parameters())[name].copy_(p)
        untied.model.lm_head.weight.copy_(tied.model.wte.weight)
    op_t = ts.HessianOperator(tied.model, tied.loss_fn, tied.data, dtype=F64)
    op_u = ts.HessianOperator(untied.model, untied.loss_fn, untied.data, dtype=F64)
    names_u = list(op_u.layout.names)
    assert "lm_head.weight" in names_u and "lm_head.weight" not in op_t.layout.names
    P = torch.zeros(op_u.shape[0], op_t.shape[0], dtype=F64)
    cols = dict(zip(op_t.layout.names, op_t.layout.slices(), strict=True))
    for name, rows in zip(names_u, op_u.layout.slices(), strict=True):
        source = cols["wte.weight" if name == "lm_head.weight" else name]
        P[rows, source] = torch.eye(rows.stop - rows.start, dtype=F64)
    assert _rel(_dense(op_t), P.T @ _dense(op_u) @ P) < 1e-10


class Raising(nn.Module):
    """A model whose forward fails (after noting the attention backends it runs under)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        raise KeyError(f"inside: {', '.join(attention_backends())}")


def test_the_callers_attention_settings_are_restored():
    problem = gpt_problem()
    _, H = reference("gpt")
    v = torch.randn(H.shape[0], generator=_gen(8), dtype=F64)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        chosen = attention_backends()
        assert "math" not in chosen
        for method in METHODS:
            op = ts.HessianOperator(problem.model, problem.loss_fn, problem.data, dtype=F64,
                                    hvp_method=method)
            assert _rel(op @ v, H @ v) < 1e-10
            op.loss_and_gradient()
            assert attention_backends() == chosen

        with pytest.raises(KeyError, match="inside: math"):
            ts.HessianOperator(Raising(), problem.loss_fn, problem.data).loss_and_gradient()
        assert attention_backends() == chosen
    with exact_attention():
        assert attention_backends() == ("math",)


def test_tokens_not_sequences_weight_the_mean():
    """Ragged dict batches: with ``Batch(size=tokens)`` the operator's loss is the mean over all
    tokens; weighting by sequences (plain pairs) gives another number."""
    problem = hf_problem()
    f, _ = reference("hf-outputs-loss")
    op = ts.HessianOperator(problem.model, problem.loss_fn, problem.data, dtype=F64)
    assert op.num_examples == count_tokens(_hf_batches()[2], shift=True) == 9
    assert op.loss_and_gradient()[0] == pytest.approx(float(f(f.theta0)), rel=1e-12)
    by_sequence = [(b.inputs, b.targets) for b in problem.data]
    other = ts.HessianOperator(problem.model, problem.loss_fn, by_sequence, dtype=F64)
    assert other.num_examples == 5
    assert abs(other.loss_and_gradient()[0] - float(f(f.theta0))) > 1e-3


def test_dict_items_are_keyword_inputs_with_their_labels():
    """A Hugging Face ``DataLoader`` yields dicts: inputs ``model(**item)``, targets
    ``item["labels"]``, size the batch dimension."""
    problem = hf_problem("logits")
    _, ids, _ = _hf_batches()
    full = [{"input_ids": ids, "labels": ids}]  # no padding: one batch, every token
    op = ts.HessianOperator(problem.model, problem.loss_fn, full, dtype=F64)
    split = ts.HessianOperator(problem.model, problem.loss_fn,
                               [{"input_ids": ids[:2], "labels": ids[:2]},
                                {"input_ids": ids[2:], "labels": ids[2:]}], dtype=F64)
    assert op.num_examples == split.num_examples == 5
    v = torch.randn(op.shape[0], generator=_gen(9), dtype=F64)
    assert _rel(split @ v, op @ v) < 1e-12  # equal-length sequences: 2 and 3 weigh as tokens


def test_batch_size_hook_is_validated():
    problem = gpt_problem()
    X, Y = problem.data
    with pytest.raises(TypeError, match=r"Batch.size must be a non-negative integer .* got -1"):
        ts.HessianOperator(problem.model, problem.loss_fn, [Batch(X, Y, -1)])
    op = ts.HessianOperator(problem.model, problem.loss_fn,
                            [Batch(X, Y, torch.tensor(24)), Batch(X[:0], Y[:0], 0)])
    assert op.num_examples == 24


def test_training_step_overlap_goes_through_attention():
    """The training loop's mini-batch ``overlap(g, Hg)`` (double backprop) on the GPT."""
    from tinysubspace.experiments.training import minibatch_step

    problem = gpt_problem()
    X, Y = problem.data
    model = copy.deepcopy(problem.model).double()
    _, overlap = minibatch_step(model, token_cross_entropy, X, Y, with_overlap=True)
    op = ts.HessianOperator(model, token_cross_entropy, (X, Y))
    _, g = op.loss_and_gradient()
    Hg = op @ g
    assert overlap == pytest.approx(float(g @ Hg / (g.norm() * Hg.norm())), rel=1e-10)


# ------------------------------------------------------------------------ the gpt and data
def test_gpt_registry_parameter_count_and_tying():
    for tie in (True, False):
        model = ts.build_model("gpt", (8,), 11, n_layer=2, n_head=2, n_embd=6, tie_weights=tie)
        count = sum(p.numel() for p in model.parameters())
        assert count == gpt_parameter_count(11, 8, 2, 6, tie_weights=tie)
        assert (model.lm_head.weight is model.wte.weight) == tie
    model = ts.build_model("gpt", (8,), 11, n_layer=1, bias=False)
    assert count_params(model) == gpt_parameter_count(11, 8, 1, 32, bias=False)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_gpt_is_causal_and_deterministic_by_seed():
    model = ts.build_model("gpt", (6,), 7, n_layer=2, n_head=2, n_embd=8, seed=3).eval()
    again = ts.build_model("gpt", (6,), 7, n_layer=2, n_head=2, n_embd=8, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(),
                                                   strict=True))
    x = torch.randint(7, (2, 6), generator=_gen(10))
    y = x.clone()
    y[:, 4] = (y[:, 4] + 1) % 7  # change token 5: logits of positions 1..4 stay
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.shape == (2, 6, 7)
    assert torch.equal(a[:, :4], b[:, :4]) and not torch.allclose(a[:, 4:], b[:, 4:])


def test_gpt_bad_options():
    with pytest.raises(ValueError, match="n_embd must be divisible by n_head, got n_embd=6"):
        ts.build_model("gpt", (4,), 5, n_embd=6, n_head=4)
    with pytest.raises(ValueError, match="context_length 3 is shorter than the data's sequences"):
        ts.build_model("gpt", (4,), 5, block_size=3)
    with pytest.raises(ValueError, match="vocab 6 differs from the data's vocabulary of 5"):
        ts.build_model("gpt", (4,), 5, vocab=6)
    with pytest.raises(ValueError, match=r"gpt needs token sequences, input_shape \(T,\)"):
        ts.build_model("gpt", (1, 8, 8), 5)
    with pytest.raises(ValueError, match="n_layer must be a positive integer, got 0"):
        ts.build_model("gpt", (4,), 5, n_layer=0)
    with pytest.raises(ValueError, match=r"unknown option.* for model 'gpt'; known: .*n_layer"):
        ts.build_model("gpt", (4,), 5, widths=(3,))
    model = ts.build_model("gpt", (4,), 5)
    with pytest.raises(ValueError, match="sequence length 5 exceeds context_length 4"):
        model(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="GPT expects integer token ids"):
        model(torch.zeros(1, 4))


def test_token_cross_entropy_is_the_mean_over_tokens():
    logits = torch.randn(3, 4, 5, generator=_gen(11), dtype=F64)
    targets = torch.randint(5, (3, 4), generator=_gen(12))
    logp = torch.log_softmax(logits, -1)
    manual = -sum(logp[b, t, targets[b, t]] for b in range(3) for t in range(4)) / 12
    assert float(token_cross_entropy(logits, targets)) == pytest.approx(float(manual), rel=1e-14)
    targets[0, :2] = -100
    manual = -sum(logp[b, t, targets[b, t]] for b in range(3) for t in range(4)
                  if targets[b, t] >= 0) / 10
    assert float(token_cross_entropy(logits, targets)) == pytest.approx(float(manual), rel=1e-14)
    with pytest.raises(ValueError, match="must agree in their leading dimensions"):
        token_cross_entropy(logits, targets[:, :3])


def test_text_sequences_cover_every_token_once():
    text = "abracadabra, said the cat. " * 3
    train = load_text(text, "train", "t", context_length=5, test_fraction=0.25)
    test = load_text(text, "test", "t", context_length=5, test_fraction=0.25)
    assert train.vocabulary == test.vocabulary == "".join(sorted(set(text)))
    cut = len(text) - round(0.25 * len(text))
    n = (cut - 1) // 5
    assert train.inputs.shape == (n, 5) and train.num_tokens == 5 * n
    assert train.decode(train.inputs) == text[:5 * n]
    assert train.decode(train.targets) == text[1:5 * n + 1]
    assert test.decode(test.inputs[0]) == text[cut:cut + 5]
    assert train.input_shape == (5,) and train.num_outputs == len(set(text))
    x, y = token_sequences(torch.arange(11), 5)
    assert x.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]] and y[1].tolist() == [6, 7, 8, 9, 10]


def test_text_data_sets_by_name(tmp_path):
    pydoc = ts.load_dataset("pydoc-chars", block_size=16, max_chars=1601)
    assert isinstance(pydoc, TokenData) and pydoc.inputs.shape == (100, 16)
    assert "V=" in pydoc.name and pydoc.num_classes == len(pydoc.vocabulary) > 50
    file = tmp_path / "tiny.txt"
    file.write_text("hello world, hello tokens\n" * 4, encoding="utf-8")
    data = ts.load_dataset("text", path=str(file), context_length=4)
    assert data.vocabulary == "".join(sorted(set(file.read_text())))
    assert ts.load_dataset("text", root=str(tmp_path), path="tiny.txt", block_size=4).name \
        == data.name
    with pytest.raises(ValueError, match="the text data set needs path=FILE"):
        ts.load_dataset("text")
    with pytest.raises(FileNotFoundError, match="text data: no file"):
        ts.load_dataset("text", path=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="make no sequence of context_length 64"):
        ts.load_dataset("text", path=str(file), max_chars=10)
    with pytest.raises(ValueError, match="'pydoc-chars' has splits train, test; got 'all'"):
        ts.load_dataset("pydoc-chars", split="all")
    with pytest.raises(ValueError, match=r"int64 token ids \(n, T\)"):
        TokenData(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), 4, "bad")


def test_operator_on_token_data_is_the_mean_over_all_tokens():
    """Sequences chunked unevenly (7 = 3 + 3 + 1): the operator's loss and gradient are those of
    the cross-entropy over all 7·T tokens at once."""
    text = "the quick brown fox jumps over the lazy dog; " * 2
    data = load_text(text, "train", "fox", context_length=8, test_fraction=0.1)
    assert len(data) == 10
    model = ts.build_model("gpt", (8,), data.num_outputs, n_layer=1, n_head=2, n_embd=4, seed=1)
    X, Y = data.tensors
    op = ts.HessianOperator(model, token_cross_entropy, (X, Y), dtype=F64, batch_size=3)
    loss, g = op.loss_and_gradient()
    whole = copy.deepcopy(model).double()
    expected = token_cross_entropy(whole(X), Y)
    grads = torch.autograd.grad(expected, list(whole.parameters()))
    assert loss == pytest.approx(float(expected.detach()), rel=1e-12)
    assert _rel(g, torch.cat([t.reshape(-1) for t in grads])) < 1e-12


def test_context_length_and_its_old_name_block_size():
    """The GPT's positions are ``context_length`` (issue 22: "block" is the Lanczos block);
    ``block_size`` still works as a keyword and as the config key ``data.block_size``."""
    from tinysubspace.experiments.catalog import load_experiment
    from tinysubspace.experiments.config import ExperimentConfig, apply_overrides
    new = ts.build_model("gpt", (4,), 5, context_length=6, n_embd=8, n_head=2)
    old = ts.build_model("gpt", (4,), 5, block_size=6, n_embd=8, n_head=2)
    for model in (new, old):
        assert model.context_length == 6 and model.wpe.weight.shape == (6, 8)
        assert sum(p.numel() for p in model.parameters()) == gpt_parameter_count(5, 6, 2, 8)
    with pytest.raises(TypeError, match="context_length=6 and its old name block_size=6 both"):
        build_gpt((4,), 5, context_length=6, block_size=6)
    ids = torch.arange(11)
    x, y = token_sequences(ids, block_size=3)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]] and y.tolist()[0] == [1, 2, 3]
    assert all(torch.equal(a, b) for a, b in zip((x, y), token_sequences(ids, 3), strict=True))
    with pytest.raises(ValueError, match="context_length must be a positive integer, got 0"):
        token_sequences(ids, 0)
    config = apply_overrides(ExperimentConfig(), {"data.block_size": "12"})
    assert config.data.context_length == 12
    assert load_experiment("gpt-char-pydoc").data.context_length == 32  # shipped TOML: new key
