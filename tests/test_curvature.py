"""Per-example squared gradients against an autograd loop over the examples, and the
reparameterisation Hessian estimate."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyvarinf2
from pyvarinf2.curvature import (PerExampleSquaredGradients, per_example_squared_gradients,
                                 reparam_hessian_estimate)


def loop_reference(model, loss_fn, x, y, names=None, reduction_scale=1.0):
    """Σ_i g_i² from B separate backward passes (example i alone in the batch)."""
    params = dict(model.named_parameters())
    names = names or [n for n, p in params.items() if p.requires_grad]
    out = {n: torch.zeros_like(params[n]) for n in names}
    for i in range(x.shape[0]):
        loss = loss_fn(model(x[i:i + 1]), y[i:i + 1]) * reduction_scale
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                out[n] += g * g
    return out


def assert_close_dict(got, ref, rtol=1e-9, atol=1e-12):
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=rtol, atol=atol, msg=n)


def ce(out, y):
    return F.cross_entropy(out, y)


class GruHead(nn.Module):
    """A GRU (torch.func path: no closed form) and a Linear head on its last step."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


class Flatten(nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], -1)


def check_model(model, x, y, loss_fn=ce, **kw):
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    with PerExampleSquaredGradients(model, **kw) as sq:
        sq.verify = True
        loss_fn(model(x), y).backward()
    sums, batch = sq.result(), sq.batch_size
    # the plain per-example sums are the gradient (what the optimizers check on step 1)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sq.gradient_mismatch(grads, rtol=1e-9) == []
    ref = loop_reference(model, loss_fn, x, y)
    assert batch == x.shape[0]
    assert_close_dict(sums, ref)
    # the collector leaves the ordinary gradients of the mean loss in .grad
    return sums


def test_linear_matches_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))
    check_model(model, torch.randn(9, 7), torch.randint(0, 3, (9,)))


def test_linear_bias_false_and_sequence_dims():
    torch.manual_seed(1)

    class SeqModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6, bias=False)
            self.b = nn.Linear(6, 3)

        def forward(self, x):            # x: (B, T, 4); the time steps are summed per example
            return self.b(torch.tanh(self.a(x))).mean(1)

    check_model(SeqModel(), torch.randn(5, 8, 4), torch.randint(0, 3, (5,)))


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1), dict(dilation=2, padding=2),
                                dict(groups=2, padding=1, bias=False), dict(stride=2),
                                dict(stride=(2, 3), dilation=(1, 2), padding=(0, 1))])
def test_conv2d_matches_loop(kw):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, **kw), nn.ReLU(), Flatten())
    with torch.no_grad():
        n_out = model(torch.zeros(1, 4, 10, 10)).shape[1]
    model.append(nn.Linear(n_out, 3))
    check_model(model, torch.randn(6, 4, 10, 10), torch.randint(0, 3, (6,)))


def test_conv1d_matches_loop():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv1d(3, 4, 3, stride=2, padding=1), nn.ReLU(), Flatten(),
                          nn.Linear(4 * 5, 2))
    check_model(model, torch.randn(5, 3, 10), torch.randint(0, 2, (5,)))


def test_batchnorm_eval_matches_loop():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), Flatten(),
                          nn.Linear(3 * 16, 4), nn.BatchNorm1d(4))
    model.double()
    with torch.no_grad():          # non-trivial running statistics and affine parameters
        for _ in range(3):
            model(torch.randn(8, 2, 6, 6, dtype=torch.float64) * 2 + 1)
        for m in model:
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.normal_()
                m.bias.normal_()
    model.eval()
    check_model(model, torch.randn(7, 2, 6, 6), torch.randint(0, 4, (7,)))


def test_batchnorm_train_uses_batch_statistics_as_constants():
    torch.manual_seed(5)
    conv, bn, fc = nn.Conv2d(2, 3, 3).double(), nn.BatchNorm2d(3).double(), \
        nn.Linear(3 * 16, 4).double()
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
    model = nn.Sequential(conv, bn, nn.ReLU(), Flatten(), fc).train()
    x = torch.randn(6, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    sums, _ = per_example_squared_gradients(model, lambda o: ce(o, y), x,
                                            param_names=["1.weight", "1.bias"])
    with torch.no_grad():
        h = conv(x)
        mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
    ref = {"1.weight": torch.zeros(3, dtype=torch.float64),
           "1.bias": torch.zeros(3, dtype=torch.float64)}
    for i in range(6):
        hi = F.batch_norm(conv(x[i:i + 1]), mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)
        loss = ce(fc(F.relu(hi).reshape(1, -1)), y[i:i + 1])
        gw, gb = torch.autograd.grad(loss, [bn.weight, bn.bias])
        ref["1.weight"] += gw * gw
        ref["1.bias"] += gb * gb
    assert_close_dict(sums, ref)


def test_layernorm_and_groupnorm_match_loop():
    torch.manual_seed(6)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3)
            self.gn = nn.GroupNorm(2, 4)
            self.ln = nn.LayerNorm([4, 4])
            self.fc = nn.Linear(64, 3)

        def forward(self, x):
            return self.fc(self.ln(torch.tanh(self.gn(self.conv(x)))).reshape(x.shape[0], -1))

    m = M()
    with torch.no_grad():
        for p in list(m.gn.parameters()) + list(m.ln.parameters()):
            p.normal_()
    check_model(m, torch.randn(5, 2, 6, 6), torch.randint(0, 3, (5,)))


def test_embedding_matches_loop_with_repeats_and_padding():
    torch.manual_seed(7)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 4, padding_idx=0)
            self.fc = nn.Linear(4, 3)

        def forward(self, idx):
            return self.fc(torch.tanh(self.emb(idx)).sum(1))

    idx = torch.tensor([[1, 2, 2, 0], [3, 3, 3, 5], [0, 0, 4, 1], [5, 1, 2, 3]])
    sums = check_model(M(), idx, torch.randint(0, 3, (4,)))
    assert torch.all(sums["emb.weight"][0] == 0)        # padding row never gets a gradient


def test_module_called_twice_adds_per_example_gradients_before_squaring():
    torch.manual_seed(8)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(5, 5)
            self.out = nn.Linear(5, 2)

        def forward(self, x):
            return self.out(self.shared(torch.tanh(self.shared(x))))

    check_model(Twice(), torch.randn(6, 5), torch.randint(0, 2, (6,)))


class Scale(nn.Module):
    """A user module with its own parameter and a child: handled by torch.func."""

    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(n))
        self.inner = nn.Linear(n, n)

    def forward(self, x):
        return self.inner(x) * self.scale + x.pow(2) * self.scale.sin()


@pytest.mark.parametrize("kind", ["custom", "conv3d", "convtranspose2d", "prelu", "bilinear",
                                  "gru", "lstm_seq_first", "attention"])
def test_fallback_torch_func_matches_loop(kind):
    torch.manual_seed(9)
    if kind == "custom":
        model, x = nn.Sequential(Scale(4), nn.Linear(4, 3)), torch.randn(5, 4)
    elif kind == "conv3d":
        model = nn.Sequential(nn.Conv3d(2, 3, 2), Flatten(), nn.Linear(3 * 27, 3))
        x = torch.randn(4, 2, 4, 4, 4)
    elif kind == "convtranspose2d":
        model = nn.Sequential(nn.ConvTranspose2d(2, 3, 3, stride=2), Flatten(),
                              nn.Linear(3 * 49, 3))
        x = torch.randn(4, 2, 3, 3)
    elif kind == "prelu":
        model = nn.Sequential(nn.Linear(4, 6), nn.PReLU(6), nn.Linear(6, 3))
        x = torch.randn(5, 4)
    elif kind == "bilinear":
        class Bi(nn.Module):
            def __init__(self):
                super().__init__()
                self.bi = nn.Bilinear(4, 4, 3)

            def forward(self, x):
                return self.bi(x, x.flip(1))

        model, x = Bi(), torch.randn(5, 4)
    elif kind == "lstm_seq_first":
        class Lstm(nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn = nn.LSTM(3, 4)                 # (T, B, features)
                self.fc = nn.Linear(4, 3)

            def forward(self, x):
                out, (h, c) = self.rnn(x.transpose(0, 1))
                return self.fc(h[-1] + out.mean(0))

        model, x = Lstm(), torch.randn(4, 5, 3)
    elif kind == "attention":
        class Att(nn.Module):
            def __init__(self):
                super().__init__()
                self.att = nn.MultiheadAttention(4, 2, batch_first=True)
                self.fc = nn.Linear(4, 3)

            def forward(self, x):
                out, w = self.att(x, x, x)
                return self.fc(out.mean(1)) + w.sum((1, 2))[:, None]

        model, x = Att(), torch.randn(5, 6, 4)
    else:
        model, x = GruHead(), torch.randn(4, 5, 3)
    check_model(model, x, torch.randint(0, 3, (x.shape[0],)))


class _MaskedLinear(nn.Linear):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.register_buffer("mask", (torch.rand(self.weight.shape) > 0.5).float())

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class _StandardisedConv2d(nn.Conv2d):
    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _LowRankLinear(nn.Linear):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.u = nn.Parameter(0.3 * torch.randn(2, self.in_features))
        self.v = nn.Parameter(0.3 * torch.randn(self.out_features, 2))

    def forward(self, x):
        return super().forward(x) + x @ self.u.t() @ self.v.t()


class _ScaledEmbedding(nn.Embedding):
    def forward(self, idx):
        return super().forward(idx) * 2.0


class _EmbeddingHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = _ScaledEmbedding(6, 3)
        self.h = nn.Linear(3, 3)

    def forward(self, idx):
        return self.h(torch.tanh(self.e(idx)).sum(1))


@pytest.mark.parametrize("kind", ["masked linear", "standardised conv", "low-rank linear",
                                  "scaled embedding"])
def test_subclasses_with_their_own_forward_are_not_given_the_closed_forms(kind):
    # a subclass of Linear/Conv2d/Embedding that redefines forward computes something else:
    # the plain layer's closed form would be silently wrong (masked Linear 1.67 against 0.95,
    # standardised conv 2.74 against 177), and extra parameters would be missed
    torch.manual_seed(0)
    y = torch.randint(0, 3, (5,))
    if kind == "masked linear":
        model, x = nn.Sequential(_MaskedLinear(4, 6), nn.Tanh(), nn.Linear(6, 3)), torch.randn(5, 4)
    elif kind == "low-rank linear":
        model, x = nn.Sequential(_LowRankLinear(4, 6), nn.Tanh(), nn.Linear(6, 3)), torch.randn(5, 4)
    elif kind == "standardised conv":
        model = nn.Sequential(_StandardisedConv2d(2, 4, 3), nn.Tanh(), Flatten(),
                              nn.Linear(4 * 4 * 4, 3))
        x = torch.randn(5, 2, 6, 6)
    else:
        model, x = _EmbeddingHead(), torch.randint(0, 6, (5, 4))
    check_model(model, x, y)


def test_sum_reduction_and_subset_of_parameters():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    sums, _ = per_example_squared_gradients(
        model, lambda o: F.cross_entropy(o, y, reduction="sum"), x,
        param_names=["2.weight"], loss_reduction="sum")
    ref = loop_reference(model, ce, x, y, names=["2.weight"])
    assert_close_dict(sums, ref)
    # the mean-reduction result differs by nothing, the wrong reduction by a factor B^2
    wrong, _ = per_example_squared_gradients(
        model, lambda o: F.cross_entropy(o, y, reduction="sum"), x, param_names=["2.weight"])
    torch.testing.assert_close(wrong["2.weight"], 36 * ref["2.weight"])


def test_not_the_squared_minibatch_gradient():
    torch.manual_seed(11)
    model = nn.Linear(6, 3).double()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    sums, batch = per_example_squared_gradients(model, lambda o: ce(o, y), x)
    fisher = sums["weight"] / batch
    squared_mean_grad = model.weight.grad ** 2
    # Jensen: the mean of squares exceeds the square of the mean, here by a lot
    assert torch.all(fisher >= squared_mean_grad - 1e-12)
    assert fisher.sum() > 5 * squared_mean_grad.sum()


def test_variational_model_uses_sampled_weights():
    torch.manual_seed(12)
    from torch.func import functional_call
    net2 = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    vm2 = pyvarinf2.variationalize(net2, init_std=0.5)
    x2, y2 = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 2, (7,))
    torch.manual_seed(321)
    with PerExampleSquaredGradients(vm2) as sq2:
        ce(vm2(x2), y2).backward()
    assert sq2.batch_size == 7
    torch.manual_seed(321)                 # the same draw again
    sample2 = {n: t.detach().requires_grad_(True) for n, t in vm2.sample_parameters().items()}
    ref2 = {n: torch.zeros_like(t) for n, t in sample2.items()}
    for i in range(7):
        loss = ce(functional_call(net2, sample2, (x2[i:i + 1],)), y2[i:i + 1])
        for n, g in zip(sample2, torch.autograd.grad(loss, list(sample2.values()))):
            ref2[n] += g * g
    assert_close_dict(sq2.result(), ref2)
    # at the means the answer differs (so the sample really was used)
    mean_sums, _ = per_example_squared_gradients(net2, lambda o: ce(o, y2), x2)
    assert not torch.allclose(mean_sums["0.weight"], ref2["0.weight"])


def test_accumulates_over_forwards_until_reset_and_ignores_no_grad():
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    sq = PerExampleSquaredGradients(model).attach()
    with torch.no_grad():
        model(x)                                    # nothing recorded
    ce(model(x[:4]), y[:4]).backward()
    ce(model(x[4:]), y[4:]).backward()
    assert sq.batch_size == 10
    assert_close_dict(sq.result(), loop_reference(model, ce, x, y))
    sq.reset()
    assert sq.result() == {} and sq.batch_size == 0
    model(x)                                        # forward without backward: dropped
    assert sq.result() == {}
    sq.detach()
    ce(model(x), y).backward()
    assert sq.result() == {}


def test_bad_arguments():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="loss_reduction"):
        PerExampleSquaredGradients(model, loss_reduction="avg")
    with pytest.raises(ValueError, match="unknown parameter"):
        PerExampleSquaredGradients(model, param_names=["nope"])
    with pytest.raises(TypeError):
        PerExampleSquaredGradients(object())


def test_reparam_hessian_estimate_is_unbiased_on_a_quadratic():
    torch.manual_seed(14)
    h = torch.tensor([0.5, 2.0, 10.0], dtype=torch.float64)
    mu = torch.tensor([1.0, -1.0, 0.3], dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    eps = torch.randn(200000, 3, dtype=torch.float64)
    theta = mu + sigma * eps
    grad = h * (theta - 0.2)                        # ∇ of ½ h (θ - 0.2)²
    est = reparam_hessian_estimate(grad, eps, sigma).mean(0)
    torch.testing.assert_close(est, h, rtol=0.02, atol=0.0)


# ----------------------------------------------------------------------------- true Fisher
def _true_fisher_reference(model, x, seed, likelihood="categorical", obs_noise=1.0):
    """Σ_i g_i² with labels drawn from the model's predictive exactly as the collector draws
    them (same generator state, same calls), from B separate backward passes."""
    torch.manual_seed(seed)
    with torch.no_grad():
        f = model(x)
        if likelihood == "categorical":
            y = torch.multinomial(torch.softmax(f.float(), -1), 1).reshape(-1)
            loss_fn = ce
        else:
            y = f + obs_noise * torch.randn_like(f)

            def loss_fn(out, t):
                return 0.5 * (((out - t) / obs_noise) ** 2).sum() / out.shape[0]
    return loop_reference(model, loss_fn, x, y)


@pytest.mark.parametrize("kind", ["mlp_inplace_relu", "conv", "gru", "gaussian"])
def test_true_fisher_matches_loop_with_sampled_labels(kind):
    torch.manual_seed(3)
    likelihood, noise = "categorical", 1.0
    if kind == "mlp_inplace_relu":
        # the in-place ReLU would overwrite the hooked output without the collector's copy
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 4))
        x = torch.randn(7, 6)
    elif kind == "conv":
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), Flatten(),
                              nn.Linear(3 * 16, 3))
        x = torch.randn(5, 2, 4, 4)
    elif kind == "gru":
        model, x = GruHead(), torch.randn(4, 5, 3)
    else:
        likelihood, noise = "gaussian", 0.7
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
        x = torch.randn(9, 4)
    model, x = model.double(), x.double()
    y_user = torch.randint(0, 2, (x.shape[0],))
    sq = PerExampleSquaredGradients(model, fisher="true", likelihood=likelihood,
                                    obs_noise=noise)
    with sq:
        torch.manual_seed(11)
        out = model(x)
        # the user's own backward is untouched: ordinary gradients of the user's loss
        loss = F.cross_entropy(out, y_user) if likelihood == "categorical" else out.pow(2).mean()
        loss.backward()
    got = sq.result()
    assert sq.batch_size == x.shape[0]
    ref = _true_fisher_reference(model, x, 11, likelihood, noise)
    assert_close_dict(got, ref)
    user = dict(model.named_parameters())
    ref_user = torch.autograd.grad(
        F.cross_entropy(model(x), y_user) if likelihood == "categorical"
        else model(x).pow(2).mean(), list(user.values()))
    for (n, p), g in zip(user.items(), ref_user):
        torch.testing.assert_close(p.grad, g, msg=n)


def test_true_fisher_averages_to_the_gauss_newton_diagonal():
    """E_ỹ[g_i(ỹ)²] = Σ_k p_ik g_i(k)²: the diagonal of the generalised Gauss-Newton matrix."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    params = dict(model.named_parameters())
    ggn = {n: torch.zeros_like(p) for n, p in params.items()}
    probs = torch.softmax(model(x), -1).detach()
    for i in range(x.shape[0]):
        for k in range(3):
            g = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), torch.tensor([k])),
                                    list(params.values()))
            for n, gi in zip(params, g):
                ggn[n] += probs[i, k] * gi * gi
    sq = PerExampleSquaredGradients(model, fisher="true").attach()
    draws = 3000
    for _ in range(draws):
        model(x)
    got = sq.result()
    sq.detach()
    assert sq.batch_size == 0   # detach resets
    for n in ggn:
        torch.testing.assert_close(got[n] / draws, ggn[n], rtol=0.1, atol=1e-3, msg=n)


def test_true_fisher_bad_arguments_and_outputs():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="fisher"):
        PerExampleSquaredGradients(model, fisher="exact")
    with pytest.raises(ValueError, match="likelihood"):
        PerExampleSquaredGradients(model, fisher="true", likelihood="poisson")
    with pytest.raises(ValueError, match="loss_reduction"):
        PerExampleSquaredGradients(model, fisher="true", loss_reduction="sum")

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x), x

    m = Pair()
    sq = PerExampleSquaredGradients(m, fisher="true").attach()
    with pytest.raises(TypeError, match="one tensor"):
        m(torch.randn(3, 2))
    sq.detach()


def test_tied_weights_across_modules_warn_and_different_batch_sizes_raise():
    # a weight used by two modules: each use's per-example gradients are squared separately
    # (no cross terms), which is announced; a module run on inputs of different batch sizes
    # in one forward has no per-example gradients at all: a clear error instead of a silent
    # broadcast (1 row against B) or a shape error deep inside backward
    torch.manual_seed(0)

    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    with pytest.warns(UserWarning, match=r"\['0.weight'\] are used by several modules"):
        coll = PerExampleSquaredGradients(
            nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), nn.Linear(4, 3)), average=False)
    assert coll.shared == ["0.weight"]

    for k in (1, 3):
        model = nn.Module()                    # an encoder run on the batch and on k prototypes
        model.enc, model.p = nn.Linear(4, 3), nn.Parameter(torch.randn(k, 4))
        model.forward = lambda x, m=model: m.enc(x) @ m.enc(m.p).t()
        with pytest.raises(RuntimeError, match=rf"ran on inputs with \[{k}, 5\] examples"):
            per_example_squared_gradients(model, lambda out: out.pow(2).mean(),
                                          torch.randn(5, 4))


def test_the_plain_sums_expose_a_parameter_used_outside_its_module_or_random_fallbacks():
    # what the squared sums cannot show, the plain sums do: a weight also used outside its
    # module's forward, or a torch.func module whose recomputed forward draws another dropout
    # mask, gives per-example gradients that do not add up to the gradient
    torch.manual_seed(0)

    reused = nn.Module()                                # logits over the embedding's rows
    reused.emb, reused.mix = nn.Embedding(6, 4), nn.Linear(4, 4)
    reused.forward = lambda idx, m=reused: F.linear(torch.tanh(m.mix(m.emb(idx).mean(1))),
                                                    m.emb.weight)

    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return F.dropout(x * self.scale, 0.5, self.training)

    cases = [(reused.double(), torch.randint(0, 6, (5, 3)), torch.randint(0, 6, (5,)),
              "emb.weight"),
             (nn.Sequential(Noisy(), nn.Linear(4, 3)).double(), torch.randn(5, 4).double(),
              torch.randint(0, 3, (5,)), "0.scale")]
    for model, x, y, culprit in cases:
        with PerExampleSquaredGradients(model) as sq:
            sq.verify = True
            F.cross_entropy(model(x), y).backward()
        bad = sq.gradient_mismatch({n: p.grad for n, p in model.named_parameters()})
        assert [n for n, _ in bad] == [culprit]
        assert bad[0][1] > 0.01


def test_a_torch_func_module_normalising_with_batch_statistics_is_refused_clearly():
    # a user module with its own parameter and a BatchNorm child in training mode has no
    # closed form; recomputed one example at a time it would normalise with that example's
    # statistics (and torch.func refuses the running-statistics update deep inside backward)
    torch.manual_seed(0)
    block = nn.Module()
    block.gain, block.bn = nn.Parameter(torch.randn(3)), nn.BatchNorm2d(3)
    block.forward = lambda x: block.bn(x) * block.gain.view(1, 3, 1, 1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), block, Flatten(), nn.Linear(3 * 16, 3))
    with pytest.raises(RuntimeError, match=r"normalises with batch statistics.*\['bn'\]"):
        per_example_squared_gradients(model, lambda out: F.cross_entropy(out, torch.zeros(
            4, dtype=torch.long)), torch.randn(4, 2, 6, 6), param_names=["1.gain"])
    block.eval()                               # running statistics: fine, and exact
    model.zero_grad()                          # (the refused backward left partial grads)
    check_model(model, torch.randn(4, 2, 6, 6), torch.randint(0, 3, (4,)))


@pytest.mark.parametrize("kind", ["gru layers == batch", "attention T == batch",
                                  "keyword input"])
def test_batch_dimensions_that_size_alone_cannot_tell(kind):
    # an RNN's h_n is (layers, B, H) and MultiheadAttention's weights (B, T, S): guessing the
    # batch dimension by size picked the wrong one when layers or T equal B; a layer called
    # as layer(input=x) has its input in the keyword arguments
    torch.manual_seed(0)
    B = 4
    if kind == "gru layers == batch":
        model = nn.Module()
        model.rnn, model.fc = nn.GRU(3, 4, num_layers=B, batch_first=True), nn.Linear(4, 3)

        def forward(x, m=model):
            out, h = m.rnn(x)
            return m.fc(h[-1] + out[:, 0])
        x = torch.randn(B, 5, 3)
    elif kind == "attention T == batch":
        model = nn.Module()
        model.att, model.fc = nn.MultiheadAttention(4, 2), nn.Linear(4, 3)   # (T, B, E)

        def forward(x, m=model):
            out, w = m.att(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1))
            return m.fc(out.mean(0)) + w.sum((1, 2))[:, None]
        x = torch.randn(B, B, 4)
    else:
        model = nn.Module()
        model.a, model.b = nn.Linear(5, 6), nn.Linear(6, 3)

        def forward(x, m=model):
            return m.b(input=torch.tanh(m.a(input=x)))
        x = torch.randn(B, 5)
    model.forward = forward
    check_model(model, x, torch.randint(0, 3, (B,)))


@pytest.mark.parametrize("pieces", [[3, 3], [2, 4], [2, 2, 2]])
def test_a_layer_run_on_pieces_of_the_batch_matches_one_call(pieces):
    # per-example gradients of a layer run on x[:3] and x[3:] are those of six examples (not
    # of three examples seen twice, which equal pieces used to be taken for)
    torch.manual_seed(0)
    model = nn.Module()
    model.a, model.b = nn.Linear(5, 6), nn.Linear(6, 3)
    cuts = [sum(pieces[:k + 1]) for k in range(len(pieces) - 1)]   # (the loop reference
    model.forward = lambda x, m=model: m.b(torch.cat([torch.tanh(m.a(p))  # runs single rows)
                                                      for p in torch.tensor_split(x, cuts)]))
    check_model(model, torch.randn(6, 5), torch.randint(0, 3, (6,)))


# ---------------------------------------------------------------------- float32 RNNs
class _LstmText(nn.Module):
    """Embedding -> LSTM -> Linear on the last step, h_n unused (as text classifiers do)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.rnn = nn.LSTM(6, 5, batch_first=True)
        self.fc = nn.Linear(5, 3)

    def forward(self, t):
        h, _ = self.rnn(self.emb(t))
        return self.fc(h[:, -1])


def test_float32_lstm_per_example_gradients_match_the_loop():
    # float32 on the CPU takes oneDNN's RNN kernels, whose backward fails under torch.func
    # ("Expected a proper Tensor but got None ... 'workspace'"); check_model runs in float64
    torch.manual_seed(0)
    model = _LstmText()
    t = torch.randint(0, 20, (5, 4))
    y = torch.randint(0, 3, (5,))
    with PerExampleSquaredGradients(model) as sq:
        sq.verify = True
        ce(model(t), y).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert sq.gradient_mismatch(grads) == []          # the unused h_n is no mismatch
    assert_close_dict(sq.result(), loop_reference(model, ce, t, y), rtol=1e-4, atol=1e-7)
    # a loss on h_n alone: the output sequence gets no gradient
    lstm = nn.LSTM(4, 5)
    sums, _ = per_example_squared_gradients(lstm, lambda o: o[1][0].sum(), torch.randn(3, 2, 4))
    assert set(sums) == {n for n, _ in lstm.named_parameters()}


@pytest.mark.parametrize("name", ["NoisyAdam", "VOGN", "NoisyKFAC"])
def test_optimizers_train_float32_rnn_and_attention_without_false_warnings(name):
    class Att(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            out, _ = self.att(x, x, x)        # the attention weights get no gradient
            return self.fc(out.mean(1))

    torch.manual_seed(0)
    for model, x in ((_LstmText(), torch.randint(0, 20, (6, 4))), (Att(), torch.randn(6, 5, 8))):
        vm = pyvarinf2.variationalize(model)
        opt = getattr(pyvarinf2.optim, name)(vm, dataset_size=60)
        y = torch.randint(0, 3, (6,))
        before = [p.detach().clone() for p in vm.mean_parameters()]
        with warnings.catch_warnings():
            warnings.simplefilter("error")    # no "do not add up" warning on step 1
            for _ in range(2):
                opt.zero_grad()
                F.cross_entropy(vm(x), y).backward()
                opt.step()
        assert any(not torch.equal(b, p) for b, p in zip(before, vm.mean_parameters()))
