"""K-FAC factors against autograd references, and the Kronecker posterior family."""
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import pyvarinf2
from pyvarinf2.kfac import KFACCapture, find_kfac_layers, kfac_factors
from pyvarinf2.kronecker import KroneckerPosterior, kronecker_posteriors, use_kronecker_posteriors

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny matrices: a second BLAS thread only adds contention on a shared 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _capture(var_model, x, loss_fn, fisher="empirical", **kw):
    """One armed forward (at the posterior means) + backward; returns {layer_index: (a, g)}."""
    layers = use_kronecker_posteriors(var_model)
    cap = KFACCapture(var_model, layers, fisher=fisher, **kw)
    cap.arm()
    var_model.eval()  # the means: the reference uses the same weights
    var_model.zero_grad()
    out = var_model(x)
    loss_fn(out).backward()
    got = cap.take()
    cap.remove()
    return layers, got


def _per_example_grads(model, x, y, loss=F.cross_entropy):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return loss(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    return vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)


def _homogeneous(gw, gb):
    g = gw.reshape(gw.shape[0], gw.shape[1], -1)
    if gb is not None:
        g = torch.cat([g, gb.unsqueeze(-1)], dim=-1)
    return g  # (B, out, n_in)


# ---------------------------------------------------------------------------- Linear
def _mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3, bias=False)).to(DT)


def test_linear_factors_match_autograd_per_example_reference():
    net = _mlp()
    vm = pyvarinf2.variationalize(net)
    x = torch.randn(7, 4, dtype=DT)
    y = torch.randint(0, 3, (7,))
    layers, got = _capture(vm, x, lambda out: F.cross_entropy(out, y))
    assert [la.path for la in layers] == ["0", "2"]
    assert [la.has_bias for la in layers] == [True, False]
    pe = _per_example_grads(net, x, y)
    h = torch.tanh(x @ net[0].weight.T + net[0].bias).detach()
    inputs = [torch.cat([x, torch.ones(7, 1, dtype=DT)], 1), h]
    per = [_homogeneous(pe["0.weight"], pe["0.bias"]), _homogeneous(pe["2.weight"], None)]
    for i, (a_in, g_i) in enumerate(zip(inputs, per)):
        a, g = got[i]
        A, S = kfac_factors(a, g)
        torch.testing.assert_close(A, a_in.T @ a_in / 7)
        # G_i = g_i a_iᵀ, so g_i g_iᵀ = G_i G_iᵀ / |a_i|²: the reference S from autograd alone
        s_ref = (g_i @ g_i.transpose(1, 2) / (a_in ** 2).sum(1)[:, None, None]).mean(0)
        torch.testing.assert_close(S, s_ref)


def test_linear_kronecker_product_is_the_exact_fisher_of_one_example():
    net = _mlp()
    vm = pyvarinf2.variationalize(net)
    x = torch.randn(1, 4, dtype=DT)
    y = torch.tensor([2])
    _, got = _capture(vm, x, lambda out: F.cross_entropy(out, y))
    pe = _per_example_grads(net, x, y)
    for i, g_ref in enumerate([_homogeneous(pe["0.weight"], pe["0.bias"]),
                               _homogeneous(pe["2.weight"], None)]):
        A, S = kfac_factors(*got[i])
        v = g_ref[0].reshape(-1)  # row-major vec of the homogeneous gradient
        torch.testing.assert_close(torch.kron(S, A), torch.outer(v, v))


def test_linear_on_sequences_treats_positions_as_locations():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).to(DT)
    vm = pyvarinf2.variationalize(lin)
    x = torch.randn(4, 5, 3, dtype=DT)
    _, got = _capture(vm, x, lambda out: (out ** 2).sum(dim=(1, 2)).mean())
    a, g = got[0]
    assert a.shape == (4, 5, 4) and g.shape == (4, 5, 2)
    # per-example gradient of the output: d/dout of out² summed = 2 out
    out = lin(x).detach()
    torch.testing.assert_close(g, 2 * out)
    A, S = kfac_factors(a, g)
    xa = torch.cat([x, torch.ones(4, 5, 1, dtype=DT)], -1).reshape(-1, 4)
    torch.testing.assert_close(A, xa.T @ xa / 4)
    torch.testing.assert_close(S, (2 * out).reshape(-1, 2).T @ (2 * out).reshape(-1, 2) / 20)


# ---------------------------------------------------------------------------- Conv2d
def _patches_by_loops(x, conv):
    """Input patches per output location by explicit slicing (no unfold)."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    ph, pw = conv.padding
    xp = F.pad(x, (pw, pw, ph, ph))
    B, C, H, W = xp.shape
    oh = (H - dh * (kh - 1) - 1) // sh + 1
    ow = (W - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * sh: i * sh + dh * (kh - 1) + 1: dh,
                       j * sw: j * sw + dw * (kw - 1) + 1: dw]
            rows.append(patch.reshape(B, -1))
    return torch.stack(rows, 1)  # (B, T, C*kh*kw), channel-major like weight.view(out, -1)


CONVS = [dict(kernel_size=3), dict(kernel_size=3, stride=2, padding=1, bias=False),
         dict(kernel_size=(2, 3), dilation=2, padding=(1, 2))]


@pytest.mark.parametrize("cfg", CONVS)
def test_conv2d_factors_match_autograd_reference(cfg):
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 4, **cfg).to(DT)
    net = nn.Sequential(conv, nn.Tanh(), nn.Flatten())
    x = torch.randn(3, 2, 7, 8, dtype=DT)
    with torch.no_grad():
        n_out = net(x).shape[1]
    head = nn.Linear(n_out, 3).to(DT)
    model = nn.Sequential(net, head)
    y = torch.tensor([0, 2, 1])
    vm = pyvarinf2.variationalize(model)
    layers, got = _capture(vm, x, lambda out: F.cross_entropy(out, y))
    assert layers[0].kind == "conv2d" and layers[0].has_bias == (conv.bias is not None)
    a, g = got[0]
    # reference activations: explicit patches (+ homogeneous 1)
    p = _patches_by_loops(x, conv)
    if conv.bias is not None:
        p = torch.cat([p, torch.ones(p.shape[:-1] + (1,), dtype=DT)], -1)
    torch.testing.assert_close(a, p)
    # reference output gradients: autograd of the summed per-example losses
    s = conv(x)
    s.retain_grad()
    F.cross_entropy(head(torch.tanh(s).flatten(1)), y, reduction="sum").backward()
    g_ref = s.grad.flatten(2).transpose(1, 2)
    torch.testing.assert_close(g, g_ref)
    A, S = kfac_factors(a, g)
    T = p.shape[1]
    torch.testing.assert_close(A, torch.einsum("bti,btj->ij", p, p) / 3)     # sum over locations
    torch.testing.assert_close(S, torch.einsum("bti,btj->ij", g_ref, g_ref) / (3 * T))  # mean
    # the captured (a, g) rebuild autograd's weight gradient of the mean loss: layout + scale
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    g_w = torch.einsum("bto,bti->oi", g, a) / 3
    torch.testing.assert_close(g_w[:, :conv.weight[0].numel()],
                               conv.weight.grad.reshape(4, -1))
    if conv.bias is not None:
        torch.testing.assert_close(g_w[:, -1], conv.bias.grad)


class _SplitConvNet(nn.Module):
    """A Conv2d + Linear head, run on the whole batch or on it in pieces of given sizes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.head = nn.Linear(3 * 4 * 4, 3)
        self.pieces = None

    def forward(self, x):
        if self.pieces is None:
            return self.head(torch.tanh(self.conv(x)).flatten(1))
        return torch.cat([self.head(torch.tanh(self.conv(p)).flatten(1))
                          for p in x.split(self.pieces)])


@pytest.mark.parametrize("eigen", [False, True], ids=["kfac", "ekfac-squares"])
def test_a_batch_split_across_calls_gives_the_whole_batch_factors(eigen):
    """A layer called on pieces of the batch (2 + 3 examples) sees the same examples as one
    call on all 5: the factors (A summed over locations, per-example output gradients scaled
    by the loss's 5, not by each piece's size) and EK-FAC's per-example projected squares
    must be those of the one call."""
    from pyvarinf2.optim.noisy_kfac import _projected_squares
    torch.manual_seed(0)
    model = _SplitConvNet().to(DT)
    x = torch.randn(5, 2, 6, 6, dtype=DT)
    y = torch.tensor([0, 2, 1, 1, 0])
    results = []
    for pieces in (None, [2, 3], [3, 1, 1]):   # (equal pieces: see the next test)
        model.pieces = pieces
        vm = pyvarinf2.variationalize(model)
        _, got = _capture(vm, x, lambda out: F.cross_entropy(out, y))
        results.append(got)
    for got in results[1:]:
        for i in (0, 1):
            (a0, g0), (a1, g1) = results[0][i], got[i]
            if eigen:
                q_a = torch.linalg.qr(torch.randn(a0.shape[-1], a0.shape[-1], dtype=DT))[0]
                q_s = torch.linalg.qr(torch.randn(g0.shape[-1], g0.shape[-1], dtype=DT))[0]
                torch.testing.assert_close(_projected_squares(a1, g1, q_a, q_s),
                                           _projected_squares(a0, g0, q_a, q_s))
            else:
                for f0, f1 in zip(kfac_factors(a0, g0), kfac_factors(a1, g1)):
                    torch.testing.assert_close(f1, f0)


def test_calls_with_different_numbers_of_locations_sum_over_all_locations():
    """One Conv2d on two inputs of different sizes in one forward (3 and 2 examples, 16 and 9
    locations): every call's examples are examples of the layer, A sums over each one's
    locations (the shorter call padded with zero rows, which add nothing)."""
    torch.manual_seed(0)

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)

        def forward(self, x):
            u, v = self.conv(x[:, :, :, :6]), self.conv(x[:2, :, :5, 6:])
            return torch.cat([u.sum((2, 3)), v.sum((2, 3))])

    model = TwoInputs().to(DT)
    x = torch.randn(3, 2, 6, 11, dtype=DT)
    vm = pyvarinf2.variationalize(model)
    _, got = _capture(vm, x, lambda out: out.pow(2).mean())
    a, g = got[0]
    assert a.shape[:2] == (5, 16) and g.shape[:2] == (5, 16)
    p = torch.cat([_patches_by_loops(x[:, :, :, :6], model.conv).flatten(0, 1),
                   _patches_by_loops(x[:2, :, :5, 6:], model.conv).flatten(0, 1)])
    p = torch.cat([p, torch.ones(len(p), 1, dtype=DT)], -1)
    A, _ = kfac_factors(a, g)
    torch.testing.assert_close(A, p.T @ p / 5)
    # the gradient of the mean over the 5 outputs comes back per example (times 5)
    s_u = model.conv(x[:, :, :, :6])
    s_v = model.conv(x[:2, :, :5, 6:])
    s_u.retain_grad()
    s_v.retain_grad()
    torch.cat([s_u.sum((2, 3)), s_v.sum((2, 3))]).pow(2).mean().backward()
    ref = torch.cat([s_u.grad.flatten(2).transpose(1, 2).flatten(0, 1),
                     s_v.grad.flatten(2).transpose(1, 2).flatten(0, 1)]) * 5
    rows = g.reshape(-1, g.shape[-1])
    torch.testing.assert_close(rows[rows.abs().sum(1) > 0], ref)


def test_conv2d_single_location_kronecker_is_the_exact_fisher():
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, kernel_size=4).to(DT)  # 4x4 input: one output location
    model = nn.Sequential(conv, nn.Flatten())
    vm = pyvarinf2.variationalize(model)
    x = torch.randn(1, 2, 4, 4, dtype=DT)
    y = torch.tensor([1])
    _, got = _capture(vm, x, lambda out: F.cross_entropy(out, y))
    A, S = kfac_factors(*got[0])
    pe = _per_example_grads(model, x, y)
    v = _homogeneous(pe["0.weight"], pe["0.bias"])[0].reshape(-1)
    torch.testing.assert_close(torch.kron(S, A), torch.outer(v, v))


def test_conv2d_reflect_padding_patches():
    torch.manual_seed(4)
    conv = nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect", bias=False).to(DT)
    vm = pyvarinf2.variationalize(nn.Sequential(conv, nn.Flatten()))
    x = torch.randn(2, 1, 5, 5, dtype=DT)
    _, got = _capture(vm, x, lambda out: out.pow(2).sum(1).mean())
    a, g = got[0]
    xp = F.pad(x, (1, 1, 1, 1), mode="reflect")
    ref = nn.Conv2d(1, 2, 3, bias=False).to(DT)
    torch.testing.assert_close(a, _patches_by_loops(xp, ref))
    loss = conv(x).flatten(1).pow(2).sum(1).mean()
    torch.testing.assert_close(torch.einsum("bto,bti->oi", g, a) / 2,
                               torch.autograd.grad(loss, conv.weight)[0].reshape(2, -1))


# ---------------------------------------------------------------------------- true Fisher
def test_true_fisher_uses_labels_sampled_from_the_model():
    net = _mlp()
    vm = pyvarinf2.variationalize(net)
    x = torch.randn(6, 4, dtype=DT)
    layers = use_kronecker_posteriors(vm)
    cap = KFACCapture(vm, layers, fisher="true", likelihood="categorical")
    cap.arm()
    vm.eval()
    torch.manual_seed(11)
    out = vm(x)
    out.sum().backward()  # the user's loss plays no part in the true Fisher
    got = cap.take()
    with torch.no_grad():
        logits = net(x)
    torch.manual_seed(11)
    y = torch.multinomial(torch.softmax(logits, -1).float(), 1).squeeze(1)
    g_last = torch.softmax(logits, -1) - F.one_hot(y, 3).to(DT)
    torch.testing.assert_close(got[1][1][:, 0], g_last)
    # the lower layer: backprop of the same sampled labels, per example
    pe = _per_example_grads(net, x, y)
    torch.testing.assert_close(got[0][1][:, 0], pe["0.bias"])


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_true_fisher_is_unbiased_for_the_output_layer(likelihood):
    torch.manual_seed(5)
    lin = nn.Linear(3, 4).to(DT)
    vm = pyvarinf2.variationalize(lin)
    layers = use_kronecker_posteriors(vm)
    cap = KFACCapture(vm, layers, fisher="true", likelihood=likelihood, obs_noise=0.5)
    vm.eval()
    x = torch.randn(20, 3, dtype=DT)
    n = 300
    total = torch.zeros(4, 4, dtype=DT)
    for _ in range(n):
        cap.arm()
        vm(x)
        total += kfac_factors(*cap.take()[0])[1]
    S = total / n
    if likelihood == "categorical":
        p = torch.softmax(lin(x).detach(), -1)
        exact = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
        tol = 0.02
    else:
        exact = torch.eye(4, dtype=DT) / 0.25
        tol = 0.05 * 4  # relative 5% of 1/σ²
    assert (S - exact).abs().max() < tol, (S, exact)


# ---------------------------------------------------------------------------- the posterior
def _random_spd(n, gen):
    m = torch.randn(n, n, dtype=DT, generator=gen)
    return m @ m.T / n + 0.3 * torch.eye(n, dtype=DT)


def test_samples_have_the_matrix_variate_covariance():
    gen = torch.Generator().manual_seed(0)
    post = KroneckerPosterior("w", (3, 2), "b", dtype=DT)  # n_in = 3 with the bias
    A, S = _random_spd(3, gen), _random_spd(3, gen)
    d_a, q_a = torch.linalg.eigh(A)
    d_s, q_s = torch.linalg.eigh(S)
    c = 0.7  # λ/N
    post.set_state(basis_out=q_s, basis_in=q_a, std=torch.sqrt(c / torch.outer(d_s, d_a)))
    # analytic, independently of the posterior's code: W = M + sqrt(c) S^{-1/2} E A^{-1/2},
    # Cov(W_ij, W_kl) = c (S⁻¹)_ik (A⁻¹)_jl, i.e. c·kron(S⁻¹, A⁻¹) for the row-major vec
    cov = c * torch.kron(torch.linalg.inv(S), torch.linalg.inv(A))
    torch.testing.assert_close(post.covariance(), cov)
    means = [torch.randn(3, 2, dtype=DT), torch.randn(3, dtype=DT)]
    n = 20000
    draws = torch.stack([post.matrix(post.sample(means)).reshape(-1) for _ in range(n)])
    emp = torch.cov(draws.T)
    se = torch.sqrt((torch.outer(cov.diag(), cov.diag()) + cov ** 2) / n)
    assert ((emp - cov).abs() / se).max() < 5.0
    mean_err = (draws.mean(0) - post.matrix(means).reshape(-1)).abs() / (cov.diag() / n).sqrt()
    assert mean_err.max() < 5.0


def test_marginal_variance_and_entropy_match_dense_formulas():
    gen = torch.Generator().manual_seed(1)
    post = KroneckerPosterior("w", (2, 3), None, dtype=DT)
    q_s = torch.linalg.qr(torch.randn(2, 2, dtype=DT, generator=gen))[0]
    q_a = torch.linalg.qr(torch.randn(3, 3, dtype=DT, generator=gen))[0]
    std = torch.rand(2, 3, dtype=DT, generator=gen) + 0.1
    post.set_state(basis_out=q_s, basis_in=q_a, std=std)
    cov = post.covariance()
    torch.testing.assert_close(post.marginal_variance().reshape(-1), cov.diag())
    mvn = torch.distributions.MultivariateNormal(torch.zeros(6, dtype=DT), cov)
    torch.testing.assert_close(post.entropy(), mvn.entropy())


@pytest.mark.parametrize("bias", [True, False])
def test_closed_form_kl_matches_dense_gaussians(bias):
    gen = torch.Generator().manual_seed(2)
    post = KroneckerPosterior("w", (3, 2, 2, 1), "b" if bias else None, dtype=DT)
    n_in = 4 + int(bias)
    q_s = torch.linalg.qr(torch.randn(3, 3, dtype=DT, generator=gen))[0]
    q_a = torch.linalg.qr(torch.randn(n_in, n_in, dtype=DT, generator=gen))[0]
    std = 0.2 * torch.rand(3, n_in, dtype=DT, generator=gen) + 0.05
    post.set_state(basis_out=q_s, basis_in=q_a, std=std)
    means = [torch.randn(3, 2, 2, 1, dtype=DT, generator=gen)]
    priors = [pyvarinf2.GaussianPrior(mean=0.1)]  # PyVarInf's std: 1/sqrt(fan_in = 4)
    var_p = [0.25] * 4
    if bias:
        means.append(torch.randn(3, dtype=DT, generator=gen))
        priors.append(pyvarinf2.GaussianPrior(std=2.0, mean=-0.3))
        var_p.append(4.0)
    kl = post.kl(means, priors)
    m_p = torch.tensor([0.1] * 4 + ([-0.3] if bias else []), dtype=DT).repeat(3)
    q = torch.distributions.MultivariateNormal(post.matrix(means).reshape(-1), post.covariance())
    p = torch.distributions.MultivariateNormal(
        m_p, torch.diag(torch.tensor(var_p, dtype=DT).repeat(3)))
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(q, p))
    # differentiable in the means (Bayes-by-backprop on the means works)
    m0 = means[0].clone().requires_grad_(True)
    post.kl([m0] + means[1:], priors).backward()
    torch.testing.assert_close(m0.grad, (m0.detach() - 0.1) / 0.25)


def test_monte_carlo_kl_for_a_non_gaussian_prior_is_unbiased():
    gen = torch.Generator().manual_seed(3)
    post = KroneckerPosterior("w", (2, 2), "b", dtype=DT)
    q_s = torch.linalg.qr(torch.randn(2, 2, dtype=DT, generator=gen))[0]
    q_a = torch.linalg.qr(torch.randn(3, 3, dtype=DT, generator=gen))[0]
    post.set_state(basis_out=q_s, basis_in=q_a,
                   std=0.3 * torch.rand(2, 3, dtype=DT, generator=gen) + 0.1)
    means = [torch.randn(2, 2, dtype=DT, generator=gen), torch.randn(2, dtype=DT, generator=gen)]
    mix = pyvarinf2.MixtureGaussianPrior(n_mc_samples=1, sigma_1=1.0, sigma_2=0.1, pi=0.3)
    gauss = pyvarinf2.GaussianPrior(std=1.5)
    estimates = torch.stack([post.kl(means, [mix, gauss]) for _ in range(4000)])
    # independent: dense q, E_q[log p] from its own samples, exact entropy
    q = torch.distributions.MultivariateNormal(post.matrix(means).reshape(-1), post.covariance())
    z = q.sample((200000,)).reshape(-1, 2, 3)
    log_mix = torch.logaddexp(
        math.log(0.3) + torch.distributions.Normal(0.0, 1.0).log_prob(z[:, :, :2]),
        math.log(0.7) + torch.distributions.Normal(0.0, 0.1).log_prob(z[:, :, :2])).sum((1, 2))
    log_gauss = torch.distributions.Normal(0.0, 1.5).log_prob(z[:, :, 2]).sum(1)
    ref = -(log_mix + log_gauss).mean() - q.entropy()
    se = estimates.std() / math.sqrt(len(estimates))
    assert abs(estimates.mean() - ref) < 5 * se + 0.01


# ---------------------------------------------------------------------------- the model
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 5)
        self.out = nn.Linear(5, 2, bias=False)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        return self.out(torch.tanh(self.fc(h.flatten(1))))


def _random_kronecker_state(vm, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _, post in kronecker_posteriors(vm).items():
        q_s = torch.linalg.qr(torch.randn(post.n_out, post.n_out, generator=gen))[0]
        q_a = torch.linalg.qr(torch.randn(post.n_in, post.n_in, generator=gen))[0]
        post.set_state(q_s, q_a, 0.1 * torch.rand(post.n_out, post.n_in, generator=gen) + 0.01)


def test_conversion_keeps_the_mean_field_distribution():
    torch.manual_seed(0)
    vm = pyvarinf2.variationalize(_Net(), init_std=0.05)
    with torch.no_grad():
        vm.posteriors.fc.weight.set_stddev(torch.rand(5, 48) * 0.1 + 0.01)
    before_kl = vm.prior_loss().item()
    std_w = vm.posteriors.fc.weight.stddev.detach().clone()
    layers = use_kronecker_posteriors(vm)
    assert [la.path for la in layers] == ["conv", "fc", "out"]
    keys = dict(vm.named_posteriors())
    assert isinstance(keys["fc"], KroneckerPosterior) and keys["fc"].names == ("fc.weight",
                                                                                "fc.bias")
    assert "bn.weight" in keys and "bn.bias" in keys  # the rest stays mean-field
    torch.testing.assert_close(keys["fc"].marginal_stddevs()[0], std_w)
    assert vm.prior_loss().item() == pytest.approx(before_kl, rel=1e-6)
    assert use_kronecker_posteriors(vm)[1].posterior is keys["fc"]  # idempotent


def test_tied_and_excluded_layers_stay_mean_field():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight
            self.c = nn.Linear(4, 2)
            self.d = nn.Conv2d(2, 2, 1, groups=2)

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    vm = pyvarinf2.variationalize(Tied(), deterministic="c.bias")
    paths = [la.path for la in find_kfac_layers(vm)]
    assert paths == ["c"]  # a/b share a weight, d has groups=2
    layer = find_kfac_layers(vm)[0]
    assert layer.bias_name is None  # the deterministic bias stays a point estimate


def test_state_dict_round_trip_into_a_fresh_model():
    torch.manual_seed(0)
    vm = pyvarinf2.variationalize(_Net())
    use_kronecker_posteriors(vm)
    _random_kronecker_state(vm)
    x = torch.randn(4, 1, 6, 6)
    buf = io.BytesIO()
    torch.save(vm.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    for explicit in (False, True):
        torch.manual_seed(1)
        fresh = pyvarinf2.variationalize(_Net())
        if explicit:
            use_kronecker_posteriors(fresh)
        fresh.load_state_dict(saved)  # a plain fresh model learns the family from extra state
        assert set(kronecker_posteriors(fresh)) == {"conv", "fc", "out"}
        vm.load_state_dict(saved)  # undo the BatchNorm statistics of the previous round
        for k, v in saved.items():
            if torch.is_tensor(v):
                assert torch.equal(v, fresh.state_dict()[k]), k
        vm.train()
        fresh.train()
        torch.manual_seed(5)
        a = vm(x)
        torch.manual_seed(5)
        b = fresh(x)
        assert torch.equal(a, b)
        vm.eval()
        fresh.eval()
        assert torch.equal(vm(x), fresh(x))
        assert vm.prior_loss().item() == fresh.prior_loss().item()


def test_nested_load_and_failed_load_leave_model_consistent():
    torch.manual_seed(0)
    vm = pyvarinf2.variationalize(_Net())
    use_kronecker_posteriors(vm)
    _random_kronecker_state(vm)
    outer = nn.ModuleDict({"inner": vm})
    fresh_outer = nn.ModuleDict({"inner": pyvarinf2.variationalize(_Net())})
    fresh_outer.load_state_dict(outer.state_dict())  # nested: nn.Module's own load
    torch.testing.assert_close(fresh_outer["inner"].posteriors.fc.std, vm.posteriors.fc.std)
    # a checkpoint from another architecture: error, and the fresh model is unchanged
    other = pyvarinf2.variationalize(_Net())
    sd = vm.state_dict()
    sd["model.fc.weight"] = torch.zeros(7, 48)
    with pytest.raises(RuntimeError, match="shape"):
        other.load_state_dict(sd)
    assert kronecker_posteriors(other) == {}
    assert "fc.weight" in dict(other.named_posteriors())


def test_prediction_and_frozen_sample_without_optimizer():
    torch.manual_seed(0)
    vm = pyvarinf2.variationalize(_Net())
    use_kronecker_posteriors(vm)
    _random_kronecker_state(vm)
    x = torch.randn(3, 1, 6, 6)
    s = pyvarinf2.Sample(vm).draw()
    assert torch.equal(s(x), s(x))
    vm.train()
    y1, y2 = vm(x), vm(x)
    assert not torch.equal(y1, y2)
    # the sampled weights' spread is the posterior's: marginal std of fc.weight
    post = vm.posteriors.fc
    draws = torch.stack([post.sample([vm.model.fc.weight, vm.model.fc.bias])[0]
                         for _ in range(4000)])
    ratio = draws.std(0) / post.marginal_stddevs()[0]
    assert (ratio - 1).abs().max() < 0.12


def test_replace_posterior_refuses_a_key_that_hides_other_posteriors():
    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.fc.extra = nn.Linear(3, 3)  # a child under the same path

        def forward(self, x):
            return self.fc.extra(self.fc(x))

    vm = pyvarinf2.variationalize(Nested())
    post = KroneckerPosterior.from_mean_field("fc.weight", vm.posteriors.fc.weight,
                                              "fc.bias", vm.posteriors.fc.bias)
    with pytest.raises(ValueError, match="fc.extra.weight"):
        vm.replace_posterior("fc", post)
    assert set(dict(vm.named_posteriors())) == {"fc.weight", "fc.bias", "fc.extra.weight",
                                                "fc.extra.bias"}
    # the optimizer's layer finder skips that layer rather than hide its child
    assert [la.path for la in find_kfac_layers(vm)] == ["fc.extra"]


def test_equal_pieces_of_the_batch_are_examples_not_repeated_uses():
    # x[:3] and x[3:] of a batch of 6 are six examples, not three examples seen twice: the
    # factors must equal those of one call on the whole batch
    torch.manual_seed(0)
    model = _SplitConvNet().to(DT)
    x = torch.randn(6, 2, 6, 6, dtype=DT)
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    got = {}
    for pieces in (None, [3, 3], [2, 2, 2]):
        model.pieces = pieces
        _, got[str(pieces)] = _capture(pyvarinf2.variationalize(model), x,
                                       lambda out: F.cross_entropy(out, y))
    for key in ("[3, 3]", "[2, 2, 2]"):
        for i in (0, 1):
            for f0, f1 in zip(kfac_factors(*got["None"][i]), kfac_factors(*got[key][i])):
                torch.testing.assert_close(f1, f0)


# ---------------------------------------------------------------- noise through the activations
class _Wide(nn.Module):
    """fc1 (30 -> 40) is cheaper to perturb through its activations at a small batch, fc2
    (40 -> 3) through its weights; ``twice`` runs fc1 on the two halves of the batch, ``kw``
    calls it by keyword."""

    def __init__(self, bias=True, twice=False, kw=False):
        super().__init__()
        self.fc1 = nn.Linear(30, 40, bias=bias)
        self.fc2 = nn.Linear(40, 3)
        self.twice, self.kw = twice, kw

    def forward(self, x):
        if self.twice:
            h = torch.cat([self.fc1(x[:2]), self.fc1(x[2:])])
        else:
            h = self.fc1(input=x) if self.kw else self.fc1(x)
        return self.fc2(torch.tanh(h))


def _wide_model(seed=0, **kw):
    torch.manual_seed(seed)
    vm = pyvarinf2.variationalize(_Wide(**kw).to(DT))
    use_kronecker_posteriors(vm)
    _random_kronecker_state(vm, seed)
    return vm


def _sampled_forward(vm, x, seed, activation_noise):
    vm.activation_noise = activation_noise
    vm.record_noise = True
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out = vm(x)
    grads = torch.autograd.grad((out * out.detach().cos()).sum(),
                                [x] + list(vm.mean_parameters()))
    noise = {k: [t.clone() for t in v] for k, v in vm.last_noise.items()}
    return out.detach(), grads, noise


def _assert_same(got, ref):
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    for g, r in zip(got[1], ref[1]):
        torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-12)
    assert got[2].keys() == ref[2].keys()
    for k in ref[2]:
        assert all(torch.equal(a, b) for a, b in zip(got[2][k], ref[2][k]))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,routes", [
    ((4, 30), ("activations", "weights")), ((2, 3, 30), ("activations", "weights")),
    ((30,), ("activations", "activations")), ((2, 50, 30), ("weights", "weights"))])
def test_noise_through_activations_equals_the_sampled_weights(bias, shape, routes):
    # the same draw E: the output, the input gradient, the mean gradients and the recorded
    # noise are those of the layer with the sampled weights M + Q_S (std ⊙ E) Q_Aᵀ; each layer
    # takes the route its rows make cheaper (fc2, 40 -> 3, through the activations only for
    # one row; fc1 through M + Z for 100 rows)
    vm = _wide_model(bias=bias)
    x = torch.randn(*shape, dtype=DT)
    ref = _sampled_forward(vm, x, 7, False)
    got = _sampled_forward(vm, x, 7, True)
    assert vm._last_routes == {"fc1": [routes[0]], "fc2": [routes[1]]}
    _assert_same(got, ref)
    # the means are back in place, and it is a sample: another seed gives another output
    assert all(p is vm.model.get_parameter(n) for n, p in vm.model.named_parameters())
    assert not torch.allclose(_sampled_forward(vm, x, 8, True)[0], got[0])


@pytest.mark.parametrize("kw", [dict(twice=True), dict(kw=True)])
def test_noise_through_activations_per_call(kw):
    # fc1 on both halves of the batch: both calls see the same weights; fc1(input=x) by keyword
    vm = _wide_model(**kw)
    x = torch.randn(4, 30, dtype=DT)
    ref = _sampled_forward(vm, x, 3, False)
    got = _sampled_forward(vm, x, 3, True)
    assert vm._last_routes["fc1"] == ["activations"] * (2 if kw.get("twice") else 1)
    _assert_same(got, ref)


def test_noise_through_activations_keeps_the_autocast_dtype():
    torch.manual_seed(0)
    vm = pyvarinf2.variationalize(nn.Linear(30, 40))    # the layer's output is the model's
    use_kronecker_posteriors(vm)
    x = torch.randn(4, 30)
    outs = []
    for route in (False, None):
        vm.activation_noise = route
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(vm(x))
    assert vm._last_routes == {"": ["activations"]}
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
    torch.testing.assert_close(outs[1].float(), outs[0].float(), rtol=0.05, atol=0.05)


def test_noise_route_follows_the_flop_counts():
    post = KroneckerPosterior("w", (400, 784), "b")
    act, sample = post.noise_costs(128, input_grad=False)
    assert act == 2 * 128 * (784 * 785 + 785 * 400 + 400 * 400)      # 0.28 GFlop
    assert sample == 2 * 400 * 785 * (400 + 785)                       # 0.74 GFlop
    assert post.noise_costs(128, input_grad=True)[0] == 2 * act
    vm = _wide_model()
    vm.activation_noise = True
    assert [p for p, *_ in vm._activation_noise_plan()] == ["fc1", "fc2"]
    vm(torch.randn(4000, 30, dtype=DT))
    assert vm._last_routes == {"fc1": ["weights"], "fc2": ["weights"]}
    with torch.no_grad():    # no input gradient to pay for: cheaper through the activations
        vm(torch.randn(8, 30, dtype=DT))
    assert vm._last_routes == {"fc1": ["activations"], "fc2": ["weights"]}
    vm.activation_noise = False
    assert vm._activation_noise_plan() == []
    with pytest.raises(TypeError, match="activation_noise"):
        vm.activation_noise = "yes"
    assert vm.activation_noise is False


def test_noise_route_by_default_only_for_torch_nn_models():
    # None (the default): on for models made of torch.nn's own modules, off for a model with
    # its own forward (which could read a weight outside the layer) and for attention modules
    def kron(model):
        torch.manual_seed(0)
        vm = pyvarinf2.variationalize(model)
        use_kronecker_posteriors(vm)
        assert vm.activation_noise is None
        return [p for p, *_ in vm._activation_noise_plan()]

    assert kron(nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 3))) == ["0", "2"]
    assert kron(nn.Sequential(nn.Sequential(nn.Linear(30, 40)), nn.Tanh())) == ["0.0"]
    assert kron(_Wide()) == []
    assert kron(nn.Sequential(nn.Linear(8, 8), nn.TransformerEncoderLayer(8, 2, 16))) == []


class _TiedAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(30, 40)
        self.dec_bias = nn.Parameter(torch.zeros(30))

    def forward(self, x):
        return F.linear(torch.tanh(self.enc(x)), self.enc.weight.t(), self.dec_bias)


def test_noise_route_is_off_by_default_where_a_weight_is_read_outside_its_layer():
    # a decoder tied to enc.weight: by default the sampled weight reaches both uses; with
    # activation_noise=True (the user's word that nothing else reads it) the decoder would
    # see the mean, which is why the default leaves user-written forwards alone
    torch.manual_seed(0)
    vm = pyvarinf2.variationalize(_TiedAutoencoder().to(DT))
    use_kronecker_posteriors(vm)
    _random_kronecker_state(vm)
    x = torch.randn(4, 30, dtype=DT)
    ref = _sampled_forward(vm, x, 5, False)
    _assert_same(_sampled_forward(vm, x, 5, None), ref)
    assert "_last_routes" not in vm.__dict__
    wrong = _sampled_forward(vm, x, 5, True)[0]
    assert vm._last_routes == {"enc": ["activations"]}
    assert not torch.allclose(wrong, ref[0])


def test_noise_route_warns_for_a_layer_that_never_runs():
    class Reads(nn.Module):             # reads fc1's weight without calling fc1
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(30, 40)

        def forward(self, x):
            return F.linear(x, self.fc1.weight, self.fc1.bias)

    torch.manual_seed(0)
    vm = pyvarinf2.variationalize(Reads().to(DT))
    use_kronecker_posteriors(vm)
    x = torch.randn(4, 30, dtype=DT)
    vm(x)                                 # default: a user-written forward, weights sampled
    vm.activation_noise = True
    with pytest.warns(UserWarning, match=r"\['fc1'\] did not run their forward"):
        vm(x)


class _Tempered(nn.Module):
    """A learned temperature owned by the root: per-example gradients of the root re-run it
    (and fc1 inside it) through torch.func."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(30, 40)
        self.fc2 = nn.Linear(40, 3)
        self.log_t = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) * self.log_t.exp()


def test_layers_inside_a_torch_func_rerun_keep_the_weight_route():
    torch.manual_seed(0)
    vm = pyvarinf2.variationalize(_Tempered().to(DT))
    use_kronecker_posteriors(vm)
    vm.activation_noise = True
    assert [p for p, *_ in vm._activation_noise_plan()] == ["fc1", "fc2"]
    pyvarinf2.optim.NoisyKFAC(vm, lr=0.05, dataset_size=50, fisher="empirical")
    assert vm._activation_noise_plan() == []
    x = torch.randn(4, 30, dtype=DT)
    y = torch.tensor([0, 2, 1, 1])
    steps = []
    for route in (False, True):
        torch.manual_seed(0)
        vm = pyvarinf2.variationalize(_Tempered().to(DT))
        opt = pyvarinf2.optim.NoisyKFAC(vm, lr=0.05, dataset_size=50, fisher="empirical")
        vm.activation_noise = route
        opt.zero_grad()
        F.cross_entropy(vm(x), y).backward()
        opt.step()
        steps.append(vm.posteriors.log_t.stddev.clone())
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("net", ["wide", "root"])
@pytest.mark.parametrize("fisher", ["true", "empirical"])
@pytest.mark.parametrize("opt_name", ["NoisyKFAC", "NoisyEKFAC"])
def test_optimizer_step_is_the_same_through_activations(opt_name, fisher, net):
    # K-FAC's capture (with fisher='true', labels drawn from the sampled output) and the mean
    # update see the same numbers whichever route the noise takes. One step: the factors of a
    # batch of 4 are singular, and the eigenvectors of their null space (not the posterior)
    # depend on rounding, so later draws differ; the posterior covariance does not. "root":
    # the wrapped model is the layer itself, whose true-Fisher labels come from its output.
    x = torch.randn(4, 30, dtype=DT)
    y = torch.tensor([0, 2, 1, 1])
    got = []
    for route in (False, True):
        torch.manual_seed(0)
        model = _Wide(twice=True) if net == "wide" else nn.Linear(30, 40)
        vm = pyvarinf2.variationalize(model.to(DT))
        opt = getattr(pyvarinf2.optim, opt_name)(vm, lr=0.05, dataset_size=50, T_cov=1,
                                                 T_inv=2, fisher=fisher)
        vm.activation_noise = route
        assert bool(vm._activation_noise_plan()) is route
        opt.zero_grad()
        F.cross_entropy(vm(x), y).backward()
        opt.step()
        state = {k: v.clone() for k, v in vm.state_dict().items()
                 if torch.is_tensor(v) and not k.startswith("posteriors.")}
        for key, post in kronecker_posteriors(vm).items():
            state[key + " covariance"] = post.covariance()
        for p in vm.mean_parameters():
            for k in ("A", "S"):
                if k in opt.state[p]:
                    state[f"{tuple(p.shape)} {k}"] = opt.state[p][k]
        got.append(state)
    assert got[0].keys() == got[1].keys() and len(got[0]) >= (8 if net == "wide" else 5)
    for k, v in got[0].items():
        torch.testing.assert_close(got[1][k], v, rtol=1e-9, atol=1e-12, msg=k)
