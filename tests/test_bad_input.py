"""Bad input raises a clear exception naming the argument (and its value) before anything
changes: the model, its posteriors and its priors are checked unchanged after every failure."""
import copy
import math

import pytest
import torch
import torch.distributions as D
import torch.nn as nn

import pyvarinf2 as pv
from pyvarinf2.priors import DistributionPrior, make_prior


def make_model():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def fingerprint(vm):
    """Everything that could change: tensors of the state, the priors' settings, the posterior
    structure, the mode."""
    tensors = {k: v.detach().clone() for k, v in vm.state_dict().items() if torch.is_tensor(v)}
    priors = {n: repr(p) for n, p in vm.named_priors()}
    return tensors, priors, [k for k, _ in vm.named_posteriors()], vm.training


def assert_same(vm, before):
    tensors, priors, keys, training = fingerprint(vm)
    assert set(tensors) == set(before[0])
    for k, v in tensors.items():
        assert torch.equal(v, before[0][k]), k
    assert priors == before[1]
    assert keys == before[2]
    assert training == before[3]


@pytest.fixture
def vm():
    model = make_model()
    v = pv.variationalize(model)
    v.set_prior("mixtgauss", 2, 0.5, 0.01, 0.3, parameters="*.bias")
    with torch.no_grad():
        for _, post in v.named_posteriors():
            post.set_stddev(torch.rand_like(post.mean) * 0.1 + 0.01)
    return v


# ----------------------------------------------------------------------------- variationalize
@pytest.mark.parametrize("model,exc,words", [
    (3, TypeError, ["model", "int"]),
    ("a string", TypeError, ["model", "str"]),
    (torch.randn(3), TypeError, ["model", "Tensor"]),
    (nn.ReLU(), ValueError, ["no parameters", "ReLU"]),
])
def test_variationalize_rejects_non_modules_and_models_without_parameters(model, exc, words):
    with pytest.raises(exc) as info:
        pv.variationalize(model)
    for w in words:
        assert w in str(info.value)


def test_variationalize_rejects_a_model_with_nothing_to_put_a_posterior_on():
    model = make_model()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        pv.variationalize(model)
    with pytest.raises(ValueError, match="no trainable parameter"):
        pv.variationalize(make_model(), deterministic="*")
    with pytest.raises(TypeError, match="already a VariationalModel"):
        pv.variationalize(pv.variationalize(make_model()))


@pytest.mark.parametrize("kwargs,exc,words", [
    ({"prior": "gauss"}, ValueError, ["unknown prior", "'gauss'"]),
    ({"prior": 3}, TypeError, ["prior", "int"]),
    ({"prior": ("gaussian", -1.0)}, ValueError, ["std", "-1.0"]),
    ({"prior": ("mixtgauss", 1, 0.1, 0.01, 1.0)}, ValueError, ["pi", "1.0"]),
    ({"init_std": 0.0}, ValueError, ["init_std", "0.0"]),
    ({"init_std": -1e-3}, ValueError, ["init_std", "-0.001"]),
    ({"init_std": float("nan")}, ValueError, ["init_std", "nan"]),
    ({"init_std": float("inf")}, ValueError, ["init_std", "inf"]),
    ({"init_std": "0.1"}, ValueError, ["init_std", "'0.1'"]),
    ({"deterministic": 3}, TypeError, ["deterministic", "3"]),
    ({"deterministic": [nn.Linear, 2.5]}, TypeError, ["deterministic", "2.5"]),
])
def test_variationalize_rejects_bad_options_and_leaves_the_model_alone(kwargs, exc, words):
    model = make_model()
    state = copy.deepcopy(model.state_dict())
    attrs = set(vars(model))
    modules = [m for m in model.modules()]
    with pytest.raises(exc) as info:
        pv.variationalize(model, **kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    assert set(vars(model)) == attrs and list(model.modules()) == modules
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


# ----------------------------------------------------------------------------- set_prior
BAD_PRIORS = [
    (("gaussians",), ValueError, ["unknown prior", "'gaussians'"]),
    (("",), ValueError, ["unknown prior"]),
    ((None,), TypeError, ["prior", "NoneType"]),
    (("gaussian", 0.0), ValueError, ["std", "0.0"]),
    (("gaussian", -0.5), ValueError, ["std", "-0.5"]),
    (("gaussian", float("nan")), ValueError, ["std", "nan"]),
    (("gaussian", 1.0, float("inf")), ValueError, ["mean", "inf"]),
    (("mixtgauss", 1, 0.0, 0.01, 0.5), ValueError, ["sigma_1", "0.0"]),
    (("mixtgauss", 1, 0.1, -0.01, 0.5), ValueError, ["sigma_2", "-0.01"]),
    (("mixtgauss", 1, 0.1, 0.01, 0.0), ValueError, ["pi", "0.0"]),
    (("mixtgauss", 1, 0.1, 0.01, 1.0), ValueError, ["pi", "1.0"]),
    (("mixtgauss", 1, 0.1, 0.01, -0.2), ValueError, ["pi", "-0.2"]),
    (("mixtgauss", 1, 0.1, 0.01, 1.5), ValueError, ["pi", "1.5"]),
    (("mixtgauss", 1, 0.1, 0.01, float("nan")), ValueError, ["pi", "nan"]),
    (("mixtgauss", 0, 0.1, 0.01, 0.5), ValueError, ["n_mc_samples", "0"]),
    (("mixtgauss", -3, 0.1, 0.01, 0.5), ValueError, ["n_mc_samples", "-3"]),
    (("mixtgauss", 2.5, 0.1, 0.01, 0.5), ValueError, ["n_mc_samples", "2.5"]),
    (("conjugate", 0, 1.0, 1.0, 0.0, 1.0), ValueError, ["n_mc_samples", "0"]),
    (("conjugate", 1, 0.0, 1.0, 0.0, 1.0), ValueError, ["alpha_0", "0.0"]),
    (("conjugate", 1, 1.0, -2.0, 0.0, 1.0), ValueError, ["beta_0", "-2.0"]),
    (("conjugate", 1, 1.0, 1.0, 0.0, 0.0), ValueError, ["kappa_0", "0.0"]),
    (("conjugate", 1, 1.0, 1.0, float("nan"), 1.0), ValueError, ["mu_0", "nan"]),
    (("conjugate_known_mean", 0, 0.0, 1.0, 1.0), ValueError, ["n_mc_samples", "0"]),
    (("conjugate_known_mean", 1, 0.0, -1.0, 1.0), ValueError, ["alpha_0", "-1.0"]),
    (("conjugate_known_mean", 1, 0.0, 1.0, 0.0), ValueError, ["beta_0", "0.0"]),
]


@pytest.mark.parametrize("args,exc,words", BAD_PRIORS)
def test_set_prior_rejects_bad_priors_and_changes_nothing(vm, args, exc, words):
    before = fingerprint(vm)
    with pytest.raises(exc) as info:
        vm.set_prior(*args)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    assert_same(vm, before)
    # make_prior (the constructor path) says the same
    with pytest.raises(exc):
        make_prior(*args)


@pytest.mark.parametrize("parameters,exc,words", [
    ("nothing.*", ValueError, ["parameters", "'nothing.*'"]),
    (nn.Conv2d, ValueError, ["parameters", "Conv2d"]),
    (3, TypeError, ["parameters", "3"]),
    ([nn.Linear, 1.5], TypeError, ["parameters", "1.5"]),
])
def test_set_prior_rejects_parameter_selections_that_match_nothing(vm, parameters, exc, words):
    before = fingerprint(vm)
    with pytest.raises(exc) as info:
        vm.set_prior("gaussian", 0.1, parameters=parameters)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    assert_same(vm, before)


def test_distribution_prior_bad_input(vm):
    before = fingerprint(vm)
    with pytest.raises(TypeError, match="distribution"):
        DistributionPrior(torch.randn(3))
    with pytest.raises(ValueError, match="'NoSuchDistribution'"):
        DistributionPrior("NoSuchDistribution", args={})
    with pytest.raises(ValueError, match="n_mc_samples"):
        vm.set_prior(D.StudentT(3.0), n_mc_samples=0)
    assert_same(vm, before)


# ----------------------------------------------------------------------------- state_dict
def test_load_state_dict_from_another_architecture_changes_nothing(vm):
    before = fingerprint(vm)
    cases = [
        (pv.variationalize(nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)))
         .state_dict(), ["shape mismatch", "0.weight", "(5, 3)", "(4, 3)"]),
        (pv.variationalize(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))).state_dict(),
         ["missing keys", "unexpected keys"]),
        (make_model().state_dict(), ["missing keys", "model.0.weight", "unexpected keys"]),
    ]
    # same architecture, some keys dropped
    partial = dict(vm.state_dict())
    del partial["posteriors.2.weight.log_std" if "posteriors.2.weight.log_std" in partial
                else next(k for k in partial if k.startswith("posteriors.2.weight"))]
    cases.append((partial, ["missing keys", "posteriors.2.weight"]))
    # entries that are not tensors (a Python number for BatchNorm's counter, a numpy array):
    # torch would copy the earlier entries before failing on them
    numbers = dict(vm.state_dict())
    numbers["model.1.num_batches_tracked"] = 5
    numbers["model.2.bias"] = numbers["model.2.bias"].numpy()
    cases.append((numbers, ["must be tensors", "model.1.num_batches_tracked (int)",
                            "model.2.bias (ndarray)"]))
    for state, words in cases:
        with pytest.raises((RuntimeError, ValueError)) as info:
            vm.load_state_dict(state)
        for w in words:
            assert w in str(info.value), (w, str(info.value))
        assert_same(vm, before)


def test_load_state_dict_with_bad_prior_settings_changes_nothing(vm):
    good = pv.variationalize(make_model())
    with torch.no_grad():
        for p in good.parameters():
            p.add_(1.0)
    state = good.state_dict()
    extra = copy.deepcopy(state["_extra_state"])
    extra["priors"]["0.weight"] = ("mixtgauss", {"n_mc_samples": 1, "sigma_1": -1.0,
                                                 "sigma_2": 0.01, "pi": 0.5})
    state["_extra_state"] = extra
    before = fingerprint(vm)
    with pytest.raises(ValueError, match="sigma_1"):
        vm.load_state_dict(state)
    assert_same(vm, before)
    extra = copy.deepcopy(good.state_dict()["_extra_state"])
    del extra["priors"]["2.bias"]
    state["_extra_state"] = extra
    with pytest.raises(RuntimeError, match="2.bias"):
        vm.load_state_dict(state)
    assert_same(vm, before)


# ----------------------------------------------------------------------------- the rest
def test_other_entry_points(vm):
    before = fingerprint(vm)
    with pytest.raises(TypeError, match="var_model"):
        pv.Sample(make_model())
    with pytest.raises(KeyError, match="1.running_mean"):
        vm.prior_of("1.running_mean")
    with pytest.raises(TypeError, match="posterior"):
        vm.replace_posterior("0", nn.Linear(2, 2))
    post = dict(vm.named_posteriors())["0.weight"]
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="std"):
            post.set_stddev(bad)
    bad = torch.full_like(post.mean, 0.1)
    bad[0, 0] = -1.0
    with pytest.raises(ValueError, match="std"):
        post.set_stddev(bad)
    assert_same(vm, before)
    assert math.isfinite(float(vm.prior_loss().detach()))


def test_a_distribution_prior_must_fit_the_parameters_it_is_given_to(vm):
    # a batch shape larger than the parameter's would sum several log densities per weight
    # (a (3, 1) Student-t on a bias of 4: 12 terms, the KL silently 3x too large)
    before = fingerprint(vm)
    with pytest.raises(ValueError, match=r"prior for 0.bias: batch shape \(3, 1\).*\(4,\)"):
        vm.set_prior(D.StudentT(3.0, torch.zeros(3, 1), torch.ones(3, 1)), parameters="0.bias")
    with pytest.raises(ValueError, match="event shape"):
        vm.set_prior(D.MultivariateNormal(torch.zeros(3), torch.eye(3)), parameters="0.bias")
    with pytest.raises(ValueError, match=r"batch shape \(5,\)"):
        pv.variationalize(make_model(), prior=D.Laplace(torch.zeros(5), torch.ones(5)))
    assert_same(vm, before)
    vm.set_prior(D.StudentT(3.0, torch.zeros(4), torch.ones(4)), parameters="0.bias")  # fits
    vm.set_prior(D.Laplace(0.0, 1.0))                                                  # scalar
    # an Independent prior over the parameter's own shape is the same element-wise density
    ind = D.Independent(D.Normal(torch.zeros(4, 3), torch.ones(4, 3)), 2)
    vm.set_prior(ind, parameters="0.weight")
    assert torch.isfinite(vm.prior_loss())
