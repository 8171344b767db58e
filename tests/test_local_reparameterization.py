"""The opt-in local reparameterisation trick (Kingma, Salimans & Welling 2015) of
``variationalize(..., local_reparameterization=True)``: per-example pre-activation noise in
the plain Linear layers, with the exact marginal of the weight-noise model."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyvarinf2 as pv
from pyvarinf2.optim import IVON, VOGN, NoisyAdam, NoisyKFAC


def _randomized(vm, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, post in vm.named_posteriors():
            post.log_std.copy_(math.log(0.3) + 0.3 * torch.randn(post.log_std.shape, generator=g,
                                                                 dtype=post.log_std.dtype))
    return vm


def test_layer_outputs_have_the_exact_marginal_and_are_independent_per_example():
    torch.manual_seed(0)
    vm = _randomized(pv.variationalize(nn.Linear(4, 3).double(), local_reparameterization=True))
    x = torch.randn(1, 4, dtype=torch.float64)
    n = 200_000
    out = vm(x.expand(n, 4)).detach()          # n independent draws of one input
    post = dict(vm.named_posteriors())
    mean = F.linear(x, post["weight"].mean, post["bias"].mean)[0]
    var = (x ** 2 @ post["weight"].stddev.T ** 2)[0] + post["bias"].stddev ** 2
    se_mean = (var / n).sqrt()
    assert ((out.mean(0) - mean).abs() < 5 * se_mean).all()
    se_var = var * math.sqrt(2.0 / (n - 1))    # Gaussian: sd of the sample variance
    assert ((out.var(0) - var).abs() < 5 * se_var).all()
    # rows are independent (the shared weight sample would make them identical)
    corr = torch.corrcoef(torch.stack([out[0::2, 0], out[1::2, 0]]))[0, 1]
    assert abs(float(corr)) < 5 / math.sqrt(n / 2)
    vm.local_reparameterization = False
    shared = vm(x.expand(8, 4)).detach()
    assert torch.equal(shared, shared[:1].expand(8, 3))


def test_gradient_is_unbiased_for_the_expected_loss():
    # E_q[(x W^T + b - t)^2] = (x M^T + b_mean - t)^2 + x^2 s_W^2 + s_b^2 in closed form; the
    # local-reparameterisation gradient over n copies of x is an average of n independent
    # single-draw gradients of that expectation
    torch.manual_seed(1)
    vm = _randomized(pv.variationalize(nn.Linear(3, 2).double(), local_reparameterization=True))
    leaves = [p for p in vm.parameters()]
    x = torch.randn(1, 3, dtype=torch.float64)
    t = torch.randn(1, 2, dtype=torch.float64)
    n = 400_000
    est = torch.autograd.grad(((vm(x.expand(n, 3)) - t) ** 2).sum(1).mean(), leaves)
    post = dict(vm.named_posteriors())
    w, b = post["weight"], post["bias"]
    exact_loss = ((F.linear(x, w.mean, b.mean) - t) ** 2).sum() \
        + (x ** 2 @ torch.exp(2 * w.log_std).T).sum() + torch.exp(2 * b.log_std).sum()
    exact = torch.autograd.grad(exact_loss, leaves)
    for e, r in zip(est, exact):
        torch.testing.assert_close(e, r, rtol=0.03, atol=0.02)


def test_lower_gradient_variance_than_one_shared_weight_sample():
    torch.manual_seed(2)
    base = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 1)).double()
    x = torch.randn(64, 10, dtype=torch.float64)
    y = torch.randn(64, 1, dtype=torch.float64)

    def grad_var(local):
        vm = _randomized(pv.variationalize(copy.deepcopy(base), local_reparameterization=local))
        first = list(vm.named_posteriors())[0][1]   # the first layer's weight posterior
        draws = []
        for _ in range(300):
            g, = torch.autograd.grad(F.mse_loss(vm(x), y), [first.log_std])
            draws.append(g)
        return torch.stack(draws).var(0).mean()

    torch.manual_seed(3)
    shared = grad_var(False)
    torch.manual_seed(3)
    local = grad_var(True)
    assert local < 0.5 * shared, (float(local), float(shared))


def test_bayes_by_backprop_with_it_recovers_the_mean_field_optimum(one_thread):
    """As tests/test_variational.py's Bayes-by-backprop test on linear regression, with the
    trick on: the optimum (exact posterior mean, variances 1/diag(Lambda)) is the same."""
    torch.manual_seed(1)
    d, n, s, sp = 3, 50, 0.5, 1.0
    X = torch.randn(n, d, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64) \
        + s * torch.randn(n, dtype=torch.float64)
    Lam = X.T @ X / s ** 2 + torch.eye(d, dtype=torch.float64) / sp ** 2
    mu_star = torch.linalg.solve(Lam, X.T @ y / s ** 2)
    std_star = torch.diagonal(Lam).rsqrt()
    vm = pv.variationalize(nn.Linear(d, 1, bias=False).double(), prior=("gaussian", sp),
                           init_std=0.1, local_reparameterization=True)
    assert [p for p, *_ in vm.local_reparameterization_layers()] == [""]
    vm.train()
    steps = 3000
    opt = torch.optim.Adam(vm.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (2e-4 / 0.05) ** (t / steps))
    for _ in range(steps):
        opt.zero_grad()
        nll = ((y - vm(X).squeeze(-1)) ** 2).sum() / (2 * s ** 2)
        (nll + vm.prior_loss()).backward()
        opt.step()
        sched.step()
    post = dict(vm.named_posteriors())["weight"]
    mean, std = post.mean.detach().squeeze(0), post.stddev.detach().squeeze(0)
    assert ((mean - mu_star).abs() < 0.1 * std_star).all(), (mean, mu_star, std_star)
    assert ((std / std_star - 1).abs() < 0.03).all(), (std, std_star)


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(8, 2)
        self.head = nn.Linear(2, 2, bias=False)
        self.tied = nn.Linear(2, 2)
        self.tied_too = nn.Linear(2, 2)
        self.tied_too.weight = self.tied.weight

    def forward(self, x):
        h = self.fc(F.relu(self.conv(x)).flatten(1))
        return self.tied_too(self.tied(self.head(h)))


def test_which_layers_qualify_and_the_rest_share_one_weight_sample():
    torch.manual_seed(4)
    vm = pv.variationalize(_Mixed(), local_reparameterization=True, init_std=0.2,
                           deterministic="fc.bias")
    layers = {path: (w, b) for path, _, w, b in vm.local_reparameterization_layers()}
    # the conv is weight-sampled (positions of one image share its weights), tied weights too;
    # a deterministic bias stays the module's own
    assert layers == {"fc": ("fc.weight", None), "head": ("head.weight", None)}
    vm.train()
    out = vm(torch.randn(1, 1, 4, 4).expand(6, 1, 4, 4))
    assert not torch.allclose(out[0], out[1])
    # with the fully connected layers deterministic, the rows are identical again: the conv
    # sample is shared by the batch
    only_conv = pv.variationalize(_Mixed(), local_reparameterization=True, init_std=0.2,
                                  deterministic=nn.Linear)
    assert only_conv.local_reparameterization_layers() == []
    out = only_conv(torch.randn(1, 1, 4, 4).expand(6, 1, 4, 4))
    assert torch.equal(out, out[:1].expand_as(out))


def test_scales_and_means_get_finite_gradients_on_zero_inputs():
    vm = pv.variationalize(nn.Linear(3, 2, bias=False), local_reparameterization=True)
    vm(torch.zeros(4, 3)).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in vm.parameters())


def test_eval_mode_predictive_helpers_and_vmap_use_whole_weight_samples():
    torch.manual_seed(5)
    vm = _randomized(pv.variationalize(nn.Linear(3, 2), local_reparameterization=True))
    x = torch.randn(1, 3).expand(4, 3)
    vm.eval()
    torch.testing.assert_close(vm(x), vm.model(x))
    s = pv.predict.sample_predictions(vm, x, n_samples=5)
    assert torch.equal(s, s[:, :1].expand_as(s))       # one weight sample per function draw
    vm.train()
    out = torch.func.vmap(vm, randomness="different")(x.unsqueeze(1))
    assert out.shape == (4, 1, 2)


@pytest.mark.parametrize("make", [
    lambda vm: NoisyAdam(vm, dataset_size=10), lambda vm: VOGN(vm, dataset_size=10),
    lambda vm: IVON(vm, dataset_size=10), lambda vm: NoisyKFAC(vm, dataset_size=10)])
def test_natural_gradient_optimizers_refuse_it(make):
    vm = pv.variationalize(nn.Linear(3, 2), local_reparameterization=True)
    before = copy.deepcopy(vm.state_dict())
    with pytest.raises(ValueError, match="local_reparameterization"):
        make(vm)
    for k, v in vm.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, before[k])
    # switched on after the optimizer was built: the forward refuses
    vm.local_reparameterization = False
    make(vm)
    vm.local_reparameterization = True
    with pytest.raises(RuntimeError, match="local_reparameterization"):
        vm(torch.randn(2, 3))


def test_bad_uses_raise_clearly():
    with pytest.raises(TypeError, match="local_reparameterization must be True or False"):
        pv.variationalize(nn.Linear(3, 2), local_reparameterization="yes")
    vm = pv.variationalize(nn.Linear(3, 2), local_reparameterization=True)
    with pytest.raises(TypeError, match="local_reparameterization must be True or False"):
        vm.local_reparameterization = 1
    with pytest.raises(RuntimeError, match="input of shape"):
        vm(torch.randn(2, 5, 3))                    # positions of one example share weights
    assert vm(torch.randn(3)).shape == (2,)         # one unbatched example is fine

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(self.fc(x))

    vm = pv.variationalize(Twice(), local_reparameterization=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        vm(torch.randn(3, 2))
    assert not vm.model.fc._forward_hooks          # the failed forward left no hook behind
    vm.local_reparameterization = False
    assert vm(torch.randn(3, 2)).shape == (3, 2)


def test_state_dict_deepcopy_and_the_setting():
    vm = pv.variationalize(nn.Linear(3, 2), local_reparameterization=True)
    clone = copy.deepcopy(vm)
    assert clone.local_reparameterization is True
    fresh = pv.variationalize(nn.Linear(3, 2))
    fresh.load_state_dict(vm.state_dict())          # a compute setting, not part of the state
    assert fresh.local_reparameterization is False


def test_layers_read_outside_their_forward():
    # MultiheadAttention reads out_proj.weight directly: out_proj keeps the shared weight sample
    mha = pv.variationalize(nn.MultiheadAttention(4, 2), local_reparameterization=True)
    assert mha.local_reparameterization_layers() == []

    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return F.linear(x, self.fc.weight)      # never calls self.fc

    vm = pv.variationalize(Reads(), local_reparameterization=True)
    with pytest.warns(UserWarning, match="did not run"):
        vm(torch.randn(2, 3))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # said once per layer
        vm(torch.randn(2, 3))
