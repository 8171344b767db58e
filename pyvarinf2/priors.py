"""Priors over one parameter tensor.

Every prior here is a distribution over a whole tensor ``theta`` (the conjugate priors tie the
entries of a tensor together through a shared, integrated-out mean and variance), exposes
``log_prob(theta)`` as a *sum* over the tensor in nats, and ``kl(mean, std)`` — the KL divergence
from a mean-field Gaussian posterior ``N(mean, std**2)`` to the prior, again a sum in nats.

* :class:`GaussianPrior` has a closed-form KL.
* :class:`ConjugatePrior`, :class:`ConjugateKnownMeanPrior` and :class:`MixtureGaussianPrior`
  estimate ``KL = -E_q[log p(theta)] - H(q)`` with ``n_mc_samples`` reparameterised samples (the
  entropy ``H(q)`` is closed form), so the estimate is differentiable in ``mean`` and ``std``.
* :class:`DistributionPrior` wraps any ``torch.distributions.Distribution``; it uses
  ``torch.distributions.kl_divergence`` against a ``Normal`` when one is registered, else Monte
  Carlo.

Priors are plain Python objects (not modules): their settings are saved in the variational
model's ``state_dict`` through ``get_extra_state`` as ``(kind, settings)`` pairs, see
:meth:`Prior.spec` and :func:`make_prior`.
"""
import math
import numbers
import warnings

import torch
import torch.distributions as D

__all__ = [
    "Prior", "GaussianPrior", "ConjugatePrior", "ConjugateKnownMeanPrior", "MixtureGaussianPrior",
    "DistributionPrior", "make_prior", "PRIOR_KINDS", "gaussian_entropy",
]

_LOG_2PI = math.log(2.0 * math.pi)


def _check_positive(name, value):
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_finite(name, value):
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_n_mc(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"n_mc_samples must be an integer >= 1, got {value!r}")
    return int(value)


def gaussian_entropy(std):
    """Entropy in nats of a factorised Gaussian with standard deviations ``std`` (summed)."""
    return (torch.log(std) + 0.5 * (_LOG_2PI + 1.0)).sum()


class Prior:
    """Base class: a prior over one parameter tensor."""

    kind = None
    #: True when :meth:`kl` is exact rather than a Monte-Carlo estimate.
    closed_form = False
    n_mc_samples = 1

    def log_prob(self, theta):
        """Log density of the whole tensor ``theta`` (a scalar, summed over entries).

        A leading batch of samples is not supported here; :meth:`kl` loops over samples.
        """
        raise NotImplementedError

    def kl(self, mean, std):
        """KL(N(mean, std²) || prior) in nats, summed over the tensor.

        The default is the Monte-Carlo estimate ``-mean_s log p(mean + std * eps_s) - H(q)``.
        """
        total = mean.new_zeros(())
        for _ in range(self.n_mc_samples):
            theta = torch.addcmul(mean, std, torch.randn_like(mean))
            total = total + self.log_prob(theta)
        return -total / self.n_mc_samples - gaussian_entropy(std)

    def neg_log_prob_grad(self, theta, scale=1.0):
        """``scale · (−∇ log p(θ))``, the prior term of a natural-gradient step."""
        return self.log_prob_grad(theta) * (-scale)

    def log_prob_grad(self, theta):
        """Gradient of :meth:`log_prob` at ``theta`` (used by the natural-gradient optimizers)."""
        with torch.enable_grad():
            t = theta.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.log_prob(t), t)
        return g

    def precision(self, like):
        """Diagonal prior precision as a tensor shaped like ``like`` if the prior is Gaussian,
        else ``None`` (non-Gaussian priors enter the natural-gradient optimizers through
        :meth:`log_prob_grad`)."""
        return None

    def variance(self, like):
        """Marginal variance of one entry under the prior (a float), used as the moment-matched
        Gaussian precision ``1/variance`` by the natural-gradient optimizers for non-Gaussian
        priors (whose exact contribution enters through :meth:`log_prob_grad`)."""
        raise NotImplementedError

    def damping_precision(self, like):
        """Per-entry precision the natural-gradient optimizers add to their curvature: exact for
        a Gaussian prior, ``1 / variance`` (moment matching) otherwise."""
        exact = self.precision(like)
        if exact is not None:
            return exact
        return torch.full_like(like, 1.0 / self.variance(like))

    def spec(self):
        """``(kind, settings)``: enough to rebuild this prior with :func:`make_prior`."""
        raise NotImplementedError

    def __repr__(self):
        kind, settings = self.spec()
        inner = ", ".join(f"{k}={v!r}" for k, v in settings.items())
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other):
        return type(self) is type(other) and self.spec() == other.spec()

    __hash__ = object.__hash__


class GaussianPrior(Prior):
    """``N(mean, std²)`` on every entry.

    With ``std=None`` the standard deviation follows PyVarInf's rule, resolved per tensor by
    :meth:`resolve_std`: ``1/sqrt(fan_in)`` for tensors with ``dim() > 1``, where
    ``fan_in = numel / shape[0]`` (the product of all dimensions but the first, i.e. the inputs
    of one output unit for Linear, Conv and Embedding-style tables), and ``1`` for tensors with
    ``dim() <= 1`` (biases, normalisation scales and shifts, scalars).

    ``fan_in`` is the one ``torch.nn.init`` uses, so for the other layers: Conv with groups,
    ``in_channels/groups * kernel size``; ConvTranspose (weight ``(in, out/groups, *kernel)``),
    ``out_channels/groups * kernel size``; Embedding, the embedding dimension; LSTM/GRU
    ``weight_ih``/``weight_hh``, the input/hidden (or projection) size; MultiheadAttention's
    packed ``in_proj_weight``, ``embed_dim``.
    """

    kind = "gaussian"
    closed_form = True

    def __init__(self, std=None, mean=0.0):
        self.std = None if std is None else _check_positive("std", std)
        self.mean = _check_finite("mean", mean)

    @staticmethod
    def default_std(shape):
        shape = tuple(shape)
        if len(shape) > 1:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            return 1.0 / math.sqrt(max(fan_in, 1))
        return 1.0

    def resolve_std(self, like):
        return self.std if self.std is not None else self.default_std(like.shape)

    def log_prob(self, theta):
        s = self.resolve_std(theta)
        z = (theta - self.mean) / s
        return -0.5 * (z * z).sum() - theta.numel() * (math.log(s) + 0.5 * _LOG_2PI)

    def kl(self, mean, std):
        sp = self.resolve_std(mean)
        d = mean - self.mean if self.mean != 0.0 else mean
        # sum[ log(sp/s) + (s^2 + d^2)/(2 sp^2) - 1/2 ]
        quad = (std * std + d * d).sum() / (2.0 * sp * sp)
        return quad - torch.log(std).sum() + mean.numel() * (math.log(sp) - 0.5)

    def log_prob_grad(self, theta):
        s = self.resolve_std(theta)
        return -(theta - self.mean) / (s * s)

    def neg_log_prob_grad(self, theta, scale=1.0):
        if type(self).log_prob_grad is not GaussianPrior.log_prob_grad:
            return super().neg_log_prob_grad(theta, scale)   # a subclass's own gradient
        s = self.resolve_std(theta)
        c = scale / (s * s)      # scale (θ − m) / s² in one pass where m = 0
        return theta * c if self.mean == 0.0 else (theta - self.mean) * c

    def precision(self, like):
        s = self.resolve_std(like)
        return torch.full_like(like, 1.0 / (s * s))

    def variance(self, like):
        return self.resolve_std(like) ** 2

    def spec(self):
        return self.kind, {"std": self.std, "mean": self.mean}


class ConjugatePrior(Prior):
    """Normal-inverse-gamma hyper-prior on the tensor's shared mean and variance, integrated out
    (Murphy 2007, the marginal likelihood of n observations).

    ``mu_0`` is the prior mean, ``kappa_0`` the number of pseudo-observations behind it, and the
    variance was estimated from ``2 alpha_0`` pseudo-observations with sum of squared deviations
    ``2 beta_0``.
    """

    kind = "conjugate"

    def __init__(self, n_mc_samples=1, alpha_0=1.0, beta_0=1.0, mu_0=0.0, kappa_0=1.0):
        self.n_mc_samples = _check_n_mc(n_mc_samples)
        self.alpha_0 = _check_positive("alpha_0", alpha_0)
        self.beta_0 = _check_positive("beta_0", beta_0)
        self.mu_0 = _check_finite("mu_0", mu_0)
        self.kappa_0 = _check_positive("kappa_0", kappa_0)

    def log_prob(self, theta):
        x = theta.reshape(-1)
        n = x.numel()
        a0, b0, m0, k0 = self.alpha_0, self.beta_0, self.mu_0, self.kappa_0
        a_n = a0 + n / 2.0
        k_n = k0 + n
        xbar = x.mean()
        ss = ((x - xbar) ** 2).sum()
        b_n = b0 + 0.5 * ss + k0 * n * (xbar - m0) ** 2 / (2.0 * k_n)
        const = (math.lgamma(a_n) - math.lgamma(a0) + a0 * math.log(b0)
                 + 0.5 * math.log(k0 / k_n) - 0.5 * n * _LOG_2PI)
        return const - a_n * torch.log(b_n)

    def variance(self, like):
        # marginal variance of one entry, theta_i = mu + sigma z with mu ~ N(mu_0, sigma^2 /
        # kappa_0): E[sigma^2] (1 + 1/kappa_0), E[sigma^2] under the inverse gamma (its mode
        # when alpha_0 <= 1, where the mean is infinite)
        a, b = self.alpha_0, self.beta_0
        s2 = b / (a - 1.0) if a > 1.0 else b / (a + 1.0)
        return s2 * (1.0 + 1.0 / self.kappa_0)

    def spec(self):
        return self.kind, {"n_mc_samples": self.n_mc_samples, "alpha_0": self.alpha_0,
                           "beta_0": self.beta_0, "mu_0": self.mu_0, "kappa_0": self.kappa_0}


class ConjugateKnownMeanPrior(Prior):
    """Inverse-gamma hyper-prior on the tensor's shared variance, known mean, integrated out."""

    kind = "conjugate_known_mean"

    def __init__(self, n_mc_samples=1, mean=0.0, alpha_0=1.0, beta_0=1.0):
        self.n_mc_samples = _check_n_mc(n_mc_samples)
        self.mean = _check_finite("mean", mean)
        self.alpha_0 = _check_positive("alpha_0", alpha_0)
        self.beta_0 = _check_positive("beta_0", beta_0)

    def log_prob(self, theta):
        x = theta.reshape(-1)
        n = x.numel()
        a0, b0 = self.alpha_0, self.beta_0
        a_n = a0 + n / 2.0
        b_n = b0 + 0.5 * ((x - self.mean) ** 2).sum()
        const = math.lgamma(a_n) - math.lgamma(a0) + a0 * math.log(b0) - 0.5 * n * _LOG_2PI
        return const - a_n * torch.log(b_n)

    def variance(self, like):
        # variance of one entry: E[sigma^2] under the inverse gamma (its mode when alpha_0 <= 1,
        # where the mean is infinite)
        a, b = self.alpha_0, self.beta_0
        return b / (a - 1.0) if a > 1.0 else b / (a + 1.0)

    def spec(self):
        return self.kind, {"n_mc_samples": self.n_mc_samples, "mean": self.mean,
                           "alpha_0": self.alpha_0, "beta_0": self.beta_0}


class MixtureGaussianPrior(Prior):
    """Scale mixture ``pi N(0, sigma_1²) + (1 - pi) N(0, sigma_2²)`` on every entry
    (Blundell et al. 2015), evaluated with ``logsumexp`` of normalised log densities so that it
    stays exact far in the tails."""

    kind = "mixtgauss"

    def __init__(self, n_mc_samples=1, sigma_1=1.0, sigma_2=math.exp(-6), pi=0.5):
        self.n_mc_samples = _check_n_mc(n_mc_samples)
        self.sigma_1 = _check_positive("sigma_1", sigma_1)
        self.sigma_2 = _check_positive("sigma_2", sigma_2)
        if not isinstance(pi, numbers.Real) or isinstance(pi, bool) or not 0.0 < pi < 1.0:
            raise ValueError(f"pi must be a number in the open interval (0, 1), got {pi!r}")
        self.pi = float(pi)

    def log_prob(self, theta):
        s1, s2 = self.sigma_1, self.sigma_2
        t2 = theta * theta
        l1 = -0.5 * t2 / (s1 * s1) + (math.log(self.pi) - math.log(s1) - 0.5 * _LOG_2PI)
        l2 = -0.5 * t2 / (s2 * s2) + (math.log1p(-self.pi) - math.log(s2) - 0.5 * _LOG_2PI)
        return torch.logaddexp(l1, l2).sum()

    def variance(self, like):
        return self.pi * self.sigma_1 ** 2 + (1.0 - self.pi) * self.sigma_2 ** 2

    def spec(self):
        return self.kind, {"n_mc_samples": self.n_mc_samples, "sigma_1": self.sigma_1,
                           "sigma_2": self.sigma_2, "pi": self.pi}


class DistributionPrior(Prior):
    """Any ``torch.distributions.Distribution`` as an element-wise prior (its ``log_prob`` is
    evaluated entry by entry and summed; its batch shape must broadcast to the tensor).

    ``distribution`` may also be the name of a ``torch.distributions`` class with its
    constructor arguments in ``args`` (``DistributionPrior('Laplace', args={'loc': 0., 'scale':
    1.})``): that is the form :meth:`spec` saves in a ``state_dict``, so that a checkpoint loads
    with ``torch.load(weights_only=True)``. Distributions that cannot be rebuilt from their
    tensor arguments (e.g. mixtures of other distributions) are saved as the object itself.
    """

    kind = "distribution"

    def __init__(self, distribution, n_mc_samples=1, args=None):
        if isinstance(distribution, str):
            cls = getattr(D, distribution, None)
            if not (isinstance(cls, type) and issubclass(cls, D.Distribution)):
                raise ValueError("distribution must be a torch.distributions.Distribution or the "
                                 "name of a torch.distributions class, got "
                                 f"{distribution!r}")
            if not isinstance(args, dict):
                raise TypeError(f"args must be a dict of constructor arguments of "
                                f"torch.distributions.{distribution}, got {args!r}")
            distribution = cls(**args)
        elif args is not None:
            raise TypeError("args is only used with a distribution given by name, got "
                            f"args={args!r} with a {type(distribution).__name__}")
        if not isinstance(distribution, D.Distribution):
            raise TypeError("distribution must be a torch.distributions.Distribution, got "
                            f"{type(distribution).__name__}")
        self.distribution = distribution
        self.n_mc_samples = _check_n_mc(n_mc_samples)
        try:
            D.kl_divergence(D.Normal(torch.zeros(()), torch.ones(())), distribution)
            self.closed_form = True
        except NotImplementedError:
            self.closed_form = False

    def check_fits(self, shape, name):
        """Raise a ValueError unless the distribution is element-wise (no event dimensions)
        with a batch shape that broadcasts to ``shape`` without enlarging it: a larger batch
        shape would silently sum several log densities per weight."""
        dist = self.distribution
        event = tuple(dist.event_shape)
        if event and tuple(shape)[len(shape) - len(event):] != event:
            raise ValueError(f"prior for {name}: {type(dist).__name__} has event shape {event}, "
                             f"which is not the trailing shape of the parameter {tuple(shape)}; "
                             "give a univariate distribution (one per weight or shared) or an "
                             "Independent one over the parameter's own trailing dimensions")
        batch = tuple(dist.batch_shape) + event
        try:
            fits = tuple(torch.broadcast_shapes(batch, tuple(shape))) == tuple(shape)
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"prior for {name}: batch shape {batch} of the "
                             f"{type(dist).__name__} does not broadcast to the parameter's shape "
                             f"{tuple(shape)}")

    def _on(self, like):
        # move the distribution's tensors to the parameter's device/dtype lazily
        dist = self.distribution
        params = _distribution_args(dist)
        if params is None:
            return dist
        if not any(v.device != like.device or v.dtype != like.dtype for v in params.values()):
            return dist
        moved = {k: v.to(device=like.device, dtype=like.dtype) for k, v in params.items()}
        return type(dist)(**moved, validate_args=False)

    def log_prob(self, theta):
        return self._on(theta).log_prob(theta).sum()

    def kl(self, mean, std):
        if self.closed_form:
            kl = D.kl_divergence(D.Normal(mean, std, validate_args=False), self._on(mean))
            return kl.expand(mean.shape).sum() if kl.shape != mean.shape else kl.sum()
        return super().kl(mean, std)

    def precision(self, like):
        dist = self.distribution
        if isinstance(dist, D.Normal):
            return (1.0 / self._on(like).scale ** 2).expand(like.shape).clone()
        return None

    def variance(self, like):
        """The distribution's variance (its mean over a batch shape). Where it is infinite or
        undefined (Cauchy, Student-t with df <= 2, ...) the squared ``scale`` stands in, or 1
        without one; either way with a warning, since the natural-gradient optimizers damp
        their curvature with 1/variance."""
        try:
            v = self.distribution.variance
        except NotImplementedError:
            v = None
        if v is not None and torch.isfinite(torch.as_tensor(v)).all():
            return float(torch.as_tensor(v).float().mean())
        scale = getattr(self.distribution, "scale", None)
        if torch.is_tensor(scale) and torch.isfinite(scale).all() and (scale > 0).all():
            stand_in, what = float((scale.float() ** 2).mean()), "its scale squared"
        else:
            stand_in, what = 1.0, "1"
        warnings.warn(
            f"prior {self.distribution!r} has no finite variance; the natural-gradient "
            f"optimizers' moment-matched damping 1/variance uses {what} ({stand_in:.4g}) "
            "instead. Pass extrinsic_damping or use a prior with a variance to control it.",
            UserWarning, stacklevel=2)
        return stand_in

    def spec(self):
        dist = self.distribution
        args = _distribution_args(dist)
        if args is not None:
            return self.kind, {"distribution": type(dist).__name__,
                               "args": {k: v.detach().clone() for k, v in args.items()},
                               "n_mc_samples": self.n_mc_samples}
        return self.kind, {"distribution": dist, "n_mc_samples": self.n_mc_samples}

    def __eq__(self, other):
        if type(self) is not type(other):
            return False
        if self.distribution is other.distribution:
            return self.n_mc_samples == other.n_mc_samples
        (_, a), (_, b) = self.spec(), other.spec()
        if not isinstance(a["distribution"], str) or a["distribution"] != b["distribution"]:
            return False
        return (a["n_mc_samples"] == b["n_mc_samples"] and set(a["args"]) == set(b["args"])
                and all(torch.equal(a["args"][k], b["args"][k]) for k in a["args"]))

    __hash__ = object.__hash__


def _distribution_args(dist):
    """The tensor constructor arguments that rebuild ``dist`` (a ``torch.distributions`` class
    reachable by name), or ``None`` if it cannot be rebuilt that way."""
    cls = type(dist)
    if getattr(D, cls.__name__, None) is not cls:
        return None
    try:
        names = [k for k in dist.arg_constraints if k in vars(dist)]
    except NotImplementedError:
        return None
    if not names:
        return None
    ctor = _ctor_args(cls)
    args = {k: vars(dist)[k] for k in names if k in ctor}
    if not args or not all(torch.is_tensor(v) for v in args.values()):
        return None
    try:
        rebuilt = cls(**args, validate_args=False)
    except (TypeError, ValueError):
        return None
    if rebuilt.batch_shape != dist.batch_shape or rebuilt.event_shape != dist.event_shape:
        return None
    return args


def _ctor_args(cls):
    import inspect
    try:
        return set(inspect.signature(cls.__init__).parameters)
    except (TypeError, ValueError):
        return set()


PRIOR_KINDS = {
    "gaussian": GaussianPrior,
    "conjugate": ConjugatePrior,
    "conjugate_known_mean": ConjugateKnownMeanPrior,
    "mixtgauss": MixtureGaussianPrior,
    "distribution": DistributionPrior,
}


def make_prior(prior, *args, **kwargs):
    """Build a prior from a name and PyVarInf's positional arguments, a ``Prior`` or a
    ``torch.distributions.Distribution``.

    Positional orders are PyVarInf's: ``('conjugate', n_mc_samples, alpha_0, beta_0, mu_0,
    kappa_0)``, ``('conjugate_known_mean', n_mc_samples, mean, alpha_0, beta_0)``,
    ``('mixtgauss', n_mc_samples, sigma_1, sigma_2, pi)``; ``('gaussian', std=None, mean=0.0)``.
    """
    if isinstance(prior, Prior):
        if args or kwargs:
            raise TypeError("extra arguments given with a Prior instance")
        return prior
    if isinstance(prior, D.Distribution):
        return DistributionPrior(prior, *args, **kwargs)
    if not isinstance(prior, str):
        raise TypeError("prior must be a name (one of "
                        f"{sorted(k for k in PRIOR_KINDS if k != 'distribution')}), a Prior or a "
                        f"torch.distributions.Distribution, got {type(prior).__name__}")
    if prior not in PRIOR_KINDS or prior == "distribution" and not args and "distribution" not in kwargs:
        raise ValueError(f"unknown prior {prior!r}; expected one of "
                         f"{sorted(k for k in PRIOR_KINDS if k != 'distribution')}")
    return PRIOR_KINDS[prior](*args, **kwargs)
