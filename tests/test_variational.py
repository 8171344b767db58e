"""variationalize: sampling semantics, gradients, the ELBO's optimum, priors per parameter,
persistence, torch.func, and PyVarInf's README program."""
import copy
import gzip
import io
import math
import warnings

import numpy as np
import pytest
import torch
import torch.distributions as D
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import pyvarinf2 as pv
from pyvarinf2.priors import ConjugatePrior, GaussianPrior, MixtureGaussianPrior


class MLP(nn.Module):
    def __init__(self, d_in=3, hidden=4, d_out=2):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def posts(vm):
    return dict(vm.named_posteriors())


def randomize(vm, low=0.05, high=0.5):
    """Random means and scales, so that tests do not pass by symmetry."""
    with torch.no_grad():
        for p in vm.model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for _, post in vm.named_posteriors():
            post.set_stddev(torch.empty_like(post.mean).uniform_(low, high))
    return vm


def snapshot(vm):
    return {k: v.detach().clone() for k, v in vm.state_dict().items() if torch.is_tensor(v)}


# ----------------------------------------------------------------------------- sampling semantics
def test_train_mode_draws_fresh_weights_eval_mode_uses_the_mean():
    model = MLP()
    plain = copy.deepcopy(model)
    vm = randomize(pv.variationalize(model))
    plain.load_state_dict(model.state_dict())
    x = torch.randn(6, 3)
    vm.train()
    a, b = vm(x), vm(x)
    assert not torch.allclose(a, b)
    vm.eval()
    torch.testing.assert_close(vm(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(vm(x), vm(x), rtol=0, atol=0)
    # sampling() switches sampling on in eval mode and off in train mode
    with vm.sampling():
        assert not torch.allclose(vm(x), plain(x))
    vm.train()
    with vm.sampling(False):
        torch.testing.assert_close(vm(x), plain(x), rtol=0, atol=0)
    assert vm.is_sampling()


def test_one_weight_sample_is_shared_by_the_batch_and_means_stay_untouched():
    vm = randomize(pv.variationalize(MLP()))
    before = [p.detach().clone() for p in vm.model.parameters()]
    vm.train()
    out = vm(torch.ones(5, 3))
    # identical inputs in one batch: identical outputs (one sample per forward)
    torch.testing.assert_close(out, out[:1].expand_as(out), rtol=0, atol=0)
    for b, p in zip(before, vm.model.parameters()):
        assert torch.equal(b, p)  # sampling is out of place


def test_samples_follow_the_posterior():
    """Empirical mean and std of the weights drawn in training mode, read off a 1-1 linear map."""
    model = nn.Linear(1, 3, bias=False).double()
    vm = pv.variationalize(model)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5], [-1.0], [2.0]]))
    posts(vm)["weight"].set_stddev(torch.tensor([[0.1], [0.3], [1e-3]]))
    vm.train()
    x = torch.ones(1, 1, dtype=torch.float64)
    draws = torch.cat([vm(x) for _ in range(4000)])
    m, s = draws.mean(0), draws.std(0)
    std = torch.tensor([0.1, 0.3, 1e-3], dtype=torch.float64)
    assert ((m - model.weight.detach().squeeze()).abs() < 4 * std / math.sqrt(4000)).all()
    torch.testing.assert_close(s, std, rtol=0.05, atol=0)


def test_recorded_noise_reproduces_the_sample():
    vm = randomize(pv.variationalize(MLP().double()))
    vm.train()
    vm.record_noise = True
    x = torch.randn(4, 3, dtype=torch.float64)
    out = vm(x)
    params = {}
    for key, post in vm.named_posteriors():
        (eps,) = vm.last_noise[key]
        params[key] = post.mean + post.stddev * eps
    torch.testing.assert_close(out, functional_call(vm.model, params, (x,)))


def test_sample_freezes_a_draw():
    # PyVarInf's own test of Sample, plus: before any draw, Sample uses the means
    x = torch.ones(1, 10)
    model = nn.Linear(10, 10)
    var_model = pv.Variationalize(model)
    sampled_model = pv.Sample(var_model)
    torch.testing.assert_close(sampled_model(x), model(x), rtol=0, atol=0)
    sampled_model.draw()
    a = sampled_model(x)
    b = sampled_model(x)
    assert torch.equal(a, b)
    sampled_model.draw()
    b = sampled_model(x)
    assert (a != b).all()
    assert pv.Sample(var_model=var_model).draw() is not None


# ----------------------------------------------------------------------------- gradients
def _fd_grads(loss_fn, tensors, h=1e-6):
    grads = []
    with torch.no_grad():
        for t in tensors:
            g = torch.zeros_like(t)
            flat, gflat = t.view(-1), g.view(-1)
            for i in range(flat.numel()):
                old = flat[i].item()
                flat[i] = old + h
                fp = loss_fn().item()
                flat[i] = old - h
                fm = loss_fn().item()
                flat[i] = old
                gflat[i] = (fp - fm) / (2 * h)
            grads.append(g)
    return grads


def _leaves(vm):
    return vm.mean_parameters() + vm.scale_parameters()


def test_mean_and_scale_gradients_match_finite_differences():
    """Fixed noise (seeded), float64: the gradient of sample-NLL + prior_loss in every mean and
    scale parameter against central differences."""
    vm = randomize(pv.variationalize(MLP().double()))
    vm.set_prior("gaussian", std=0.7, mean=0.1, parameters="fc1.*")
    vm.train()
    x = torch.randn(5, 3, dtype=torch.float64)
    w = torch.randn(5, 2, dtype=torch.float64)

    def loss_fn():
        torch.manual_seed(11)
        return (w * vm(x) ** 2).sum() + vm.prior_loss()

    leaves = _leaves(vm)
    grads = torch.autograd.grad(loss_fn(), leaves)
    for g, r in zip(grads, _fd_grads(loss_fn, leaves)):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-7)


def test_two_forwards_before_one_backward():
    """PyVarInf's in-place noise bug: a second forward before backward changed the gradient of
    the first sample. Here both samples keep their own noise."""
    vm = randomize(pv.variationalize(MLP().double()))
    vm.train()
    x = torch.randn(5, 3, dtype=torch.float64)
    w1, w2 = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    leaves = _leaves(vm)

    # gradient of the first sample alone, then with another forward run before backward
    torch.manual_seed(1)
    out1 = vm(x)
    g_alone = torch.autograd.grad((w1 * torch.sin(out1)).sum(), leaves)
    torch.manual_seed(1)
    out1 = vm(x)
    vm(x)  # another sample drawn before backward
    g_after = torch.autograd.grad((w1 * torch.sin(out1)).sum(), leaves)
    for a, b in zip(g_alone, g_after):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all((g != 0).any() for g in g_after)

    # a loss mixing both samples against finite differences of the same seeded function
    def both():
        torch.manual_seed(1)
        o1 = vm(x)
        o2 = vm(x)
        return (w1 * torch.sin(o1)).sum() + (w2 * o2 ** 2).sum()

    grads = torch.autograd.grad(both(), leaves)
    for g, r in zip(grads, _fd_grads(both, leaves)):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-7)


def test_fixed_scales_sample_the_same_weights_and_mean_gradients():
    """With the scales' gradients off (as the natural-gradient optimizers set them) the sample
    takes a path without the fused kernel's autograd node: same draw bit for bit, same mean
    gradients, the same after two forwards before one backward, and no scale gradient."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(torch.tanh(self.conv(x)).flatten(1))

    x = torch.randn(4, 1, 4, 4)
    w = torch.randn(4, 2)
    results = {}
    for trainable in (True, False):
        torch.manual_seed(0)
        vm = randomize(pv.variationalize(Net()))
        vm.scales_require_grad_(trainable)
        vm.train()
        torch.manual_seed(5)
        out1 = vm(x)
        out2 = vm(x)
        (w * torch.sin(out1)).sum().add((w * out2 ** 2).sum()).backward()
        results[trainable] = (out1.detach(), out2.detach(),
                              [p.grad.clone() for p in vm.model.parameters()],
                              [p.grad for p in vm.scale_parameters()])
    for a, b in zip(results[True][:2], results[False][:2]):
        assert torch.equal(a, b)
    for a, b in zip(results[True][2], results[False][2]):
        assert torch.equal(a, b)
    assert all(g is not None and (g != 0).any() for g in results[True][3])
    assert all(g is None for g in results[False][3])


def test_eval_mode_gradient_is_the_plain_models():
    model = MLP().double()
    vm = randomize(pv.variationalize(model))
    plain = copy.deepcopy(model)
    vm.eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    vm(x).pow(2).sum().backward()
    plain(x).pow(2).sum().backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert all(p.grad is None for p in vm.scale_parameters())


# ----------------------------------------------------------------------------- the ELBO's optimum
def test_bayes_by_backprop_recovers_the_mean_field_optimum_of_linear_regression(one_thread):
    """Linear-Gaussian model, prior N(0, sp^2 I), known noise s: the mean-field optimum has the
    exact posterior mean and variances 1/diag(Lambda), Lambda = X^T X / s^2 + I / sp^2.
    Adam on (mean, scale), 4 MC samples per step, lr decaying 0.05 -> 2e-4 over 3000 steps.
    Tolerances: means within 0.1 posterior std, stds within 3%."""
    torch.manual_seed(1)
    d, n, s, sp = 3, 50, 0.5, 1.0
    X = torch.randn(n, d, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64) + s * torch.randn(n,
                                                                                 dtype=torch.float64)
    Lam = X.T @ X / s ** 2 + torch.eye(d, dtype=torch.float64) / sp ** 2
    mu_star = torch.linalg.solve(Lam, X.T @ y / s ** 2)
    std_star = torch.diagonal(Lam).rsqrt()

    vm = pv.variationalize(nn.Linear(d, 1, bias=False).double(), prior=("gaussian", sp),
                           init_std=0.1)
    vm.train()
    steps, k = 3000, 4
    opt = torch.optim.Adam(vm.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (2e-4 / 0.05) ** (t / steps))
    for _ in range(steps):
        opt.zero_grad()
        nll = sum(((y - vm(X).squeeze(-1)) ** 2).sum() for _ in range(k)) / (2 * s ** 2 * k)
        (nll + vm.prior_loss()).backward()
        opt.step()
        sched.step()
    post = posts(vm)["weight"]
    mean, std = post.mean.detach().squeeze(0), post.stddev.detach().squeeze(0)
    assert ((mean - mu_star).abs() < 0.1 * std_star).all(), (mean, mu_star, std_star)
    assert ((std / std_star - 1).abs() < 0.03).all(), (std, std_star)


# ----------------------------------------------------------------------------- prior_loss
def test_prior_loss_is_a_sum_over_entries():
    def kl_of(size, prior):
        vm = pv.variationalize(nn.Linear(size, size, bias=False), prior=prior, init_std=0.2)
        with torch.no_grad():
            vm.model.weight.fill_(0.1)
        torch.manual_seed(0)
        return float(vm.prior_loss().detach())

    g = ("gaussian", 0.5)
    assert kl_of(100, g) == pytest.approx(100 * kl_of(10, g), rel=1e-5)
    assert kl_of(10, g) > 0
    m = ("mixtgauss", 50, 0.5, 0.05, 0.5)
    assert kl_of(100, m) == pytest.approx(100 * kl_of(10, m), rel=0.05)


def test_prior_loss_is_the_sum_of_the_per_parameter_kls():
    vm = randomize(pv.variationalize(MLP().double()))
    vm.set_prior("gaussian", 0.4, 0.2, parameters="fc2.bias")
    vm.set_prior("mixtgauss", 3, 0.5, 0.01, 0.4, parameters="fc1.bias")
    vm.set_prior("conjugate", 2, 2.0, 1.0, 0.0, 1.0, parameters="fc2.weight")
    torch.manual_seed(5)
    total = vm.prior_loss()
    # closed-form parts draw no random numbers; the Monte-Carlo parts draw in model order
    torch.manual_seed(5)
    ref = 0.0
    for name, post in vm.named_posteriors():
        if not isinstance(vm.prior_of(name), GaussianPrior):
            ref = ref + vm.prior_of(name).kl(post.mean, post.stddev)
    for name, post in vm.named_posteriors():
        if isinstance(vm.prior_of(name), GaussianPrior):
            ref = ref + vm.prior_of(name).kl(post.mean, post.stddev)
    torch.testing.assert_close(total, ref)


def test_set_prior_per_parameter_pattern_type_and_callable():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    vm = pv.variationalize(model)
    assert all(isinstance(p, GaussianPrior) and p.std is None for _, p in vm.named_priors())
    vm.set_prior("mixtgauss", 2, 0.4, 0.02, 0.3, parameters="*.bias")
    vm.set_prior("conjugate", 1, 2.0, 1.0, 0.0, 1.0, parameters=nn.BatchNorm2d)
    vm.set_prior("gaussian", std=0.3, mean=0.1,
                 parameters=lambda name, module: name == "3.weight")
    vm.set_prior(D.Laplace(0.0, 0.2), parameters=["0.weight"])
    kinds = {n: type(p).__name__ for n, p in vm.named_priors()}
    assert kinds == {"0.weight": "DistributionPrior", "0.bias": "MixtureGaussianPrior",
                     "1.weight": "ConjugatePrior", "1.bias": "ConjugatePrior",
                     "3.weight": "GaussianPrior", "3.bias": "MixtureGaussianPrior"}
    assert vm.prior_of("3.weight").std == 0.3 and vm.prior_of("3.weight").mean == 0.1
    assert vm.prior_of("0.bias").pi == 0.3
    assert torch.isfinite(vm.prior_loss())
    # a prior given at construction
    vm2 = pv.variationalize(MLP(), prior=MixtureGaussianPrior(1, 1.0, 0.1, 0.5))
    assert all(isinstance(p, MixtureGaussianPrior) for _, p in vm2.named_priors())


# ----------------------------------------------------------------------------- structure
class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Embedding(10, 4)
        self.dec = nn.Linear(4, 10, bias=False)
        self.dec.weight = self.enc.weight

    def forward(self, i):
        return self.dec(self.enc(i))


def test_tied_weights_get_one_posterior_and_one_sample():
    model = Tied().double()
    vm = randomize(pv.variationalize(model))
    assert list(posts(vm)) == ["enc.weight"]
    vm.train()
    vm.record_noise = True
    i = torch.tensor([1, 2, 7])
    out = vm(i)
    post = posts(vm)["enc.weight"]
    w = post.mean + post.stddev * vm.last_noise["enc.weight"][0]
    torch.testing.assert_close(out, w[i] @ w.T)
    out.sum().backward()
    assert model.enc.weight.grad is not None
    assert all(s.grad is not None and (s.grad != 0).any() for s in post.parameters())
    ref = GaussianPrior().kl(post.mean, post.stddev)
    torch.testing.assert_close(vm.prior_loss(), ref)


def test_bias_false_frozen_and_deterministic_parameters():
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)
    vm = pv.variationalize(model)
    assert list(posts(vm)) == ["0.weight", "1.weight", "1.bias", "2.weight"]
    frozen = model[2].bias.detach().clone()
    opt = torch.optim.SGD(vm.parameters(), lr=0.5)
    vm.train()
    for _ in range(3):
        opt.zero_grad()
        vm(torch.randn(8, 3)).pow(2).sum().backward()
        opt.step()
    assert torch.equal(model[2].bias, frozen) and not model[2].bias.requires_grad

    for spec, expected in [
        (nn.BatchNorm1d, ["0.weight", "2.weight"]),
        ("*.bias", ["0.weight", "1.weight", "2.weight"]),
        (["0.*", nn.BatchNorm1d], ["2.weight"]),
        (lambda name, module: isinstance(module, nn.Linear), ["1.weight", "1.bias"]),
    ]:
        vm = pv.variationalize(model, deterministic=spec)
        assert list(posts(vm)) == expected
        assert set(vm.posterior_parameters()) == set(expected)
    # a deterministic parameter is a point estimate: used as is, trained by the optimizer
    vm = pv.variationalize(model, deterministic="*.bias", init_std=0.5)
    vm.train()
    x = torch.randn(8, 3)
    vm(x).sum().backward()
    assert model[1].bias.grad is not None


def test_names_that_differ_only_by_dot_and_underscore_do_not_collide():
    class AB(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.a_weight = nn.Parameter(torch.ones(2))
            self.a_bias = nn.Parameter(torch.zeros(2))

        def forward(self, x):
            return self.a(x) * self.a_weight + self.a_bias

    vm = pv.variationalize(AB())
    assert sorted(posts(vm)) == ["a.bias", "a.weight", "a_bias", "a_weight"]
    assert posts(vm)["a_weight"].mean is vm.model.a_weight
    assert posts(vm)["a.weight"].mean is vm.model.a.weight


def test_named_posteriors_means_and_stddevs_are_shaped_like_the_parameters():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3, 2))
    vm = pv.variationalize(model, init_std=0.02)
    names = [n for n, _ in model.named_parameters()]
    assert [n for n, _ in vm.named_posteriors()] == names
    for (n, p), (key, post) in zip(model.named_parameters(), vm.named_posteriors()):
        assert post.mean is p
        assert post.stddev.shape == p.shape
        torch.testing.assert_close(post.stddev, torch.full_like(p, 0.02))
    assert len(list(vm.parameters())) == 2 * len(names)


def test_forward_takes_args_and_kwargs():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x, y=None, *, scale=1.0):
            out = self.lin(x) * scale
            return out if y is None else out + y

    vm = pv.variationalize(KW())
    x, y = torch.randn(3, 2), torch.randn(3, 2)
    for mode in (True, False):
        vm.train(mode)
        torch.testing.assert_close(vm(x, y, scale=0.0), y)
        torch.testing.assert_close(vm(x, y=y, scale=0.0), y)


# ----------------------------------------------------------------------------- persistence
def _prior_specs(vm):
    return {n: p.spec() for n, p in vm.named_priors()}


def test_state_dict_round_trip_restores_means_scales_and_priors():
    vm = randomize(pv.variationalize(MLP()))
    vm.set_prior("mixtgauss", 3, 0.5, 0.01, 0.4, parameters="*.bias")
    vm.set_prior("conjugate_known_mean", 2, 0.1, 2.0, 1.5, parameters="fc2.weight")
    vm.set_prior("gaussian", 0.3, -0.1, parameters="fc1.weight")
    buf = io.BytesIO()
    torch.save(vm.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)  # weights_only (the default) must be enough

    other = pv.variationalize(MLP())
    other.load_state_dict(state)
    assert _prior_specs(other) == _prior_specs(vm)
    for (n, a), (_, b) in zip(vm.named_posteriors(), other.named_posteriors()):
        assert torch.equal(a.mean, b.mean) and torch.equal(a.stddev, b.stddev)
    x = torch.randn(4, 3)
    vm.eval(), other.eval()
    assert torch.equal(vm(x), other(x))
    torch.manual_seed(3)
    kl_a = vm.prior_loss()
    torch.manual_seed(3)
    assert torch.equal(kl_a, other.prior_loss())


def test_state_dict_round_trip_with_a_torch_distributions_prior():
    vm = pv.variationalize(MLP())
    vm.set_prior(D.StudentT(3.0, 0.0, 0.5), parameters="fc1.*")
    vm.set_prior(D.Laplace(0.1, 0.2), parameters="fc2.weight")
    buf = io.BytesIO()
    torch.save(vm.state_dict(), buf)
    buf.seek(0)
    other = pv.variationalize(MLP())
    other.load_state_dict(torch.load(buf))
    for name in ("fc1.weight", "fc1.bias", "fc2.weight"):
        p, q = vm.prior_of(name), other.prior_of(name)
        assert type(p.distribution) is type(q.distribution)
        t = torch.randn(3)
        torch.testing.assert_close(p.log_prob(t), q.log_prob(t))
    assert isinstance(other.prior_of("fc2.bias"), GaussianPrior)


def test_deepcopy_is_independent_and_complete():
    vm = randomize(pv.variationalize(MLP()))
    vm.set_prior("mixtgauss", 2, 0.5, 0.01, 0.4, parameters="*.bias")
    cp = copy.deepcopy(vm)
    x = torch.randn(4, 3)
    vm.eval(), cp.eval()
    assert torch.equal(vm(x), cp(x))
    for (_, a), (_, b) in zip(vm.named_posteriors(), cp.named_posteriors()):
        assert b.mean is not a.mean and torch.equal(a.mean, b.mean)
        assert torch.equal(a.stddev, b.stddev)
    # the copy's posteriors read the copy's means
    with torch.no_grad():
        cp.model.fc1.weight.add_(1.0)
    assert torch.equal(posts(cp)["fc1.weight"].mean, cp.model.fc1.weight)
    assert not torch.equal(vm(x), cp(x))
    assert _prior_specs(cp) == _prior_specs(vm)
    cp.set_prior("gaussian", 0.1)
    assert isinstance(vm.prior_of("fc1.bias"), MixtureGaussianPrior)


def test_double_and_to_convert_means_and_scales():
    vm = randomize(pv.variationalize(MLP()))
    vm.set_prior(D.Normal(0.0, 0.5), parameters="fc2.*")
    vm.set_prior("conjugate", 2, 2.0, 1.0, 0.0, 1.0, parameters="fc1.bias")
    ref = snapshot(vm)
    vm.double()
    for _, post in vm.named_posteriors():
        assert post.mean.dtype == torch.float64 and post.stddev.dtype == torch.float64
    x = torch.randn(4, 3, dtype=torch.float64)
    vm.train()
    out = vm(x)
    assert out.dtype == torch.float64
    kl = vm.prior_loss()
    assert kl.dtype == torch.float64 and torch.isfinite(kl)
    (out.sum() + kl).backward()
    vm.to(torch.float32).to("cpu")
    for k, v in snapshot(vm).items():
        torch.testing.assert_close(v, ref[k])


def test_to_another_device_moves_means_scales_and_priors():
    """No GPU on CI: the meta device exercises the same code paths (every tensor moves, the
    posteriors keep reading the moved means, priors follow the parameters' device)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    vm = pv.variationalize(model)
    vm.set_prior("mixtgauss", 2, 0.5, 0.01, 0.5, parameters="*.bias")
    vm.set_prior(D.Normal(0.0, 0.3), parameters="2.weight")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("meta")
    vm.to(device)
    for _, post in vm.named_posteriors():
        assert post.mean.device.type == device.type and post.stddev.device.type == device.type
        assert all(s.device.type == device.type for s in post.parameters())
    x = torch.randn(5, 3, device=device)
    for mode in (True, False):
        vm.train(mode)
        out = vm(x)
        assert out.shape == (5, 2) and out.device.type == device.type
    kl = vm.prior_loss()
    assert kl.shape == () and kl.device.type == device.type


def test_export_the_posterior_mean_network():
    model = MLP()
    vm = randomize(pv.variationalize(model))
    exported = vm.mean_model()
    assert type(exported) is MLP
    assert not any(isinstance(m, pv.VariationalModel) for m in exported.modules())
    x = torch.randn(5, 3)
    vm.eval()
    torch.testing.assert_close(exported(x), vm(x), rtol=0, atol=0)
    assert set(exported.state_dict()) == set(MLP().state_dict())
    with torch.no_grad():
        exported.fc1.weight.zero_()
    assert not torch.equal(model.fc1.weight, exported.fc1.weight)


# ----------------------------------------------------------------------------- torch.func
def test_functional_call_uses_the_parameters_it_is_given():
    vm = randomize(pv.variationalize(MLP().double()))
    other = randomize(copy.deepcopy(vm))  # supplies new means and new scales
    new = {k: v.detach().clone() for k, v in other.named_parameters()}
    x = torch.randn(4, 3, dtype=torch.float64)
    vm.eval()
    torch.testing.assert_close(functional_call(vm, new, (x,)), other.model(x))
    assert not torch.allclose(vm(x), other.model(x))
    # in training mode the sample is built from the given means and scales
    vm.train()
    vm.record_noise = True
    out = functional_call(vm, new, (x,))
    params = {key: post.mean + post.stddev * vm.last_noise[key][0]
              for key, post in other.named_posteriors()}
    torch.testing.assert_close(out, functional_call(other.model, params, (x,)))


def test_torch_func_grad_through_functional_call_matches_autograd():
    vm = randomize(pv.variationalize(MLP().double()))
    vm.train()
    x = torch.randn(4, 3, dtype=torch.float64)
    params = {k: v.detach() for k, v in vm.named_parameters()}

    def loss(p):
        torch.manual_seed(9)
        return functional_call(vm, p, (x,)).pow(2).sum()

    g = torch.func.grad(loss)(params)
    torch.manual_seed(9)
    vm(x).pow(2).sum().backward()
    for k, v in vm.named_parameters():
        torch.testing.assert_close(g[k], v.grad)


def test_vmap_over_inputs():
    vm = randomize(pv.variationalize(MLP().double()))
    x = torch.randn(6, 3, dtype=torch.float64)
    vm.eval()
    torch.testing.assert_close(torch.func.vmap(vm)(x), vm(x))
    # training mode: one weight sample shared by the whole vmapped batch
    vm.train()
    vm.record_noise = True
    out = torch.func.vmap(vm, randomness="same")(x)
    params = {k: post.mean + post.stddev * vm.last_noise[k][0] for k, post in vm.named_posteriors()}
    torch.testing.assert_close(out, functional_call(vm.model, params, (x,)))
    # randomness="different": one weight sample per vmapped example
    same = torch.ones(4, 3, dtype=torch.float64)
    out = torch.func.vmap(vm, randomness="different")(same)
    assert not torch.allclose(out[0], out[1])
    out = torch.func.vmap(vm, randomness="same")(same)
    torch.testing.assert_close(out, out[:1].expand_as(out), rtol=0, atol=0)


# ----------------------------------------------------------------------------- PyVarInf's README
README_PROGRAM = '''
import pyvarinf
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
class Net(nn.Module):
    def __init__(self):
        super(Net, self).__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)
        self.bn1 = nn.BatchNorm2d(10)
        self.bn2 = nn.BatchNorm2d(20)
    def forward(self, x):
        x = self.bn1(F.relu(F.max_pool2d(self.conv1(x), 2)))
        x = self.bn2(F.relu(F.max_pool2d(self.conv2(x), 2)))
        x = x.view(-1, 320)
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return F.log_softmax(x)
model = Net()
var_model = pyvarinf.Variationalize(model)
var_model.cuda()
optimizer = optim.Adam(var_model.parameters(), lr=0.01)
def train(epoch):
    var_model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        data, target = data.cuda(), target.cuda()
        data, target = Variable(data), Variable(target)
        optimizer.zero_grad()
        output = var_model(data)
        loss_error = F.nll_loss(output, target)
        # The model is only sent once, thus the division by
        # the number of datapoints used to train
        loss_prior = var_model.prior_loss() / 60000
        loss = loss_error + loss_prior
        loss.backward()
        optimizer.step()
for epoch in range(1, 500):
    train(epoch)
'''


def _read_mnist(root, n):
    with gzip.open(root / "mnist" / "train-images-idx3-ubyte.gz", "rb") as fh:
        header = np.frombuffer(fh.read(16), dtype=">i4")
        assert header[0] == 2051
        images = np.frombuffer(fh.read(n * 28 * 28), dtype=np.uint8).reshape(n, 1, 28, 28)
    with gzip.open(root / "mnist" / "train-labels-idx1-ubyte.gz", "rb") as fh:
        fh.read(8)
        labels = np.frombuffer(fh.read(n), dtype=np.uint8)
    x = (torch.from_numpy(images.astype(np.float32)) / 255.0 - 0.1307) / 0.3081
    return x, torch.from_numpy(labels.astype(np.int64))


def test_pyvarinf_readme_program_runs_unchanged(data_dir, monkeypatch, one_thread):
    """The README's program, character for character, with `import pyvarinf2 as pyvarinf`.
    The README leaves `train_loader` and `Variable` to the reader: two batches of 8 real MNIST
    images and torch.autograd.Variable. Without a GPU, `.cuda()` is made the identity."""
    import sys
    x, y = _read_mnist(data_dir, 16)
    train_loader = [(x[:8], y[:8]), (x[8:], y[8:])]
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
        monkeypatch.setattr(nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setitem(sys.modules, "pyvarinf", pv)
    program = README_PROGRAM.replace("import pyvarinf\n", "import pyvarinf2 as pyvarinf\n", 1)
    assert program.count("pyvarinf2") == 1
    env = {"train_loader": train_loader, "Variable": torch.autograd.Variable,
           "__name__": "readme"}
    setup, loop = program.split("for epoch in range(1, 500):")
    loop = "for epoch in range(1, 500):" + loop
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # F.log_softmax(x) without dim
        exec(compile(setup, "<readme>", "exec"), env)
        var_model = env["var_model"]
        with torch.no_grad():
            nll_before = float(F.nll_loss(var_model.eval()(x), y))
        exec(compile(loop, "<readme>", "exec"), env)  # the README's 499 epochs
        var_model.eval()
        with torch.no_grad():
            nll_after = float(F.nll_loss(var_model(x), y))
        assert nll_after < 0.25 * nll_before, (nll_before, nll_after)
        assert isinstance(var_model, pv.VariationalModel)
        assert torch.isfinite(var_model.prior_loss())

        # the README's prior calls, with its positional orders, and a frozen Sample
        for args in [("gaussian",), ("conjugate", 2, 1.0, 1.0, 0.0, 1.0),
                     ("conjugate_known_mean", 2, 0.0, 1.0, 1.0), ("mixtgauss", 2, 0.5, 0.01, 0.5)]:
            var_model.set_prior(*args)
            assert type(var_model.prior_of("fc1.weight")).__name__ == {
                "gaussian": "GaussianPrior", "conjugate": "ConjugatePrior",
                "conjugate_known_mean": "ConjugateKnownMeanPrior",
                "mixtgauss": "MixtureGaussianPrior"}[args[0]]
            assert torch.isfinite(var_model.prior_loss())
        sample = pv.Sample(var_model)
        sample.draw()
        a, b = sample(x[:4]), sample(x[:4])
        assert torch.equal(a, b) and torch.allclose(a.exp().sum(1), torch.ones(4))
        sample.draw()
        assert not torch.equal(a, sample(x[:4]))


def test_kl_reuses_the_sample_sigma_only_while_it_is_valid():
    """prior_loss() after a forward reuses that forward's σ = exp(log_std); after the scales
    change (optimizer step, load, dtype change) it must recompute: the KL always equals the one
    of a fresh model with the same state."""
    torch.manual_seed(0)
    vm = pv.variationalize(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)),
                                  init_std=0.1)

    def fresh_kl():
        other = pv.variationalize(copy.deepcopy(vm.model), init_std=0.1)
        other.load_state_dict(vm.state_dict())
        return other.prior_loss()

    x = torch.randn(3, 4)
    vm(x)
    assert vm._cached_sigmas([p.log_std for _, p in vm.named_posteriors()]) is not None
    torch.testing.assert_close(vm.prior_loss(), fresh_kl())
    opt = torch.optim.SGD(vm.parameters(), lr=0.5)
    (vm(x).sum() + vm.prior_loss()).backward()
    opt.step()                                    # in-place change of every log_std
    assert vm._cached_sigmas([p.log_std for _, p in vm.named_posteriors()]) is None
    torch.testing.assert_close(vm.prior_loss(), fresh_kl())
    # gradients through the shared σ equal those of an uncached KL
    vm(x)
    vm.zero_grad()
    vm.prior_loss().backward()
    cached = [p.grad.clone() for p in vm.parameters()]
    vm.__dict__.pop("_sigma_cache")
    vm.zero_grad()
    vm.prior_loss().backward()
    for a, p in zip(cached, vm.parameters()):
        torch.testing.assert_close(a, p.grad)
    vm(x)
    clone = copy.deepcopy(vm)
    assert "_sigma_cache" not in clone.__dict__
    vm.double()                                   # new storage, same Parameter objects
    assert vm._cached_sigmas([p.log_std for _, p in vm.named_posteriors()]) is None
    assert vm.prior_loss().dtype == torch.float64


def test_sample_is_frozen_converts_with_the_module_and_keeps_the_optimizer_noise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    vm = randomize(pv.variationalize(model, deterministic="2.bias"))
    vm.record_noise = True
    x = torch.randn(5, 3)
    vm.train()
    vm(x)
    last = vm.last_noise
    sample = pv.Sample(vm).draw()
    assert vm.last_noise is last                # drawing leaves the optimizer's record
    a = sample(x)
    with torch.no_grad():                       # training moves means and the fixed bias
        for p in vm.parameters():
            p.add_(0.1)
    assert torch.equal(sample(x), a)            # the draw does not follow
    sample.double()
    b = sample(x.double())
    assert b.dtype == torch.float64
    torch.testing.assert_close(b, a.double(), rtol=1e-6, atol=1e-6)


def test_deterministic_matches_any_name_of_a_tied_weight_and_refuses_typos():
    def tied():
        model = Tied()                       # enc.weight is dec.weight
        model.scale = nn.Parameter(torch.ones(4))
        return model

    assert set(posts(pv.variationalize(tied()))) == {"enc.weight", "scale"}
    for spec in ("dec.*", nn.Linear, ["enc.weight"], nn.Embedding):
        assert set(posts(pv.variationalize(tied(), deterministic=spec))) == {"scale"}, spec
    with pytest.raises(ValueError, match=r"deterministic: pattern\(s\) \['bais'\]"):
        pv.variationalize(MLP(), deterministic="bais")
    with pytest.raises(ValueError, match="bais"):
        pv.variationalize(MLP(), deterministic=["*.bias", "bais"])
