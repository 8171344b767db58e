"""NoisyKFAC and NoisyEKFAC: exact posteriors where K-FAC is exact, torch.optim conventions."""
import copy
import io
import logging
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyvarinf2
from pyvarinf2.kronecker import KroneckerPosterior, kronecker_posteriors
from pyvarinf2.optim import NoisyEKFAC, NoisyKFAC, NonFiniteError

DT = torch.float64
OPTIMIZERS = [NoisyKFAC, NoisyEKFAC]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------- exactness
def _blr_problem(seed=0, n=200, d=3, sigma=0.5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, dtype=DT, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=DT) + 0.3 + sigma * torch.randn(
        n, dtype=DT, generator=gen)
    phi = torch.cat([x, torch.ones(n, 1, dtype=DT)], 1)
    precision = phi.T @ phi / sigma ** 2 + torch.eye(d + 1, dtype=DT)  # prior N(0, I)
    cov = torch.linalg.inv(precision)
    mean = cov @ phi.T @ y / sigma ** 2
    return x, y, mean, cov


@pytest.mark.parametrize("opt_cls", OPTIMIZERS)
def test_recovers_the_exact_bayesian_linear_regression_posterior(opt_cls):
    """Single-output linear regression: S is a scalar and the Fisher X'X/σ² is exactly
    Kronecker, so the fixed point of noisy K-FAC (and EK-FAC, whose diagonal is exact in the
    eigenbasis of X'X) is the exact posterior N(μ, (X'X/σ² + I)⁻¹)."""
    torch.manual_seed(0)
    sigma, n = 0.5, 200
    x, y, mu, sig = _blr_problem(sigma=sigma, n=n)
    net = nn.Linear(3, 1).to(DT)
    vm = pyvarinf2.variationalize(net, prior=pyvarinf2.GaussianPrior(std=1.0))
    # EK-FAC: the basis is computed once (step 0) and the diagonal R re-estimated afterwards
    t_inv = 1 if opt_cls is NoisyKFAC else 10 ** 6
    opt = opt_cls(vm, lr=0.05, dataset_size=n, extrinsic_damping=0.0, kl_clip=None, momentum=0.0,
                  T_cov=1, T_inv=t_inv, cov_decay=0.995, damping_mode="eigen", fisher="true",
                  likelihood="gaussian", obs_noise=sigma)
    post = vm.posteriors.root
    assert isinstance(post, KroneckerPosterior)
    avg, count = torch.zeros(4, dtype=DT), 0
    for k in range(1500):
        opt.zero_grad()
        loss = 0.5 * ((vm(x).squeeze(1) - y) ** 2).mean() / sigma ** 2  # the mean NLL
        loss.backward()
        opt.step()
        if k >= 700:
            avg += post.matrix([net.weight, net.bias]).detach().reshape(-1)
            count += 1
    avg /= count
    sd = sig.diag().sqrt()
    # mean: Polyak average of the iterates within 0.1 posterior standard deviations
    assert ((avg - mu).abs() / sd).max() < 0.1
    # full covariance within 3% (the sampled-label Fisher is a running average of 200-example
    # estimates; the eigenbasis is exact)
    cov = post.covariance()
    assert ((cov - sig).abs().max() / sig.abs().max()) < 0.03
    # predictive variance (epistemic part) at new inputs within 3%
    xs = torch.cat([torch.randn(6, 3, dtype=DT) * 2, torch.ones(6, 1, dtype=DT)], 1)
    ratio = torch.einsum("ni,ij,nj->n", xs, cov, xs) / torch.einsum("ni,ij,nj->n", xs, sig, xs)
    assert (ratio - 1).abs().max() < 0.03
    # and the model alone reproduces it by sampling
    draws = torch.stack([post.matrix(post.sample([net.weight, net.bias])).reshape(-1)
                         for _ in range(4000)]).detach()
    emp = torch.einsum("ni,ij,nj->n", xs, torch.cov(draws.T), xs)
    assert ((emp / torch.einsum("ni,ij,nj->n", xs, sig, xs)) - 1).abs().max() < 0.1


def test_pi_damping_posterior_is_the_damped_matrix_variate_gaussian():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    vm = pyvarinf2.variationalize(net)
    n, lam = 500, 0.5
    opt = NoisyKFAC(vm, dataset_size=n, kl_weight=lam, damping_mode="pi", T_cov=1, T_inv=1)
    x, y = torch.randn(32, 3, dtype=DT), torch.randint(0, 2, (32,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(vm(x), y).backward()
        opt.step()
    for idx, path in enumerate(["0", "2"]):
        post = getattr(vm.posteriors, path)
        layer = net[int(path)]
        st = opt.state[layer.weight]
        A, S = st["A"], st["S"]
        prec = torch.cat([torch.full((post.n_out, post.n_in - 1), float(post.n_in - 1)),
                          torch.ones(post.n_out, 1)], 1)  # PyVarInf prior: fan_in, and 1
        g_in = lam / n * prec.mean().item()
        pi = math.sqrt((A.trace() / A.shape[0]) / (S.trace() / S.shape[0]))
        a_g = A + pi * math.sqrt(g_in) * torch.eye(A.shape[0], dtype=DT)
        s_g = S + math.sqrt(g_in) / pi * torch.eye(S.shape[0], dtype=DT)
        expect = lam / n * torch.kron(torch.linalg.inv(s_g), torch.linalg.inv(a_g))
        torch.testing.assert_close(post.covariance(), expect)


def test_kl_clipping_bounds_the_step_in_the_damped_fisher_norm():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).to(DT)
    vm = pyvarinf2.variationalize(net)
    clip, lr = 1e-6, 0.5
    opt = NoisyKFAC(vm, lr=lr, dataset_size=1000, momentum=0.0, kl_clip=clip, T_cov=1, T_inv=1,
                    damping_mode="eigen")
    x, y = torch.randn(64, 5, dtype=DT), torch.randint(0, 3, (64,))
    before = [p.detach().clone() for p in net.parameters()]
    opt.zero_grad()
    F.cross_entropy(vm(x), y).backward()
    opt.step()
    total = 0.0
    for i, layer in enumerate([net[0], net[2]]):
        st = opt.state[layer.weight]
        post = getattr(vm.posteriors, str(2 * i))
        u = post.matrix([before[2 * i], before[2 * i + 1]]) - post.matrix(
            [layer.weight, layer.bias]).detach()
        prec = torch.cat([torch.full((post.n_out, post.n_in - 1), float(post.n_in - 1)),
                          torch.ones(post.n_out, 1)], 1)
        gamma = prec.mean().item() / 1000 + 1e-3
        ut = st["basis_S"].T @ u @ st["basis_A"]
        total += float((ut ** 2 * (torch.outer(st["eigvals_S"], st["eigvals_A"]) + gamma)).sum())
    assert total == pytest.approx(clip, rel=1e-6)  # the clip bound binds exactly


# ---------------------------------------------------------------------------- conventions
class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 10)
        self.out = nn.Linear(10, 3)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.out(F.relu(self.fc(h.flatten(1))))


def _data(seed=0, n=16):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _train(vm, opt, steps, start=0):
    for k in range(start, start + steps):
        x, y = _data(k)
        opt.zero_grad()
        F.cross_entropy(vm(x), y).backward()
        opt.step()


KW = dict(dataset_size=200, T_cov=2, T_inv=3, lr=0.05)


@pytest.mark.parametrize("opt_cls", OPTIMIZERS)
def test_resume_is_bit_identical(opt_cls):
    torch.manual_seed(0)
    vm = pyvarinf2.variationalize(_ConvNet())
    opt = opt_cls(vm, **KW)
    _train(vm, opt, 5)
    buf = io.BytesIO()
    torch.save({"model": vm.state_dict(), "opt": opt.state_dict(),
                "rng": torch.get_rng_state()}, buf)
    _train(vm, opt, 6, start=5)
    reference = {k: v.clone() for k, v in vm.state_dict().items() if torch.is_tensor(v)}

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    fresh = pyvarinf2.variationalize(_ConvNet())      # a fresh model learns the Kronecker
    fresh.load_state_dict(ckpt["model"])              # posteriors from the checkpoint
    opt2 = opt_cls(fresh, **KW)
    opt2.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    _train(fresh, opt2, 6, start=5)
    got = fresh.state_dict()
    assert set(reference) <= set(got)
    for k, v in reference.items():
        assert torch.equal(v, got[k]), k


@pytest.mark.parametrize("opt_cls", OPTIMIZERS)
@pytest.mark.parametrize("capture_step", [True, False])
def test_non_finite_step_raises_and_changes_nothing(opt_cls, capture_step):
    torch.manual_seed(0)
    vm = pyvarinf2.variationalize(_ConvNet())
    opt = opt_cls(vm, **KW)
    _train(vm, opt, 4 if capture_step else 3)  # step 4 is a statistics step (T_cov=2)
    x, y = _data(99)
    x[0, 0, 0, 0] = float("nan")
    opt.zero_grad()
    F.cross_entropy(vm(x), y).backward()
    model_before = copy.deepcopy(vm.state_dict())  # (the forward itself updated BatchNorm)
    opt_before = copy.deepcopy(opt.state_dict())
    with pytest.raises(NonFiniteError, match="non-finite"):
        opt.step()
    for k, v in model_before.items():
        if torch.is_tensor(v):
            torch.testing.assert_close(vm.state_dict()[k], v, rtol=0, atol=0, equal_nan=True)
    after = opt.state_dict()
    assert after["noisy_kfac"] == opt_before["noisy_kfac"]
    for i, st in opt_before["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                assert torch.equal(val, after["state"][i][key]), (i, key)
            else:
                assert val == after["state"][i][key]
    # and training goes on afterwards (from finite BatchNorm statistics)
    vm.model.bn.reset_running_stats()
    _train(vm, opt, 2, start=10)
    assert all(torch.isfinite(p).all() for p in vm.parameters())


BAD = [("lr", 0.0), ("lr", -1.0), ("dataset_size", None), ("dataset_size", 0),
       ("dataset_size", 2.5), ("kl_weight", 0.0), ("extrinsic_damping", -1e-3), ("cov_decay", 1.0),
       ("T_cov", 0), ("T_inv", 1.5), ("momentum", 1.0), ("kl_clip", 0.0),
       ("damping_mode", "tikhonov"), ("fisher", "exact"), ("likelihood", "poisson"),
       ("obs_noise", 0.0), ("betas", (0.9,)), ("betas", (0.9, 1.0)), ("mc_samples", 0),
       ("lr", float("nan")), ("matmul_dtype", "int8"), ("matmul_dtype", torch.int32),
       ("matmul_dtype", "no such dtype"), ("matmul_dtype", 16)]


@pytest.mark.parametrize("opt_cls", OPTIMIZERS)
@pytest.mark.parametrize("name,value", BAD)
def test_bad_hyper_parameters_raise_before_touching_the_model(opt_cls, name, value):
    vm = pyvarinf2.variationalize(_ConvNet())
    kw = dict(dataset_size=100)
    kw[name] = value
    with pytest.raises(ValueError, match=name.split("[")[0]):
        opt_cls(vm, **kw)
    assert kronecker_posteriors(vm) == {}  # still all mean-field
    assert vm.record_noise is False


def test_not_a_variational_model():
    with pytest.raises(TypeError, match="VariationalModel"):
        NoisyKFAC(nn.Linear(2, 2), dataset_size=10)


def test_lr_scheduler_drives_the_step_size():
    def one_step(lr_factor):
        torch.manual_seed(0)
        vm = pyvarinf2.variationalize(_ConvNet())
        opt = NoisyKFAC(vm, momentum=0.0, kl_clip=None, **KW)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: lr_factor)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * lr_factor)
        before = vm.model.fc.weight.detach().clone()
        _train(vm, opt, 1)
        sched.step()
        return vm.model.fc.weight.detach() - before

    full, half = one_step(1.0), one_step(0.5)
    torch.testing.assert_close(half, 0.5 * full)


def test_closure_path_matches_the_plain_loop():
    results = []
    for use_closure in (False, True):
        torch.manual_seed(0)
        vm = pyvarinf2.variationalize(_ConvNet())
        opt = NoisyKFAC(vm, **KW)
        for k in range(4):
            x, y = _data(k)
            if use_closure:
                def closure():
                    opt.zero_grad()
                    loss = F.cross_entropy(vm(x), y)
                    loss.backward()
                    return loss
                opt.step(closure)
            else:
                opt.zero_grad()
                F.cross_entropy(vm(x), y).backward()
                opt.step()
        results.append(vm.state_dict())
    for k, v in results[0].items():
        if torch.is_tensor(v):
            assert torch.equal(v, results[1][k]), k


def test_mc_samples_average_the_gradients():
    torch.manual_seed(0)
    vm = pyvarinf2.variationalize(_ConvNet())
    opt = NoisyKFAC(vm, mc_samples=3, **KW)
    calls = []
    x, y = _data(0)

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = F.cross_entropy(vm(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 3 and torch.isfinite(loss)


def test_diagonal_treatment_for_other_parameters_is_logged_without_warnings(caplog):
    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.norm = nn.LayerNorm(4)
            self.fc = nn.Linear(4, 3)

        def forward(self, idx):
            return self.fc(self.norm(self.emb(idx)))

    torch.manual_seed(0)
    vm = pyvarinf2.variationalize(WithEmbedding())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.INFO, logger="pyvarinf2.optim.noisy_kfac"):
            opt = NoisyEKFAC(vm, dataset_size=100, T_cov=1, T_inv=2)
        msg = " ".join(r.getMessage() for r in caplog.records)
        assert "Kronecker" in msg and "diagonal noisy-Adam" in msg
        assert "emb.weight" in msg and "norm.weight" in msg
        assert opt.diagonal_parameters == ["emb.weight", "norm.weight", "norm.bias"]
        assert [layer.path for layer in opt.kfac_layers] == ["fc"]
        std0 = vm.posteriors.emb.weight.stddev.detach().clone()
        for k in range(5):
            idx = torch.randint(0, 10, (8,))
            opt.zero_grad()
            F.cross_entropy(vm(idx), idx % 3).backward()
            opt.step()
    std = vm.posteriors.emb.weight.stddev.detach()
    assert torch.isfinite(std).all() and not torch.equal(std, std0)
    # rows never looked up keep the prior-dominated scale sqrt(λ/(N γ_in)) = prior std
    # (PyVarInf's prior for a 10x4 table: 1/sqrt(fan_in=4) = 0.5) up to the Fisher of seen rows
    assert std.max() <= 0.5 + 1e-6


@pytest.mark.parametrize("opt_cls", OPTIMIZERS)
@pytest.mark.parametrize("fisher,matmul_dtype", [("true", None), ("empirical", None),
                                                 ("true", "bfloat16")])
def test_trains_a_small_classifier(opt_cls, fisher, matmul_dtype):
    gen = torch.Generator().manual_seed(0)
    n = 512
    x = torch.randn(n, 2, generator=gen)
    y = ((x[:, 0] * x[:, 1]) > 0).long()  # XOR-like: needs the hidden layer
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 2))
    vm = pyvarinf2.variationalize(net)
    opt = opt_cls(vm, dataset_size=n, fisher=fisher, T_cov=5, T_inv=20,
                  matmul_dtype=matmul_dtype)
    for epoch in range(25):
        perm = torch.randperm(n)
        for i in range(0, n, 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(vm(x[idx]), y[idx]).backward()
            opt.step()
    vm.eval()
    with torch.no_grad():
        acc = (vm(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9


def test_empirical_and_true_fisher_differ_and_true_needs_a_tensor_output():
    torch.manual_seed(0)
    factors = {}
    for fisher in ("true", "empirical"):
        torch.manual_seed(0)
        vm = pyvarinf2.variationalize(_ConvNet())
        opt = NoisyKFAC(vm, fisher=fisher, **KW)
        _train(vm, opt, 1)
        factors[fisher] = opt.state[vm.model.out.weight]["S"]
    assert not torch.allclose(factors["true"], factors["empirical"])

    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x), x

    vm = pyvarinf2.variationalize(TupleOut())
    NoisyKFAC(vm, dataset_size=10)
    with pytest.raises(TypeError, match="fisher='empirical'"):
        vm(torch.randn(4, 3))


def test_layer_selection_and_unsupported_layers_get_the_diagonal_treatment():
    class Doubling(nn.Linear):
        def forward(self, x):  # not the stock forward: the K-FAC hooks cannot assume F.linear
            return 2 * super().forward(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = Doubling(6, 6)
            self.c = nn.Linear(6, 3)

        def forward(self, x):
            return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))

    torch.manual_seed(0)
    vm = pyvarinf2.variationalize(Net())
    opt = NoisyKFAC(vm, dataset_size=100, layers=["c"])
    assert [la.path for la in opt.kfac_layers] == ["c"]
    assert opt.diagonal_parameters == ["a.weight", "a.bias", "b.weight", "b.bias"]
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(vm(x), y).backward()
        opt.step()
    assert set(kronecker_posteriors(vm)) == {"c"}
    vm2 = pyvarinf2.variationalize(Net())
    assert [la.path for la in NoisyKFAC(vm2, dataset_size=100).kfac_layers] == ["a", "c"]


def test_weight_used_outside_its_module_forward_is_reported():
    class Outside(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(torch.tanh(F.linear(x, self.fc.weight, self.fc.bias)))

    torch.manual_seed(0)
    vm = pyvarinf2.variationalize(Outside())
    opt = NoisyKFAC(vm, dataset_size=100)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    opt.zero_grad()
    F.cross_entropy(vm(x), y).backward()
    before = vm.model.fc.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"\['fc'\].*layers="):
        opt.step()
    assert torch.equal(before, vm.model.fc.weight)
    vm = pyvarinf2.variationalize(Outside())
    opt = NoisyKFAC(vm, dataset_size=100, layers=["head"])  # fc: diagonal treatment
    opt.zero_grad()
    F.cross_entropy(vm(x), y).backward()
    opt.step()
    assert opt.diagonal_parameters == ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("opt_cls", OPTIMIZERS)
def test_defaults_train_the_readme_cnn_on_mnist(opt_cls, data_dir):
    """The issue's bar: the PyVarInf README CNN (no BatchNorm), the optimizer's defaults with
    lr=1e-2, 3 epochs over 10k MNIST images (batch 100): >= 90% test accuracy."""
    from pyvarinf2.data import load_image_dataset

    class ReadmeCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
            self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
            self.fc1 = nn.Linear(320, 50)
            self.fc2 = nn.Linear(50, 10)

        def forward(self, x):
            x = F.relu(F.max_pool2d(self.conv1(x), 2))
            x = F.relu(F.max_pool2d(self.conv2(x), 2))
            x = F.relu(self.fc1(x.view(-1, 320)))
            return F.log_softmax(self.fc2(x), dim=1)

    ds = load_image_dataset("mnist", data_dir=data_dir)
    x, y = ds.x_train[:10000], ds.y_train[:10000]
    torch.manual_seed(0)
    vm = pyvarinf2.variationalize(ReadmeCNN())
    opt = opt_cls(vm, lr=1e-2, dataset_size=10000)
    for _ in range(3):
        perm = torch.randperm(10000)
        for i in range(0, 10000, 100):
            idx = perm[i:i + 100]
            opt.zero_grad()
            F.cross_entropy(vm(x[idx]), y[idx]).backward()
            opt.step()
    vm.eval()
    with torch.no_grad():
        acc = (vm(ds.x_test).argmax(1) == ds.y_test).float().mean().item()
    assert acc >= 0.90


def test_prediction_helpers_between_steps_leave_the_capture_alone():
    torch.manual_seed(0)
    vm = pyvarinf2.variationalize(_ConvNet())
    opt = NoisyKFAC(vm, **KW)
    _train(vm, opt, 2)  # step 2 is a statistics step: the capture is armed now
    x, _ = _data(50)
    probs = pyvarinf2.predict.predictive_probs(vm, x, n_samples=4, vectorize=True)  # vmap
    assert probs.shape == (16, 3) and torch.allclose(probs.sum(1), torch.ones(16))
    _train(vm, opt, 2, start=2)
    assert opt.state[vm.model.fc.weight]["n_stats"] == 2


# ---------------------------------------------------------------------------- bfloat16 products
@pytest.mark.parametrize("opt_cls", OPTIMIZERS)
def test_bfloat16_products_track_the_float32_step_and_noise(opt_cls):
    """``matmul_dtype=torch.bfloat16``: from the same state and weight sample, the
    preconditioned mean step and the Kronecker noise agree with the float32 ones to bfloat16
    rounding (relative Frobenius error below 1.5% and 2%; measured ~0.4%), and they are not
    bit-equal (the option does take effect)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(64, 20), torch.randint(0, 3, (64,))
    vms, opts = [], []
    for dt in (None, torch.bfloat16):
        vm = pyvarinf2.variationalize(copy.deepcopy(net))
        opts.append(opt_cls(vm, dataset_size=1000, T_cov=1, T_inv=5, kl_clip=None,
                            matmul_dtype=dt))
        vms.append(vm)
    # the same weight sample in both runs, so that only the optimizer's products differ
    post16 = kronecker_posteriors(vms[1])["0"]
    assert post16.matmul_dtype is torch.bfloat16
    for post in kronecker_posteriors(vms[1]).values():
        post.matmul_dtype = None
    for _ in range(12):                 # the float32 run sets the state; the bf16 run copies it
        vms[1].load_state_dict(vms[0].state_dict())
        opts[1].load_state_dict(opts[0].state_dict())
        w0 = vms[0].model[0].weight.detach().clone()
        moved = []
        for vm, opt in zip(vms, opts):
            torch.manual_seed(7)
            opt.zero_grad()
            F.cross_entropy(vm(x), y).backward()
            opt.step()
            moved.append(vm.model[0].weight.detach() - w0)
    err = (moved[1] - moved[0]).norm() / moved[0].norm()
    assert 0 < err < 0.015, err
    post32 = kronecker_posteriors(vms[0])["0"]
    assert post32.matmul_dtype is None
    post16.matmul_dtype = torch.bfloat16
    post16.load_state_dict(post32.state_dict())
    e = torch.randn(post32.n_out, post32.n_in)
    z32, z16 = post32.perturbation(e), post16.perturbation(e)
    assert z16.dtype == torch.float32
    err = (z16 - z32).norm() / z32.norm()
    assert 0 < err < 0.02, err


def test_bfloat16_samples_have_the_intended_covariance():
    """The marginal variances of bfloat16-product samples match the analytic ones."""
    torch.manual_seed(0)
    post = KroneckerPosterior("w", (3, 4), bias_name="b", init_std=1.0)
    q_s = torch.linalg.qr(torch.randn(3, 3))[0]
    q_a = torch.linalg.qr(torch.randn(5, 5))[0]
    std = torch.rand(3, 5) + 0.5
    post.basis_out.copy_(q_s)
    post.basis_in.copy_(q_a)
    post.std.copy_(std)
    post.matmul_dtype = torch.bfloat16
    means = [torch.zeros(3, 4), torch.zeros(3)]
    draws = torch.stack([post.matrix(post.sample(means)) for _ in range(20000)])
    torch.testing.assert_close(draws.var(0), post.marginal_variance(), rtol=0.05, atol=0)


def test_eigendecompositions_follow_the_schedule_and_skip_unchanged_factors(monkeypatch):
    """T_cov=3, T_inv=7: factors at every 3rd step; before step T_inv each new statistic gets a
    basis (0, 3, 6), then one at each multiple of 7 whose factors changed since the last basis
    (14, 21, 28). Step 7 saw no new statistics since step 6: redoing the decomposition there
    would only reset EK-FAC's re-estimated scale R, which must survive it."""
    import pyvarinf2.optim.noisy_kfac as nk
    torch.manual_seed(0)
    vm = pyvarinf2.variationalize(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    opt = nk.NoisyEKFAC(vm, dataset_size=100, T_cov=3, T_inv=7)
    steps = []
    real = nk._symmetric_eigh

    def spy(m):
        steps.append(opt._kstep)
        return real(m)

    monkeypatch.setattr(nk, "_symmetric_eigh", spy)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    w = vm.model[0].weight
    for k in range(30):
        if k == 7:
            r_before = opt.state[w]["R"].clone()
        opt.zero_grad()
        F.cross_entropy(vm(x), y).backward()
        opt.step()
        if k == 7:
            assert torch.equal(opt.state[w]["R"], r_before)
    assert sorted(set(steps)) == [0, 3, 6, 14, 21, 28]
    assert len(steps) == 6 * 2 * 2          # two factors of two layers each time


@pytest.mark.parametrize("opt_cls", OPTIMIZERS)
def test_a_new_kl_weight_reaches_the_posterior_at_the_next_step(opt_cls):
    """The posterior covariance is (λ/N) (S ⊗ A + γ_in)⁻¹ in the factors' eigenbasis (EK-FAC:
    (λ/N)/(R + γ_in)); changing kl_weight (KL annealing) between steps that compute neither
    statistics nor a basis must still rewrite it at the next step, not T_inv steps later."""
    torch.manual_seed(0)
    vm = pyvarinf2.variationalize(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    vm.set_prior("gaussian", std=1.0)
    opt = opt_cls(vm, dataset_size=100, T_cov=5, T_inv=50, damping_mode="eigen")
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))

    def step():
        opt.zero_grad()
        F.cross_entropy(vm(x), y).backward()
        opt.step()

    for _ in range(7):                       # statistics and a basis at step 5, none at 7
        step()
    opt.param_groups[0]["kl_weight"] = 0.3
    step()
    w = vm.model[0].weight
    st = opt.state[w]
    scale = 0.3 / 100
    if opt_cls is NoisyEKFAC:
        curv = st["R"]
    else:
        curv = torch.outer(st["eigvals_S"], st["eigvals_A"])
    want = torch.sqrt(scale / (curv + scale * 1.0))
    post = dict(vm.named_posteriors())["0"]
    torch.testing.assert_close(post.std, want)


@pytest.mark.parametrize("opt_cls", OPTIMIZERS)
def test_no_op_steps_unused_layers_frozen_weights_and_copies(opt_cls, branch_model):
    torch.manual_seed(0)
    vm = pyvarinf2.variationalize(branch_model(d_in=4, hidden=6))
    opt = opt_cls(vm, dataset_size=100, T_cov=2, T_inv=4)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    # a step without any gradient (no backward) is a no-op: the T_cov/T_inv schedule stays
    opt.step()
    assert opt._kstep == 0
    # zero_grad(set_to_none=False) keeps zero gradients for the unused branch: no K-FAC
    # record is expected for it, on capture steps included
    for k in range(6):
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(vm(x, use_b=(k == 3)), y).backward()
        opt.step()
    assert opt._kstep == 6
    assert all(torch.isfinite(p).all() for p in vm.parameters())
    with pytest.raises(TypeError, match="cannot be copied or pickled"):
        copy.deepcopy(opt)
    # a weight frozen after variationalize with its bias still trained: the Kronecker
    # posterior covers both, so the step is refused (it used to skip the bias silently)
    vm.model.head.weight.requires_grad_(False)
    before = copy.deepcopy(vm.state_dict())
    opt.zero_grad()
    F.cross_entropy(vm(x), y).backward()
    with pytest.raises(RuntimeError, match="'head' has a gradient for its bias but none"):
        opt.step()
    for k, v in vm.state_dict().items():
        assert torch.equal(v, before[k]) if torch.is_tensor(v) else v == before[k], k
