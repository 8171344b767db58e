"""Write (and optionally execute) the pyvarinf2 notebooks.

    python notebooks/make_notebooks.py                    # write the .ipynb files, no outputs
    python notebooks/make_notebooks.py --execute          # write and execute at full size
    python notebooks/make_notebooks.py --execute --small  # at the reduced size CI uses
    python notebooks/make_notebooks.py --execute 02       # only the notebooks matching "02"
    python notebooks/make_notebooks.py --keep-outputs     # Markdown edits: keep stored outputs

The notebooks are kept here as Python strings so that they are easy to review, diff and
regenerate; the committed ``.ipynb`` files are executed at full size and stored with their
outputs. Every notebook reads ``PYVARINF2_NB_SMALL`` (``1``: a few hundred examples and steps,
what ``tests/test_notebooks.py`` runs) and finds data through ``PYVARINF2_DATA`` (default
``../../shared/data`` relative to this folder).
"""
import argparse
import os
import pathlib
import sys
import textwrap
import time

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).resolve().parent

KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def md(text):
    return ("md", textwrap.dedent(text).strip("\n"), [])


def code(text, tags=()):
    return ("code", textwrap.dedent(text).strip("\n"), list(tags))


# ============================================================================ shared snippets
SETUP = """\
import math, os, time

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyvarinf2
from pyvarinf2 import metrics

# PYVARINF2_NB_SMALL=1: the reduced size that CI runs (same code, fewer examples and steps)
SMALL = os.environ.get("PYVARINF2_NB_SMALL", "0") not in ("", "0")
torch.manual_seed(0)
plt.rcParams.update({"figure.dpi": 72, "font.size": 9, "axes.titlesize": 10})
print(f"pyvarinf2 {pyvarinf2.__version__}, torch {torch.__version__}, small run: {SMALL}")
"""

# ============================================================================ 01 quickstart
QUICKSTART = [
    md("""
    # Quickstart: a Bayesian neural network in five steps

    Take an ordinary PyTorch model, give it a Gaussian posterior over its weights with
    `pyvarinf2.variationalize`, train it with the loss `NLL + prior_loss() / N`, and predict
    with uncertainty. The data are two interleaved half-moons, small enough to draw the
    uncertainty over the whole input plane. The last section checks the `prior_loss() / N`
    convention on a model whose answer is known exactly.

    Run with `PYVARINF2_NB_SMALL=1` for the reduced size that CI uses.
    """),
    code(SETUP + """\
torch.set_num_threads(1)  # the models here are tiny: one thread is the fastest
"""),
    md("""
    ## 1. An existing model and its data

    Nothing in the model refers to pyvarinf2: it is the kind of class you already have. As a
    baseline, it is first trained the usual way.
    """),
    code("""
    def two_moons(n, noise=0.1, seed=0):
        g = torch.Generator().manual_seed(seed)
        t = torch.rand(n, generator=g) * math.pi
        label = torch.randint(0, 2, (n,), generator=g)
        upper = torch.stack([torch.cos(t), torch.sin(t)], 1)
        lower = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], 1)
        x = torch.where(label[:, None] == 0, upper, lower)
        return x + noise * torch.randn(n, 2, generator=g), label


    class Net(nn.Module):
        def __init__(self, width=64):
            super().__init__()
            self.hidden = nn.Sequential(nn.Linear(2, width), nn.ReLU(),
                                        nn.Linear(width, width), nn.ReLU())
            self.out = nn.Linear(width, 2)

        def forward(self, x):
            return self.out(self.hidden(x))


    def minibatches(steps, n, batch, seed=0):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            yield torch.randint(0, n, (batch,), generator=g)


    N = 500 if SMALL else 2000           # training examples
    STEPS = 1500 if SMALL else 4000      # optimisation steps
    BATCH = 100
    x_train, y_train = two_moons(N, seed=0)
    x_test, y_test = two_moons(1000, seed=1)

    torch.manual_seed(0)
    plain = Net()
    opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    for idx in minibatches(STEPS // 2, N, BATCH):
        opt.zero_grad()
        F.cross_entropy(plain(x_train[idx]), y_train[idx]).backward()
        opt.step()
    with torch.no_grad():
        plain_probs = plain(x_test).softmax(-1)
    print(f"deterministic network: test accuracy {metrics.accuracy(plain_probs, y_test):.3f}")
    """),
    md("""
    ## 2. Wrap it

    `variationalize` walks the model's parameters (not its layer classes, so any `nn.Module`
    works) and gives each one an independent Gaussian posterior and a prior. The model is not
    copied: its parameters *are* the posterior means. In training mode every forward pass
    draws fresh weights from the posterior; in evaluation mode it uses the means.

    The default prior is PyVarInf's: a zero-mean Gaussian with standard deviation
    `1/sqrt(fan_in)` for weight matrices and 1 for biases.
    """),
    code("""
    torch.manual_seed(0)
    model = Net()
    var_model = pyvarinf2.variationalize(model, init_std=1e-3)

    for name, posterior in var_model.named_posteriors():
        prior_std = var_model.prior_of(name).resolve_std(posterior.mean)
        print(f"{name:16s} shape {str(tuple(posterior.mean.shape)):9s} "
              f"posterior std {posterior.stddev.mean().item():.0e}   prior std {prior_std:.3f}")

    x0 = x_test[:4]
    var_model.train()
    print("two training-mode forwards differ:", not torch.equal(var_model(x0), var_model(x0)))
    var_model.eval()
    print("evaluation mode is the mean network:", torch.equal(var_model(x0), model(x0)))
    """),
    md("""
    ## 3. Train: mean NLL + `prior_loss() / N`

    `prior_loss()` is the KL divergence from the posterior to the prior, **summed over every
    weight**, in nats. The negative ELBO is the *summed* NLL over the N training examples plus
    that KL once; divided by N it is the per-example loss

    $$\\text{loss} = \\underbrace{\\tfrac{1}{B}\\textstyle\\sum_{i \\in \\text{batch}} -\\log p(y_i \\mid x_i, \\theta)}_{\\texttt{F.cross\\_entropy}} + \\frac{\\mathrm{KL}(q \\,\\|\\, p)}{N}, \\qquad \\theta \\sim q,$$

    with N the number of training examples (not the batch size, not the number of batches).
    Any `torch.optim` optimizer over `var_model.parameters()` (means and scales) then does
    Bayes-by-backprop. The docs page *KL scaling* explains what goes wrong with other divisors.
    """),
    code("""
    optimizer = torch.optim.Adam(var_model.parameters(), lr=1e-2)
    var_model.train()
    history, start = [], time.time()
    for step, idx in enumerate(minibatches(STEPS, N, BATCH, seed=1)):
        optimizer.zero_grad()
        nll = F.cross_entropy(var_model(x_train[idx]), y_train[idx])
        kl = var_model.prior_loss()
        loss = nll + kl / N
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            history.append((step, nll.item(), kl.item() / N))

    n_weights = sum(p.numel() for p in model.parameters())
    print(f"{STEPS} steps in {time.time() - start:.1f} s; KL = {kl.item():.0f} nats summed over "
          f"{n_weights} weights, so KL/N = {kl.item() / N:.3f} nats per example")

    steps, nlls, kls = zip(*history)
    fig, ax = plt.subplots(figsize=(5.5, 2.8))
    ax.plot(steps, nlls, label="mean NLL of the minibatch")
    ax.plot(steps, kls, label="prior_loss() / N")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per example")
    ax.legend()
    plt.show()
    """),
    md("""
    ## 4. Predict with uncertainty

    `pyvarinf2.predict.classification_predictive` averages the class probabilities over `S`
    posterior samples (vectorised with `torch.func.vmap`) and splits the uncertainty:

    * the **predictive entropy** $H[\\bar p]$ of the averaged probabilities is the total
      uncertainty;
    * the **mutual information** between the label and the weights, $H[\\bar p] - \\frac1S
      \\sum_s H[p_s]$, is the part due to not knowing the weights (epistemic): it is large
      where the posterior samples disagree, i.e. away from the data.

    The deterministic network has only the first kind, and is certain almost everywhere.
    """),
    code("""
    from pyvarinf2.predict import classification_predictive

    xs, ys = torch.meshgrid(torch.linspace(-3, 4, 141), torch.linspace(-2.5, 3, 111),
                            indexing="xy")
    grid = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)
    with torch.no_grad():
        plain_grid = plain(grid).softmax(-1)
        pred = classification_predictive(var_model, grid, n_samples=50)

    panels = [(metrics.predictive_entropy(plain_grid), "deterministic: entropy"),
              (pred.predictive_entropy.numpy(), "variational: predictive entropy"),
              (pred.mutual_information.numpy(), "variational: mutual information")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, (values, title) in zip(axes, panels):
        im = ax.contourf(xs, ys, values.reshape(xs.shape), levels=20, cmap="viridis")
        ax.scatter(x_train[:, 0], x_train[:, 1], c=y_train, s=3, cmap="coolwarm",
                   edgecolors="none")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, label="nats")
    fig.tight_layout()
    plt.show()
    """, tags=["gallery"]),
    code("""
    with torch.no_grad():
        test = classification_predictive(var_model, x_test, n_samples=50)
    rows = [("deterministic", metrics.classification_metrics(plain_probs, y_test)),
            ("variational (50 samples)", metrics.classification_metrics(test.probs, y_test))]
    print(f"{'':26s}{'accuracy':>10s}{'NLL':>8s}{'ECE':>8s}")
    for name, m in rows:
        print(f"{name:26s}{m['accuracy']:10.3f}{m['nll']:8.3f}{m['ece']:8.3f}")
    """),
    md("""
    ## 5. Save, reload, export

    The posterior (means, scales and the priors' settings) is in the model's `state_dict`, so
    saving and prediction never need the optimizer. `mean_model()` exports the posterior-mean
    network as an instance of the user's own class.
    """),
    code("""
    import io

    buffer = io.BytesIO()
    torch.save(var_model.state_dict(), buffer)
    buffer.seek(0)
    restored = pyvarinf2.variationalize(Net())
    restored.load_state_dict(torch.load(buffer))

    restored.eval(); var_model.eval()
    same_scales = all(torch.equal(a.stddev, b.stddev) for (_, a), (_, b)
                      in zip(restored.named_posteriors(), var_model.named_posteriors()))
    print("same means:", torch.equal(restored(x_test), var_model(x_test)), " same scales:", same_scales)
    exported = var_model.mean_model()
    print("exported:", type(exported).__name__, "- an ordinary module holding the posterior means")
    """),
    md("""
    ## Why `/ N`: a check against an exact answer

    For linear regression with Gaussian noise (standard deviation $s$) and a Gaussian prior
    $\\mathcal N(0, \\sigma_p^2)$, the best *mean-field* Gaussian for the objective
    "mean NLL $+\\; c \\cdot \\mathrm{KL}/N$" is known in closed form: its variances are
    $1/P_{jj}$ with $P = X^\\top X / (c\\, s^2) + I/\\sigma_p^2$. The correct loss has $c = 1$.
    Two common mistakes change $c$:

    * forgetting the division by $N$: $c = N$ (the posterior of a single example);
    * averaging the KL over the entries of a tensor instead of summing (bayesian-torch's
      convention): $c = 1/d$ for a weight tensor of $d$ entries, far too confident.

    Below, Bayes-by-backprop is trained under the three losses and the learned posterior
    standard deviations are compared with the closed form.
    """),
    code("""
    from pyvarinf2.priors import GaussianPrior

    n, d, s = 1000, 10, 1.0
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g)
    y = X @ (0.5 * torch.randn(d, generator=g)) + s * torch.randn(n, generator=g)

    def closed_form_std(c):
        P = X.T @ X / (c * s * s) + torch.eye(d)       # prior std 1
        return torch.diagonal(P).rsqrt()

    def learned_std(kl_term, steps):
        torch.manual_seed(1)
        vm = pyvarinf2.variationalize(nn.Linear(d, 1, bias=False), prior=GaussianPrior(std=1.0))
        opt = torch.optim.Adam(vm.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        for _ in range(steps):
            opt.zero_grad()
            nll = 0.5 * ((y - vm(X).squeeze(-1)) / s) ** 2       # up to a constant
            (nll.mean() + kl_term(vm.prior_loss())).backward()
            opt.step()
            sched.step()
        return vm.posteriors.weight.stddev.detach().squeeze(0)

    STEPS_LR = 500 if SMALL else 1500
    cases = [("prior_loss() / N        (correct)", lambda kl: kl / n, 1.0),
             ("prior_loss()            (forgot / N)", lambda kl: kl, float(n)),
             ("prior_loss() / d / N    (KL averaged per tensor)", lambda kl: kl / d / n, 1.0 / d)]
    print(f"{'loss term':50s}{'learned std':>12s}{'closed form':>12s}")
    for label, kl_term, c in cases:
        learned, exact = learned_std(kl_term, STEPS_LR), closed_form_std(c)
        print(f"{label:50s}{learned.mean().item():12.4f}{exact.mean().item():12.4f}")
        assert torch.allclose(learned, exact, rtol=0.25), (label, learned, exact)
    """),
    md("""
    Bayes-by-backprop lands on the closed-form answer in each case: the library computes what
    the loss asks for, so the loss must ask for the right thing. With the correct
    `prior_loss() / N` the posterior standard deviation is about $1/\\sqrt{N}$; without the
    division it is nearly the prior's; with the per-tensor average it is $\\sqrt{d}$ times too
    small.

    Next: `02_regression_1d.ipynb` compares the predictive bands of Bayes-by-backprop and the
    natural-gradient optimizers; `03_mnist_natural_gradient.ipynb` measures accuracy,
    calibration and out-of-distribution detection on MNIST.
    """),
]

# ============================================================================ 02 regression
REGRESSION = [
    md("""
    # 1-D regression: predictive bands for every method

    The same small network (1-50-50-1, ReLU) fitted to $y = x^3 + \\varepsilon$,
    $\\varepsilon \\sim \\mathcal N(0, 3^2)$, observed only on $[-4, -1.5]$ and $[1.5, 4]$, by
    a point estimate (MAP), Bayes-by-backprop (BBB) and the natural-gradient optimizers of
    `pyvarinf2.optim`. Each panel shows the predictive mean and a band of $\\pm 2$ predictive
    standard deviations (weight uncertainty plus the known observation noise); the true
    function is dashed.

    Run with `PYVARINF2_NB_SMALL=1` for the reduced size that CI uses.
    """),
    code(SETUP + """\
torch.set_num_threads(1)  # a 1-50-50-1 network: one thread is the fastest

from pyvarinf2.optim import IVON, NoisyAdam, NoisyEKFAC, NoisyKFAC, VOGN
from pyvarinf2.predict import regression_predictive
"""),
    md("""
    ## Data

    Inputs and targets are standardised for training; the observation noise is known (its
    standard deviation in standardised units is `noise_std`), so the negative log-likelihood
    is the Gaussian one with that variance. The test set covers $[-6, 6]$: the data region,
    the gap between the two clusters, and the extrapolation beyond them.
    """),
    code("""
    NOISE = 3.0
    N = 80
    STEPS = 600 if SMALL else 4000
    BATCH = 20


    def truth(x):
        return x ** 3


    def sample(n, seed):
        g = torch.Generator().manual_seed(seed)
        half = n // 2
        x = torch.cat([torch.rand(half, generator=g) * 2.5 - 4.0,
                       torch.rand(n - half, generator=g) * 2.5 + 1.5])
        return x, truth(x) + NOISE * torch.randn(n, generator=g)


    x_raw, y_raw = sample(N, seed=0)
    X_SCALE, Y_MEAN, Y_SCALE = 2.0, y_raw.mean(), y_raw.std()
    x_train = (x_raw / X_SCALE)[:, None]
    y_train = ((y_raw - Y_MEAN) / Y_SCALE)[:, None]
    noise_std = NOISE / Y_SCALE.item()

    x_test_raw = torch.linspace(-6, 6, 241)
    y_test_raw = truth(x_test_raw) + NOISE * torch.randn(241, generator=torch.Generator().manual_seed(1))
    x_test = (x_test_raw / X_SCALE)[:, None]


    def gaussian_nll(pred, target):
        return (0.5 * ((pred - target) / noise_std) ** 2 + math.log(noise_std)
                + 0.5 * math.log(2 * math.pi))


    def network():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(1, 50), nn.ReLU(), nn.Linear(50, 50), nn.ReLU(),
                             nn.Linear(50, 1))


    print(f"{N} training points, noise std {noise_std:.3f} in standardised units, {STEPS} steps")
    """),
    md("""
    ## One training loop for every method

    * **MAP**: Adam on the plain network, loss `mean NLL - log p(θ) / N` with the same prior as
      the variational models (the posterior mode: no weight uncertainty).
    * **BBB**: Adam on means and scales, loss `mean NLL + prior_loss() / N`.
    * **Natural-gradient optimizers**: `dataset_size=N` is given once and the loss is the plain
      mean NLL; the optimizer adds the prior and sets the posterior scales itself.

    Hyper-parameters: the defaults' learning rates where they work. IVON's curvature starts at
    `hess_init`; the paper's `1.0` is far below the curvature of this likelihood (about
    $1/\\text{noise\\_std}^2 \\approx 100$ at the output), which makes the first steps explode;
    starting at 30 keeps the steps bounded (at 10 the run still diverged after a few thousand
    steps with this learning rate), and $\\beta_2 = 0.999$ instead of the paper's $0.99999$ lets the
    estimate move within a few thousand steps (the paper's value is for runs of $10^5$ steps).
    The K-FAC optimizers are told that the likelihood is Gaussian with the known noise, for
    their sampled-label ("true") Fisher.
    """),
    code("""
    def batches(steps):
        g = torch.Generator().manual_seed(2)
        for _ in range(steps):
            idx = torch.randint(0, N, (BATCH,), generator=g)
            yield x_train[idx], y_train[idx]


    def train_map():
        model = network()
        prior = pyvarinf2.variationalize(network())    # only to borrow the same priors
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for xb, yb in batches(STEPS):
            opt.zero_grad()
            neg_log_prior = sum(-prior.prior_of(name).log_prob(p)
                                for name, p in model.named_parameters())
            (gaussian_nll(model(xb), yb).mean() + neg_log_prior / N).backward()
            opt.step()
        return model


    def train_variational(make_optimizer, add_kl):
        var_model = pyvarinf2.variationalize(network())
        opt = make_optimizer(var_model)
        var_model.train()
        for xb, yb in batches(STEPS):
            opt.zero_grad()
            loss = gaussian_nll(var_model(xb), yb).mean()
            if add_kl:
                loss = loss + var_model.prior_loss() / N
            loss.backward()
            opt.step()
        return var_model


    gaussian = dict(likelihood="gaussian", obs_noise=noise_std)
    METHODS = {
        "BBB": (lambda vm: torch.optim.Adam(vm.parameters(), lr=1e-2), True),
        "NoisyAdam": (lambda vm: NoisyAdam(vm, lr=1e-2, dataset_size=N), False),
        "VOGN": (lambda vm: VOGN(vm, lr=1e-2, dataset_size=N), False),
        "IVON": (lambda vm: IVON(vm, lr=0.1, hess_init=30.0, betas=(0.9, 0.999), dataset_size=N),
                 False),
        "NoisyKFAC": (lambda vm: NoisyKFAC(vm, lr=1e-2, dataset_size=N, **gaussian), False),
        "NoisyEKFAC": (lambda vm: NoisyEKFAC(vm, lr=1e-2, dataset_size=N, **gaussian), False),
    }

    predictions, seconds = {}, {}
    start = time.time()
    map_model = train_map()
    seconds["MAP"] = time.time() - start
    with torch.no_grad():
        mean = map_model(x_test).squeeze(-1)
    predictions["MAP"] = (mean, torch.zeros_like(mean))

    for name, (make_optimizer, add_kl) in METHODS.items():
        start = time.time()
        var_model = train_variational(make_optimizer, add_kl)
        seconds[name] = time.time() - start
        with torch.no_grad():
            pred = regression_predictive(var_model, x_test, n_samples=100)
        predictions[name] = (pred.mean.squeeze(-1), pred.epistemic_variance.squeeze(-1))
        print(f"{name:11s} trained in {seconds[name]:5.1f} s")
    """),
    md("""
    ## Predictive bands

    Predictive variance = epistemic (the spread of the 100 posterior samples' predictions) +
    aleatoric (the known noise). The last panel shows the epistemic standard deviation alone,
    on a log scale: this is what each method knows about what it does not know.
    """),
    code("""
    def to_data_units(mean, epistemic_var):
        m = mean * Y_SCALE + Y_MEAN
        total_std = (epistemic_var + noise_std ** 2).sqrt() * Y_SCALE
        return m, total_std, epistemic_var.sqrt() * Y_SCALE


    fig, axes = plt.subplots(2, 4, figsize=(14, 6.2), sharex=True)
    for ax, (name, (mean, var)) in zip(axes.flat, predictions.items()):
        m, total_std, _ = to_data_units(mean, var)
        ax.fill_between(x_test_raw, m - 2 * total_std, m + 2 * total_std, color="C0", alpha=0.3,
                        lw=0, label="±2 std")
        ax.plot(x_test_raw, truth(x_test_raw), "k--", lw=1, label="truth")
        ax.plot(x_test_raw, m, "C0", lw=1.5, label="predictive mean")
        ax.scatter(x_raw, y_raw, s=7, c="k", zorder=3)
        ax.axvspan(-1.5, 1.5, color="0.93", zorder=0)
        ax.set_ylim(-160, 160)
        ax.set_title(f"{name}  ({seconds[name]:.1f} s)")
    axes[0, 0].legend(loc="upper left", fontsize=8)
    ax = axes.flat[-1]
    for i, (name, (mean, var)) in enumerate(predictions.items()):
        if name != "MAP":
            ax.plot(x_test_raw, to_data_units(mean, var)[2], color=f"C{i}", label=name)
    ax.set_yscale("log")
    ax.axvspan(-1.5, 1.5, color="0.93", zorder=0)
    ax.set_title("epistemic std (log scale)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    plt.show()
    """, tags=["gallery"]),
    md("""
    ## Test log-likelihood by region

    Mean Gaussian log-likelihood of fresh noisy targets under each predictive distribution
    (higher is better), in the data region, in the gap, and beyond the data.
    """),
    code("""
    regions = {"data": (x_test_raw.abs() >= 1.5) & (x_test_raw.abs() <= 4),
               "gap": x_test_raw.abs() < 1.5,
               "beyond": x_test_raw.abs() > 4}
    print(f"{'method':12s}" + "".join(f"{'LL ' + r:>12s}" for r in regions) + f"{'RMSE data':>12s}")
    scores = {}
    for name, (mean, var) in predictions.items():
        m, total_std, _ = to_data_units(mean, var)
        row = [metrics.gaussian_log_likelihood(y_test_raw[mask], m[mask], total_std[mask])
               for mask in regions.values()]
        rmse = metrics.rmse(m[regions["data"]], y_test_raw[regions["data"]])
        scores[name] = row
        print(f"{name:12s}" + "".join(f"{v:12.2f}" for v in row) + f"{rmse:12.2f}")
    assert all(math.isfinite(v) for row in scores.values() for v in row)
    """),
    md("""
    What to look for:

    * **Beyond the data** every method extrapolates linearly (a ReLU network cannot do
      otherwise) and misses the cubic; the variational methods at least widen their bands
      there, which is what the log-likelihood beyond the data rewards. MAP's band is the noise
      alone.
    * **In the gap** the bands of the mean-field methods barely widen: fully factorised
      Gaussian posteriors are known to under-represent uncertainty *between* clusters of data
      (Foong et al., 2019, "In-between uncertainty in Bayesian neural networks"). The
      Kronecker-factored posteriors of noisy K-FAC/EK-FAC keep the correlations within each
      layer, but on this problem they do not widen much in the gap either.
    * **NoisyAdam and VOGN coincide**: with per-example squared gradients and the default
      bias correction both run the same update (derived on the docs' maths pages), so their
      panels are the same and their curves overlap in the last panel.
    * The natural-gradient optimizers reach their bands with the plain NLL as loss and the
      dataset size given once; their posterior scales come from curvature estimates, not from
      gradient descent on the scales as in BBB.
    """),
]

# ============================================================================ 03 MNIST
MNIST = [
    md("""
    # MNIST with the natural-gradient optimizers: accuracy, calibration, out-of-distribution

    A fully connected network (784-400-400-10, ReLU) trained on MNIST with a point estimate
    (MAP), Bayes-by-backprop and the five natural-gradient optimizers of `pyvarinf2.optim`.
    For each: test accuracy, negative log-likelihood, expected calibration error (ECE) and the
    Brier score on MNIST; and how well the predictive entropy and the mutual information tell
    Fashion-MNIST images (never seen in training) from MNIST test images (AUROC).

    The stored outputs come from a full-size run on a 2-core CPU; `PYVARINF2_NB_SMALL=1` runs
    the same code for CI with a 784-100-100-10 network, 150 training steps and 1 000 test
    images.
    """),
    code(SETUP + """\
import pathlib

from pyvarinf2.data import load_image_dataset
from pyvarinf2.optim import IVON, NoisyAdam, NoisyEKFAC, NoisyKFAC, VOGN
from pyvarinf2.predict import classification_predictive
"""),
    md("""
    ## Data

    The MNIST-family files are read from `$PYVARINF2_DATA`, or from `../../shared/data`
    relative to this notebook's folder. Pixels are scaled to $[0, 1]$; nothing is downloaded.
    """),
    code("""
    DATA = pathlib.Path(os.environ.get("PYVARINF2_DATA") or pathlib.Path.cwd() / ".." / ".." / "shared" / "data")
    mnist = load_image_dataset("mnist", DATA)
    fashion = load_image_dataset("fashion_mnist", DATA, parts=("test",))

    N_TEST = 1000 if SMALL else 10000
    EPOCHS = 1 if SMALL else 5
    MAX_STEPS = 150 if SMALL else None     # CI: a short run on the whole training set
    BATCH = 64 if SMALL else 128
    WIDTH = 100 if SMALL else 400
    TEST_SAMPLES = 8 if SMALL else 32

    x_train, y_train = mnist.x_train.flatten(1), mnist.y_train
    x_test, y_test = mnist.x_test[:N_TEST].flatten(1), mnist.y_test[:N_TEST]
    x_ood = fashion.x_test[:N_TEST].flatten(1)
    N = len(x_train)
    print(f"train {tuple(x_train.shape)}, test {tuple(x_test.shape)}, OOD {tuple(x_ood.shape)}; "
          f"{EPOCHS} epoch(s) of batch {BATCH}"
          + (f", stopped after {MAX_STEPS} steps" if MAX_STEPS else "") + f"; hidden width {WIDTH}")
    """),
    md("""
    ## Training

    One loop for all methods. Bayes-by-backprop adds `prior_loss() / N` to the mean NLL; MAP
    adds the negative log prior over N (same prior, posterior mode); the natural-gradient
    optimizers get `dataset_size=N` and the plain mean NLL. MAP and Bayes-by-backprop use Adam
    with learning rate `1e-3`; the natural-gradient optimizers use their default
    hyper-parameters (the learning rate is printed with the results). Every learning rate is
    divided by 10 after epoch `int(0.7 * EPOCHS)`: for the last 2 of the 5 epochs here (at the
    1-epoch size CI runs, never).
    """),
    code("""
    def network():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(784, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(),
                             nn.Linear(WIDTH, 10))


    METHODS = {
        "MAP": lambda vm: torch.optim.Adam(vm.model.parameters(), lr=1e-3),
        "BBB": lambda vm: torch.optim.Adam(vm.parameters(), lr=1e-3),
        "NoisyAdam": lambda vm: NoisyAdam(vm, dataset_size=N),
        "VOGN": lambda vm: VOGN(vm, dataset_size=N),
        "IVON": lambda vm: IVON(vm, dataset_size=N),
        "NoisyKFAC": lambda vm: NoisyKFAC(vm, dataset_size=N),
        "NoisyEKFAC": lambda vm: NoisyEKFAC(vm, dataset_size=N),
    }


    def train(name):
        var_model = pyvarinf2.variationalize(network())
        opt = METHODS[name](var_model)
        decay_at = max(1, int(0.7 * EPOCHS))
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[decay_at], gamma=0.1)
        g = torch.Generator().manual_seed(0)
        var_model.train()
        start, steps = time.time(), 0
        for epoch in range(EPOCHS):
            for idx in torch.randperm(N, generator=g).split(BATCH):
                if MAX_STEPS is not None and steps == MAX_STEPS:
                    break
                steps += 1
                xb, yb = x_train[idx], y_train[idx]
                opt.zero_grad()
                if name == "MAP":
                    nll = F.cross_entropy(var_model.model(xb), yb)
                    neg_log_prior = sum(-var_model.prior_of(n).log_prob(p)
                                        for n, p in var_model.model.named_parameters())
                    loss = nll + neg_log_prior / N
                else:
                    loss = F.cross_entropy(var_model(xb), yb)
                    if name == "BBB":
                        loss = loss + var_model.prior_loss() / N
                loss.backward()
                opt.step()
            sched.step()
        return var_model, 1000 * (time.time() - start) / steps, opt.defaults["lr"]


    def evaluate(name, var_model):
        with torch.no_grad():
            if name == "MAP":
                var_model.eval()
                p_in = var_model.model(x_test).softmax(-1)
                p_out = var_model.model(x_ood).softmax(-1)
                mi_in = mi_out = None
            else:
                pin = classification_predictive(var_model, x_test, n_samples=TEST_SAMPLES)
                pout = classification_predictive(var_model, x_ood, n_samples=TEST_SAMPLES)
                p_in, p_out = pin.probs, pout.probs
                mi_in, mi_out = pin.mutual_information, pout.mutual_information
        ent_in, ent_out = metrics.predictive_entropy(p_in), metrics.predictive_entropy(p_out)
        row = metrics.classification_metrics(p_in, y_test)
        row["auroc_entropy"] = metrics.ood_auroc(ent_in, ent_out)
        row["auroc_mi"] = float("nan") if mi_in is None else metrics.ood_auroc(mi_in, mi_out)
        return row, p_in, ent_in, ent_out


    results = {}
    for name in METHODS:
        var_model, ms_per_step, lr = train(name)
        row, probs, ent_in, ent_out = evaluate(name, var_model)
        row["ms_per_step"], row["lr"] = ms_per_step, lr
        results[name] = (row, probs, ent_in, ent_out)
        print(f"{name:11s} {ms_per_step:6.1f} ms/step   accuracy {row['accuracy']:.4f}", flush=True)
    """),
    md("""
    ## Results

    AUROC: 0.5 is chance, 1 is perfect separation of Fashion-MNIST (positives) from MNIST test
    images by the score. MAP has no weight uncertainty, hence no mutual information.
    """),
    code("""
    cols = [("accuracy", "accuracy", "{:.4f}"), ("nll", "NLL", "{:.4f}"), ("ece", "ECE", "{:.4f}"),
            ("brier", "Brier", "{:.4f}"), ("auroc_entropy", "AUROC H", "{:.3f}"),
            ("auroc_mi", "AUROC MI", "{:.3f}"), ("ms_per_step", "ms/step", "{:.1f}"),
            ("lr", "lr", "{:g}")]
    print(f"{'method':12s}" + "".join(f"{title:>10s}" for _, title, _ in cols))
    for name, (row, *_) in results.items():
        print(f"{name:12s}" + "".join(f"{fmt.format(row[key]):>10s}" for key, _, fmt in cols))
    # every method must have learned: far above chance (0.1), and well trained at full size
    assert all(row["accuracy"] > (0.2 if SMALL else 0.8) for row, *_ in results.values())
    """),
    code("""
    names = list(results)
    fig, axes = plt.subplots(2, len(names), figsize=(2.3 * len(names), 4.8))
    edges = torch.linspace(0, 1, 16)
    centers = 0.5 * (edges[1:] + edges[:-1])
    for j, name in enumerate(names):
        row, probs, ent_in, ent_out = results[name]
        conf, acc, counts = metrics.calibration_bins(probs, y_test, n_bins=15)
        ok = counts > 0
        ax = axes[0, j]
        ax.bar(centers[ok], acc[ok], width=1 / 15, color="C0", edgecolor="k", lw=0.4)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_title(f"{name}\\nECE {row['ece']:.3f}")
        ax.set_xlim(0, 1); ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax = axes[1, j]
        bins = torch.linspace(0, math.log(10), 31)
        ax.hist(ent_in, bins=bins, alpha=0.6, density=True, label="MNIST")
        ax.hist(ent_out, bins=bins, alpha=0.6, density=True, label="Fashion")
        ax.set_title(f"AUROC {row['auroc_entropy']:.3f}")
        ax.set_xlabel("predictive entropy")
        ax.set_yticks([])
    axes[0, 0].set_ylabel("accuracy")
    axes[1, 0].legend(fontsize=7)
    fig.tight_layout()
    plt.show()
    """, tags=["gallery"]),
    md("""
    Top row: reliability diagrams (accuracy against confidence in 15 bins; the diagonal is
    perfect calibration, bars above it mean the model is right more often than it claims, i.e.
    under-confident, bars below it over-confident). Bottom row: predictive entropy on MNIST
    test images and on Fashion-MNIST; the better separated, the higher the AUROC. The mutual
    information (AUROC MI in the table) separates them better than the entropy for every
    variational method here, as it measures only the disagreement between weight samples.

    Things to keep in mind when reading the table: the runs are short (a few epochs, one
    seed), the hyper-parameters are the defaults rather than tuned per method, and the time
    per step was measured on a shared 2-core CPU, so only large differences mean anything.
    The `benchmarks/` folder measures speed properly, against plain training in the same
    process.
    """),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_regression_1d.ipynb": REGRESSION,
    "03_mnist_natural_gradient.ipynb": MNIST,
}


def build(cells):
    nb = new_notebook()
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    for kind, source, tags in cells:
        cell = new_markdown_cell(source) if kind == "md" else new_code_cell(source)
        if tags:
            cell.metadata["tags"] = tags
        nb.cells.append(cell)
    # stable ids keep diffs small when the notebooks are regenerated
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
    return nb


def execute(nb, small, timeout=1800, cwd=HERE):
    """Run ``nb`` in place with nbclient (kernel ``python3``), in ``cwd``."""
    from nbclient import NotebookClient
    old = os.environ.get("PYVARINF2_NB_SMALL")
    os.environ["PYVARINF2_NB_SMALL"] = "1" if small else "0"
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": str(cwd)}}).execute()
    finally:
        if old is None:
            os.environ.pop("PYVARINF2_NB_SMALL", None)
        else:
            os.environ["PYVARINF2_NB_SMALL"] = old
    return nb


def keep_outputs(nb, old):
    """Copy the outputs of ``old`` into ``nb`` when every code cell's source is unchanged (for
    edits of the Markdown only); returns whether it did."""
    new_code = [c for c in nb.cells if c.cell_type == "code"]
    old_code = [c for c in old.cells if c.cell_type == "code"]
    if [c.source for c in new_code] != [c.source for c in old_code]:
        return False
    for new, prev in zip(new_code, old_code):
        new.outputs, new.execution_count = prev.outputs, prev.execution_count
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("only", nargs="*", help="substrings of the notebook names to write")
    ap.add_argument("--execute", action="store_true", help="execute after writing")
    ap.add_argument("--small", action="store_true", help="execute at the reduced (CI) size")
    ap.add_argument("--keep-outputs", action="store_true",
                    help="without --execute: keep the stored outputs of a notebook whose code "
                         "cells are unchanged (Markdown-only edits)")
    ap.add_argument("--out", default=str(HERE), help="output folder (default: this one)")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, cells in NOTEBOOKS.items():
        if args.only and not any(s in name for s in args.only):
            continue
        nb = build(cells)
        if args.execute:
            start = time.time()
            execute(nb, args.small)
            print(f"{name}: executed in {time.time() - start:.0f} s", file=sys.stderr)
        elif args.keep_outputs and (out / name).is_file():
            if not keep_outputs(nb, nbformat.read(str(out / name), as_version=4)):
                print(f"{name}: code changed, outputs dropped; run with --execute",
                      file=sys.stderr)
        nbformat.validate(nb)
        nbformat.write(nb, str(out / name))
        print(out / name)


if __name__ == "__main__":
    main()
