"""Monte-Carlo prediction helpers: vectorised vs looped sampling, eval-mode sampling, the
classification uncertainty decomposition against numpy, the regression predictive against the
closed form of a linear model."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import pyvarinf2 as pv
from pyvarinf2.predict import _draw_stacked


class CNN(nn.Module):
    """PyVarInf's README network (BatchNorm, conv, max-pool), small input."""

    def __init__(self, log_probs=True):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 3 * 3, 5)
        self.log_probs = log_probs

    def forward(self, x):
        x = self.bn1(F.relu(F.max_pool2d(self.conv1(x), 2)))
        x = self.fc(x.flatten(1))
        return F.log_softmax(x, dim=-1) if self.log_probs else x


def set_std(vm, std):
    for _, post in vm.named_posteriors():
        post.set_stddev(std)
    return vm


def loop_reference(vm, params, *args):
    """The S forwards one by one through functional_call with the given stacked samples."""
    n = next(iter(params.values())).shape[0]
    return torch.stack([functional_call(vm.model, {k: v[i] for k, v in params.items()}, args)
                        for i in range(n)])


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_vectorised_sampling_equals_the_loop_over_the_same_draws(chunk_size):
    vm = set_std(pv.variationalize(CNN()), 0.2)
    vm.train()  # helpers must sample in eval mode anyway
    x = torch.randn(6, 1, 8, 8)
    torch.manual_seed(4)
    with torch.no_grad():
        got = pv.sample_predictions(vm, x, n_samples=7, vectorize=True, chunk_size=chunk_size)
    torch.manual_seed(4)
    vm.eval()
    sizes = [7] if chunk_size is None else [3, 3, 1]
    with torch.no_grad():
        ref = torch.cat([loop_reference(vm, _draw_stacked(vm, k), x) for k in sizes])
    assert vm.training is False
    assert got.shape == (7, 6, 5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], got[1])


def test_sampling_is_in_eval_mode_and_restores_the_mode():
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    vm = pv.variationalize(model)
    vm.train()
    with torch.no_grad():  # some training so that the running statistics are not trivial
        for _ in range(3):
            vm(torch.randn(16, 3) * 2 + 1)
    stats = (model[1].running_mean.clone(), model[1].running_var.clone(),
             model[1].num_batches_tracked.clone())
    set_std(vm, 1e-9)  # weights ~ the means: what is left is dropout/BatchNorm behaviour
    x = torch.randn(5, 3)
    vm.eval()
    with torch.no_grad():
        mean_out = vm(x)
    vm.train()
    for vectorize in (True, False, None):
        with torch.no_grad():
            out = pv.sample_predictions(vm, x, n_samples=4, vectorize=vectorize)
        assert vm.training and model[1].training
        for s in out:  # no dropout, running statistics: every sample = the eval output
            torch.testing.assert_close(s, mean_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(model[1].running_mean, stats[0])
    assert torch.equal(model[1].running_var, stats[1])
    assert torch.equal(model[1].num_batches_tracked, stats[2])


def test_linear_model_regression_predictive_matches_the_closed_form():
    """y = W x + b with W_ij ~ N(M_ij, s_ij^2), b_i ~ N(m_i, t_i^2): predictive mean M x + m and
    epistemic variance sum_j s_ij^2 x_j^2 + t_i^2; both sampling paths."""
    model = nn.Linear(3, 2).double()
    vm = pv.variationalize(model)
    post = dict(vm.named_posteriors())
    s = torch.tensor([[0.1, 0.2, 0.05], [0.3, 0.1, 0.2]], dtype=torch.float64)
    t = torch.tensor([0.05, 0.15], dtype=torch.float64)
    post["weight"].set_stddev(s)
    post["bias"].set_stddev(t)
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.3, 2.0]], dtype=torch.float64)
    with torch.no_grad():
        mean_ref = model(x)
    var_ref = (x ** 2) @ (s ** 2).T + t ** 2
    n = 4000
    for vectorize in (True, False):
        with torch.no_grad():
            pred = pv.regression_predictive(vm, x, n_samples=n, noise_variance=0.25,
                                            vectorize=vectorize)
        se = (var_ref / n).sqrt()
        assert ((pred.mean - mean_ref).abs() < 4 * se).all()
        # sample variance: relative standard error sqrt(2/n) ~ 2.2%
        torch.testing.assert_close(pred.epistemic_variance, var_ref, rtol=0.1, atol=0)
        torch.testing.assert_close(pred.aleatoric_variance, torch.full_like(var_ref, 0.25))
        torch.testing.assert_close(pred.variance, pred.epistemic_variance + 0.25)
        with torch.no_grad():
            m = pv.predictive_mean(vm, x, n_samples=n, vectorize=vectorize)
        assert ((m - mean_ref).abs() < 4 * se).all()


def test_regression_predictive_is_the_law_of_total_variance_of_the_samples():
    class Hetero(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            out = self.lin(x)
            return out[:, :1], F.softplus(out[:, 1:])  # (mean, noise variance)

    vm = set_std(pv.variationalize(Hetero()), 0.3)
    x = torch.randn(4, 2)
    torch.manual_seed(7)
    with torch.no_grad():
        means, variances = pv.sample_predictions(vm, x, n_samples=50)
    torch.manual_seed(7)
    with torch.no_grad():
        pred = pv.regression_predictive(vm, x, n_samples=50)
    mean = means.mean(0)
    torch.testing.assert_close(pred.mean, mean)
    torch.testing.assert_close(pred.aleatoric_variance, variances.mean(0))
    torch.testing.assert_close(pred.epistemic_variance, ((means - mean) ** 2).mean(0))
    torch.testing.assert_close(pred.variance, variances.mean(0) + means.var(0, unbiased=False))


def _np_decomposition(p):
    p = p.double().numpy()
    pbar = p.mean(0)
    h = -(pbar * np.log(pbar)).sum(-1)
    eh = (-(p * np.log(p)).sum(-1)).mean(0)
    return pbar, h, eh


def test_classification_uncertainty_against_numpy_and_logits_vs_log_probs():
    vm_lp = set_std(pv.variationalize(CNN(log_probs=True)), 0.3)
    vm_logits = pv.variationalize(CNN(log_probs=False))
    vm_logits.load_state_dict(vm_lp.state_dict())
    x = torch.randn(6, 1, 8, 8)
    torch.manual_seed(2)
    with torch.no_grad():
        pred = pv.classification_predictive(vm_lp, x, n_samples=30)
    torch.manual_seed(2)
    with torch.no_grad():
        probs = pv.predictive_probs(vm_logits, x, n_samples=30)
    torch.testing.assert_close(pred.probs, probs, rtol=1e-5, atol=1e-6)  # softmax of either
    torch.testing.assert_close(probs.sum(-1), torch.ones(6))
    assert pred.sample_probs.shape == (30, 6, 5)
    pbar, h, eh = _np_decomposition(pred.sample_probs)
    np.testing.assert_allclose(pred.probs.numpy(), pbar, rtol=1e-5)
    np.testing.assert_allclose(pred.predictive_entropy.numpy(), h, rtol=1e-5)
    np.testing.assert_allclose(pred.expected_entropy.numpy(), eh, rtol=1e-5)
    np.testing.assert_allclose(pred.mutual_information.numpy(), h - eh, rtol=1e-4, atol=1e-6)
    assert (pred.mutual_information > 1e-3).all()
    # the stand-alone functions agree, with the class dim given either way
    torch.testing.assert_close(pv.predictive_entropy(pred.sample_probs), pred.predictive_entropy)
    torch.testing.assert_close(pv.expected_entropy(pred.sample_probs, dim=1),
                               pred.expected_entropy)
    torch.testing.assert_close(pv.mutual_information(pred.sample_probs.transpose(1, 2), dim=0),
                               pred.mutual_information)


def test_mutual_information_vanishes_without_weight_uncertainty():
    vm = set_std(pv.variationalize(CNN()), 1e-9)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        pred = pv.classification_predictive(vm, x, n_samples=10)
        vm.eval()
        ref = vm(x).exp()
    torch.testing.assert_close(pred.probs, ref, rtol=1e-5, atol=1e-6)
    assert (pred.mutual_information < 1e-6).all()
    assert (pred.predictive_entropy > 0.1).all()
    # more weight noise, more epistemic uncertainty
    set_std(vm, 0.5)
    with torch.no_grad():
        noisy = pv.classification_predictive(vm, x, n_samples=50)
    assert (noisy.mutual_information > 1e-3).all()


def test_entropies_of_known_distributions():
    # two samples: one-hot on class 0 and one-hot on class 1 -> H[mean] = log 2, E[H] = 0
    p = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert float(pv.predictive_entropy(p)) == pytest.approx(np.log(2))
    assert float(pv.expected_entropy(p)) == 0.0
    assert float(pv.mutual_information(p)) == pytest.approx(np.log(2))
    # identical uniform samples: all aleatoric
    u = torch.full((3, 1, 4), 0.25)
    assert float(pv.predictive_entropy(u)) == pytest.approx(np.log(4))
    assert float(pv.expected_entropy(u)) == pytest.approx(np.log(4))
    assert float(pv.mutual_information(u)) == pytest.approx(0.0, abs=1e-7)


def test_auto_falls_back_to_the_loop_for_models_vmap_cannot_run():
    """An LSTM (no vmap batching rule) returning nested tuples: the automatic mode loops."""
    vm = set_std(pv.variationalize(nn.LSTM(3, 4, num_layers=2)), 0.1)
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        out, (h, c) = pv.sample_predictions(vm, x, n_samples=3)
    assert out.shape == (3, 5, 2, 4) and h.shape == (3, 2, 2, 4) and c.shape == (3, 2, 2, 4)
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(RuntimeError):
        pv.sample_predictions(vm, x, n_samples=3, vectorize=True)


def test_predictions_are_differentiable_in_the_inputs_when_grad_is_on():
    vm = set_std(pv.variationalize(nn.Linear(3, 1)), 0.1)
    x = torch.randn(2, 3, requires_grad=True)
    torch.manual_seed(3)
    m = pv.predictive_mean(vm, x, n_samples=5, vectorize=True)
    (g,) = torch.autograd.grad(m.sum(), x)
    # d/dx of the MC mean of a linear map is the mean of the sampled weights
    torch.manual_seed(3)
    with torch.no_grad():
        w = _draw_stacked(vm, 5)["weight"].mean(0)
    torch.testing.assert_close(g, w.expand(2, 3))
    assert not torch.allclose(w, vm.model.weight.detach())


@pytest.mark.parametrize("call,match", [
    (lambda vm, x: pv.sample_predictions(nn.Linear(3, 2), x), "var_model"),
    (lambda vm, x: pv.sample_predictions(vm, x, n_samples=0), "n_samples"),
    (lambda vm, x: pv.sample_predictions(vm, x, n_samples=2.5), "n_samples"),
    (lambda vm, x: pv.sample_predictions(vm, x, vectorize="yes"), "vectorize"),
    (lambda vm, x: pv.sample_predictions(vm, x, chunk_size=0), "chunk_size"),
    (lambda vm, x: pv.predictive_probs(vm, x, dim=1.5), "dim"),
    (lambda vm, x: pv.regression_predictive(vm, x, noise_variance=-1.0), "noise_variance"),
    (lambda vm, x: pv.regression_predictive(vm, x, noise_variance=torch.tensor([0.1, -0.1])),
     "noise_variance"),
    (lambda vm, x: pv.predictive_entropy([[0.5, 0.5]]), "sample_probs"),
    (lambda vm, x: pv.mutual_information(torch.ones(3, 2) / 2, dim=1), "dim"),
    (lambda vm, x: pv.expected_entropy(torch.ones(3, 2) / 2, dim=-2), "dim"),
])
def test_bad_input_is_rejected_before_anything_runs(call, match):
    vm = pv.variationalize(nn.Linear(3, 2))
    vm.train()
    x = torch.randn(4, 3)
    before = {k: v.clone() for k, v in vm.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises((TypeError, ValueError), match=match):
        call(vm, x)
    assert vm.training
    for k, v in vm.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, before[k])


def test_predictive_helpers_restore_every_module_mode_and_keep_the_optimizer_noise():
    # the helpers run in evaluation mode and put back each module's own mode (a dropout kept
    # in train mode inside an eval model, a BatchNorm frozen in eval inside a train model), and
    # leave the noise record a natural-gradient optimizer reads between backward and step
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    vm = pv.variationalize(model)
    vm.record_noise = True
    x = torch.randn(6, 3)
    for outer, inner in ((True, "bn"), (False, "dropout")):
        vm.train(outer)
        module = model[1] if inner == "bn" else model[2]
        module.train(not outer)
        vm(x) if outer else None
        modes = [m.training for m in vm.modules()]
        last = vm.last_noise
        for vectorize in (True, False):
            pv.predictive_probs(vm, x, n_samples=3, vectorize=vectorize)
            assert [m.training for m in vm.modules()] == modes
            assert vm.last_noise is last


def test_looped_predictive_draws_whole_weight_samples_with_local_reparameterization():
    # with the opt-in local reparameterisation (a training-time estimator) the predictive must
    # still draw one weight sample for all inputs: identical rows get identical outputs
    torch.manual_seed(0)
    vm = pv.variationalize(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)),
                           init_std=0.5, local_reparameterization=True)
    x = torch.randn(1, 3).repeat(5, 1)
    for vectorize in (True, False):
        out = pv.sample_predictions(vm, x, n_samples=4, vectorize=vectorize)
        assert torch.equal(out, out[:, :1].expand_as(out))
        assert not torch.equal(out[0], out[1])            # but the samples differ
    vm.train()
    out = vm(x)                                           # training: per example
    assert not torch.equal(out[0], out[1])
