"""Priors: log densities against scipy, KLs against torch.distributions and independent
high-sample Monte-Carlo estimates, the default Gaussian scale rule, the natural-gradient helpers."""
import math

import numpy as np
import pytest
import torch
import torch.distributions as D
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import integrate, special, stats

import pyvarinf2 as pv
from pyvarinf2.priors import (ConjugateKnownMeanPrior, ConjugatePrior, DistributionPrior,
                              GaussianPrior, MixtureGaussianPrior, gaussian_entropy, make_prior)

HYP = settings(max_examples=15, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture])


def t64(x):
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


# ----------------------------------------------------------------------------- reference densities
def ref_conjugate_known_mean(x, mean, a0, b0):
    """theta_i | s2 ~ N(mean, s2), s2 ~ InvGamma(a0, b0): a multivariate t with 2 a0 degrees of
    freedom, location mean and shape (b0/a0) I."""
    n = x.shape[-1]
    return stats.multivariate_t(loc=np.full(n, mean), shape=(b0 / a0) * np.eye(n),
                                df=2 * a0).logpdf(x)


def ref_conjugate(x, mu0, kappa0, a0, b0):
    """theta_i | mu, s2 ~ N(mu, s2), mu | s2 ~ N(mu0, s2/kappa0), s2 ~ InvGamma(a0, b0): given s2,
    theta ~ N(mu0 1, s2 (I + 1 1^T / kappa0)); integrating s2 out gives a multivariate t."""
    n = x.shape[-1]
    shape = (b0 / a0) * (np.eye(n) + np.ones((n, n)) / kappa0)
    return stats.multivariate_t(loc=np.full(n, mu0), shape=shape, df=2 * a0).logpdf(x)


def ref_mixture(x, s1, s2, pi):
    l1 = np.log(pi) + stats.norm.logpdf(x, 0.0, s1)
    l2 = np.log1p(-pi) + stats.norm.logpdf(x, 0.0, s2)
    return special.logsumexp(np.stack([l1, l2]), axis=0).sum(-1)


# ----------------------------------------------------------------------------- Gaussian prior
@pytest.mark.parametrize("prior_std,prior_mean", [(0.3, 0.0), (2.0, -0.7), (None, 0.0),
                                                  (None, 1.5)])
@pytest.mark.parametrize("shape", [(7,), (4, 6), (3, 2, 5)])
def test_gaussian_kl_closed_form_matches_torch_distributions(prior_std, prior_mean, shape):
    mean = torch.randn(shape, dtype=torch.float64)
    std = torch.rand(shape, dtype=torch.float64) * 0.9 + 0.05
    prior = GaussianPrior(std=prior_std, mean=prior_mean)
    sp = prior_std if prior_std is not None else (
        1.0 / math.sqrt(math.prod(shape[1:])) if len(shape) > 1 else 1.0)
    expected = D.kl_divergence(D.Normal(mean, std), D.Normal(torch.full_like(mean, prior_mean),
                                                            torch.full_like(mean, sp))).sum()
    got = prior.kl(mean, std)
    assert got.shape == ()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # and the log density
    theta = torch.randn(shape, dtype=torch.float64)
    np.testing.assert_allclose(float(prior.log_prob(theta)),
                               stats.norm.logpdf(theta.numpy(), prior_mean, sp).sum(), rtol=1e-12)


def test_model_prior_loss_matches_torch_distributions_with_gradients():
    """The model's (fused) prior_loss: value and gradients in mean and scale against the textbook
    KL of torch.distributions differentiated by autograd."""
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Conv1d(4, 3, 2), nn.LayerNorm(3)).double()
    vm = pv.variationalize(model)
    vm.set_prior("gaussian", std=0.5, mean=0.2, parameters="0.bias")
    for _, post in vm.named_posteriors():
        post.set_stddev(torch.rand_like(post.mean) * 0.5 + 0.01)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    kl = vm.prior_loss()
    leaves = vm.mean_parameters() + vm.scale_parameters()
    grads = torch.autograd.grad(kl, leaves)

    # reference from torch.distributions, through the public posterior tensors
    ref = 0.0
    for name, post in vm.named_posteriors():
        if name == "0.bias":
            sp, m0 = 0.5, 0.2
        else:
            shape = post.mean.shape
            sp = 1.0 / math.sqrt(math.prod(shape[1:])) if len(shape) > 1 else 1.0
            m0 = 0.0
        ref = ref + D.kl_divergence(D.Normal(post.mean, post.stddev),
                                    D.Normal(torch.full_like(post.mean, m0),
                                             torch.full_like(post.mean, sp))).sum()
    ref_grads = torch.autograd.grad(ref, leaves)
    torch.testing.assert_close(kl, ref, rtol=1e-12, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("module,name,expected", [
    (nn.Linear(20, 5), "weight", 1 / math.sqrt(20)),
    (nn.Linear(20, 5), "bias", 1.0),
    (nn.Conv2d(3, 4, 5), "weight", 1 / math.sqrt(3 * 25)),
    (nn.Conv1d(6, 4, 3, groups=2), "weight", 1 / math.sqrt(3 * 3)),
    (nn.Embedding(11, 7), "weight", 1 / math.sqrt(7)),
    (nn.BatchNorm2d(4), "weight", 1.0),
    (nn.LSTM(3, 8), "weight_hh_l0", 1 / math.sqrt(8)),
])
def test_gaussian_default_std_rule(module, name, expected):
    vm = pv.variationalize(module)
    prior = vm.prior_of(name)
    like = vm._mean_of(name)
    assert prior.resolve_std(like) == pytest.approx(expected, rel=1e-12)
    assert torch.allclose(prior.damping_precision(like), torch.full_like(like, 1 / expected ** 2))
    assert prior.variance(like) == pytest.approx(expected ** 2)


# ----------------------------------------------------------------------------- log densities
@HYP
@given(a0=st.floats(0.3, 8.0), b0=st.floats(0.05, 5.0), mean=st.floats(-2.0, 2.0),
       n=st.integers(1, 9), scale=st.floats(0.01, 3.0), seed=st.integers(0, 2 ** 16))
def test_conjugate_known_mean_log_prob_matches_multivariate_t(a0, b0, mean, n, scale, seed):
    x = np.random.default_rng(seed).normal(mean, scale, size=n)
    prior = ConjugateKnownMeanPrior(1, mean=mean, alpha_0=a0, beta_0=b0)
    np.testing.assert_allclose(float(prior.log_prob(t64(x))),
                               ref_conjugate_known_mean(x, mean, a0, b0), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("a0,b0,mean,x", [(1.5, 0.7, 0.3, [0.1, -0.4, 1.2]),
                                          (3.0, 2.0, -1.0, [-1.5, 0.2]),
                                          (0.6, 0.2, 0.0, [0.05, -0.02, 0.3, 0.1])])
def test_conjugate_known_mean_log_prob_by_integrating_the_variance(a0, b0, mean, x):
    """Independent of the closed form: integrate prod_i N(x_i; mean, s2) InvGamma(s2; a0, b0)
    over s2 with scipy.integrate.quad."""
    x = np.asarray(x)

    def integrand(log_s2):  # over log s2 for a well-scaled integrand; ds2 = s2 dlog s2
        s2 = math.exp(log_s2)
        return (math.exp(stats.norm.logpdf(x, mean, math.sqrt(s2)).sum()
                         + stats.invgamma.logpdf(s2, a0, scale=b0)) * s2)

    value, err = integrate.quad(integrand, -30, 15, limit=400, epsabs=0, epsrel=1e-11)
    prior = ConjugateKnownMeanPrior(1, mean, a0, b0)
    assert float(prior.log_prob(t64(x))) == pytest.approx(math.log(value), abs=1e-7)


@HYP
@given(a0=st.floats(0.3, 8.0), b0=st.floats(0.05, 5.0), mu0=st.floats(-2.0, 2.0),
       k0=st.floats(0.05, 20.0), n=st.integers(1, 9), scale=st.floats(0.01, 3.0),
       seed=st.integers(0, 2 ** 16))
def test_conjugate_log_prob_matches_multivariate_t(a0, b0, mu0, k0, n, scale, seed):
    x = np.random.default_rng(seed).normal(mu0 + 0.5, scale, size=n)
    prior = ConjugatePrior(1, alpha_0=a0, beta_0=b0, mu_0=mu0, kappa_0=k0)
    np.testing.assert_allclose(float(prior.log_prob(t64(x))), ref_conjugate(x, mu0, k0, a0, b0),
                               rtol=1e-9, atol=1e-9)


@HYP
@given(s1=st.floats(1e-3, 5.0), s2=st.floats(1e-4, 5.0), pi=st.floats(0.01, 0.99),
       n=st.integers(1, 20), scale=st.floats(1e-3, 10.0), seed=st.integers(0, 2 ** 16))
def test_mixture_log_prob_matches_scipy(s1, s2, pi, n, scale, seed):
    x = np.random.default_rng(seed).normal(0.0, scale, size=n)
    prior = MixtureGaussianPrior(1, s1, s2, pi)
    np.testing.assert_allclose(float(prior.log_prob(t64(x))), ref_mixture(x, s1, s2, pi),
                               rtol=1e-10, atol=1e-9)


def test_mixture_log_prob_exact_far_in_the_tail():
    # REFERENCE: PyVarInf's unnormalised density + 1e-8 gives -19.3 here; the truth is -1798.6
    prior = MixtureGaussianPrior(1, sigma_1=0.05, sigma_2=0.01, pi=0.5)
    for dtype in (torch.float32, torch.float64):
        lp = prior.log_prob(torch.tensor([3.0], dtype=dtype))
        assert float(lp) == pytest.approx(-1798.6, abs=0.05)
        assert float(lp) == pytest.approx(ref_mixture(np.array([3.0]), 0.05, 0.01, 0.5),
                                          rel=1e-6)
    # the gradient stays finite and exact (-theta/s1^2, the wider component dominates)
    theta = torch.tensor([3.0, -50.0], dtype=torch.float32, requires_grad=True)
    (g,) = torch.autograd.grad(prior.log_prob(theta), theta)
    torch.testing.assert_close(g, -theta.detach() / 0.05 ** 2)
    # and a Monte-Carlo KL with tiny posterior scales far out stays finite in float32
    kl = MixtureGaussianPrior(4, 0.05, 0.01, 0.5).kl(torch.full((10,), 3.0),
                                                     torch.full((10,), 1e-6))
    assert torch.isfinite(kl)


def test_distribution_prior_log_prob_and_closed_form_kl():
    dist = D.Laplace(0.1, 0.4)
    prior = DistributionPrior(dist)
    theta = torch.randn(5, 3)
    torch.testing.assert_close(prior.log_prob(theta), dist.log_prob(theta).sum())
    assert prior.closed_form
    mean, std = torch.randn(5, 3), torch.rand(5, 3) + 0.1
    torch.testing.assert_close(prior.kl(mean, std),
                               D.kl_divergence(D.Normal(mean, std), dist).sum())


# ----------------------------------------------------------------------------- Monte-Carlo KLs
def _mc_kl_check(prior, mean, std, ref_logp, seed, n_ref=100_000):
    """prior.kl (n_mc_samples draws, closed-form entropy) against an independent numpy/scipy
    estimate of E_q[log q - log p] from n_ref draws; tolerance from both standard errors."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(mean, std, size=(n_ref, mean.size))
    logp = ref_logp(theta)
    logq = stats.norm.logpdf(theta, mean, std).sum(-1)
    ref = float(np.mean(logq - logp))
    se_ref = float(np.std(logq - logp)) / math.sqrt(n_ref)
    se_ours = float(np.std(logp)) / math.sqrt(prior.n_mc_samples)
    torch.manual_seed(seed)
    got = float(prior.kl(t64(mean), t64(std)))
    tol = 5.0 * math.hypot(se_ref, se_ours) + 1e-9 * abs(ref)
    assert abs(got - ref) < tol, (got, ref, tol)


MC_SETTINGS = settings(max_examples=6, deadline=None, derandomize=True,
                       suppress_health_check=[HealthCheck.function_scoped_fixture])


@MC_SETTINGS
@given(a0=st.floats(0.5, 6.0), b0=st.floats(0.05, 3.0), m=st.floats(-1.0, 1.0),
       seed=st.integers(0, 1000))
def test_conjugate_known_mean_kl_matches_independent_estimate(a0, b0, m, seed):
    rng = np.random.default_rng(seed + 1)
    mean, std = rng.normal(m, 0.5, size=6), np.exp(rng.uniform(np.log(0.05), 0.0, size=6))
    prior = ConjugateKnownMeanPrior(2000, m, a0, b0)
    _mc_kl_check(prior, mean, std, lambda th: ref_conjugate_known_mean(th, m, a0, b0), seed)


@MC_SETTINGS
@given(a0=st.floats(0.5, 6.0), b0=st.floats(0.05, 3.0), mu0=st.floats(-1.0, 1.0),
       k0=st.floats(0.1, 10.0), seed=st.integers(0, 1000))
def test_conjugate_kl_matches_independent_estimate(a0, b0, mu0, k0, seed):
    rng = np.random.default_rng(seed + 1)
    mean, std = rng.normal(mu0, 0.5, size=6), np.exp(rng.uniform(np.log(0.05), 0.0, size=6))
    prior = ConjugatePrior(2000, a0, b0, mu0, k0)
    _mc_kl_check(prior, mean, std, lambda th: ref_conjugate(th, mu0, k0, a0, b0), seed)


@MC_SETTINGS
@given(s1=st.floats(0.05, 3.0), s2=st.floats(1e-3, 0.5), pi=st.floats(0.05, 0.95),
       seed=st.integers(0, 1000))
def test_mixture_kl_matches_independent_estimate(s1, s2, pi, seed):
    rng = np.random.default_rng(seed + 1)
    mean, std = rng.normal(0, 0.3, size=6), np.exp(rng.uniform(np.log(0.01), 0.0, size=6))
    prior = MixtureGaussianPrior(2000, s1, s2, pi)
    _mc_kl_check(prior, mean, std, lambda th: ref_mixture(th, s1, s2, pi), seed)


def test_distribution_prior_without_closed_form_uses_monte_carlo():
    dist = D.StudentT(3.0, 0.0, 0.5)
    prior = DistributionPrior(dist, n_mc_samples=2000)
    assert not prior.closed_form
    mean, std = np.array([0.3, -0.2, 1.0]), np.array([0.1, 0.4, 0.2])
    _mc_kl_check(prior, mean, std,
                 lambda th: stats.t.logpdf(th, 3.0, 0.0, 0.5).sum(-1), seed=3)


def test_monte_carlo_kl_is_differentiable_and_unbiased_in_the_mean():
    """d KL / d mean of the mixture prior: the average of many 1-sample estimates against an
    independent estimate of E_q[-d log p(theta) / d theta] (the entropy does not depend on the
    mean)."""
    s1, s2, pi = 0.5, 0.05, 0.3
    prior = MixtureGaussianPrior(4000, s1, s2, pi)
    mean = torch.tensor([0.3, -0.1, 0.02], dtype=torch.float64, requires_grad=True)
    std = torch.tensor([0.1, 0.05, 0.2], dtype=torch.float64, requires_grad=True)
    g_mean, g_std = torch.autograd.grad(prior.kl(mean, std), (mean, std))
    rng = np.random.default_rng(0)
    eps = rng.normal(size=(200_000, 3))
    th = mean.detach().numpy() + std.detach().numpy() * eps
    l1 = np.log(pi) + stats.norm.logpdf(th, 0, s1)
    l2 = np.log1p(-pi) + stats.norm.logpdf(th, 0, s2)
    w1 = np.exp(l1 - np.logaddexp(l1, l2))
    dlogp = -th * (w1 / s1 ** 2 + (1 - w1) / s2 ** 2)
    ref_mean = -dlogp.mean(0)
    ref_std = -(dlogp * eps).mean(0) - 1.0 / std.detach().numpy()
    np.testing.assert_allclose(g_mean.numpy(), ref_mean, rtol=0.05, atol=0.5)
    np.testing.assert_allclose(g_std.numpy(), ref_std, rtol=0.05, atol=1.0)


# ----------------------------------------------------------------------------- helpers for optimizers
@pytest.mark.parametrize("prior", [
    GaussianPrior(0.3, 0.1), GaussianPrior(), ConjugatePrior(1, 2.0, 1.0, 0.2, 3.0),
    ConjugateKnownMeanPrior(1, 0.1, 2.0, 0.5), MixtureGaussianPrior(1, 0.5, 0.01, 0.3),
    DistributionPrior(D.Laplace(0.0, 0.5)),
])
def test_log_prob_grad_matches_autograd(prior):
    theta = torch.randn(4, 3, dtype=torch.float64) * 0.3
    t = theta.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(prior.log_prob(t), t)
    torch.testing.assert_close(prior.log_prob_grad(theta), ref)


@pytest.mark.parametrize("prior,ref", [
    (MixtureGaussianPrior(1, 0.5, 0.01, 0.3), stats.norm(0, 0.5).var() * 0.3 + 0.7 * 1e-4),
    (ConjugateKnownMeanPrior(1, 0.0, 3.0, 2.0), stats.t(6.0, 0.0, math.sqrt(2 / 3)).var()),
    # one entry of the conjugate prior: a t with 2 a0 dof and scale^2 (b0/a0)(1 + 1/kappa0)
    (ConjugatePrior(1, 3.0, 2.0, 0.5, 4.0),
     stats.t(6.0, 0.5, math.sqrt(2 / 3 * (1 + 1 / 4.0))).var()),
    (DistributionPrior(D.Normal(0.0, 0.7)), 0.49),
])
def test_prior_marginal_variance(prior, ref):
    like = torch.zeros(3, 2)
    assert prior.variance(like) == pytest.approx(ref, rel=1e-6)
    torch.testing.assert_close(prior.damping_precision(like), torch.full_like(like, 1 / ref),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("dist,stand_in", [
    (D.Cauchy(0.0, 0.5), 0.25), (D.StudentT(2.0, 0.0, 0.3), 0.09),
    (D.StudentT(1.5, 0.0, torch.tensor([0.2, 0.4])), (0.04 + 0.16) / 2),
])
def test_a_prior_without_finite_variance_warns_and_uses_its_scale(dist, stand_in):
    prior = DistributionPrior(dist)
    like = torch.zeros(3, 2)
    with pytest.warns(UserWarning, match="no finite variance.*scale squared"):
        assert prior.variance(like) == pytest.approx(stand_in, rel=1e-6)


def test_gaussian_entropy():
    std = torch.rand(4, 5) + 0.1
    torch.testing.assert_close(gaussian_entropy(std), D.Normal(torch.zeros_like(std), std)
                               .entropy().sum())


def test_make_prior_positional_orders_are_pyvarinfs():
    p = make_prior("conjugate", 3, 1.5, 2.5, 0.1, 4.0)  # n_mc, alpha_0, beta_0, mu_0, kappa_0
    assert (p.n_mc_samples, p.alpha_0, p.beta_0, p.mu_0, p.kappa_0) == (3, 1.5, 2.5, 0.1, 4.0)
    p = make_prior("conjugate_known_mean", 2, 0.3, 1.5, 2.5)  # n_mc, mean, alpha_0, beta_0
    assert (p.n_mc_samples, p.mean, p.alpha_0, p.beta_0) == (2, 0.3, 1.5, 2.5)
    p = make_prior("mixtgauss", 5, 0.7, 0.02, 0.25)  # n_mc, sigma_1, sigma_2, pi
    assert (p.n_mc_samples, p.sigma_1, p.sigma_2, p.pi) == (5, 0.7, 0.02, 0.25)
    p = make_prior("gaussian", 0.4, 0.1)
    assert (p.std, p.mean) == (0.4, 0.1)
    p = make_prior(D.Normal(0.0, 2.0))
    assert isinstance(p, DistributionPrior) and p.closed_form
