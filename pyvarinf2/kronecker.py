"""The matrix-variate (Kronecker-factored) Gaussian posterior of one Linear or Conv2d layer.

A layer with weight ``W`` (``out x fan_in`` once flattened; a Conv2d weight ``(out, in, kh, kw)``
flattens to ``out x in*kh*kw`` in the order of ``F.unfold``) and optional bias ``b`` is handled
as one homogeneous matrix ``W_h = [W, b]`` of shape ``out x n_in`` (``n_in = fan_in + 1`` with a
bias, the bias being the weight of a constant input 1).

:class:`KroneckerPosterior` stores the posterior of ``W_h`` in an eigenbasis:
``W_h = M_h + Q_S (std ⊙ E) Q_Aᵀ`` with ``E`` standard normal, ``Q_S`` (``out x out``) and ``Q_A``
(``n_in x n_in``) orthogonal and ``std`` an ``out x n_in`` matrix of positive scales. This one form
holds all the families the optimizers use:

* noisy K-FAC with π-split damping, ``W = M + sqrt(λ/N) S_γ^{-1/2} E A_γ^{-1/2}``: ``Q_A``, ``Q_S``
  the eigenvectors of ``A``, ``S`` and ``std = sqrt(λ/N) / sqrt((d_S + √γ/π)(d_A + π√γ)ᵀ)`` (a
  rank-one scale: a matrix-variate Gaussian; ``S_γ^{-1/2} E A_γ^{-1/2}`` and
  ``Q_S (std ⊙ E') Q_Aᵀ`` have the same distribution because ``Q_Sᵀ E Q_A`` is standard normal);
* noisy K-FAC with exact (eigenvalue) damping, covariance ``(λ/N) (S ⊗ A + γ I)⁻¹``:
  ``std = sqrt(λ/N / (d_S d_Aᵀ + γ))``;
* noisy EK-FAC: ``std = sqrt(λ/N / (R + γ))`` with ``R`` the re-estimated diagonal scale;
* a mean-field Gaussian: identity bases and any ``std`` (how a layer starts: converting a
  mean-field posterior keeps its distribution exactly).

The factors are buffers, so the variational model samples, predicts and saves them without any
optimizer; the means stay the wrapped model's own parameters.

A Linear layer need not form ``Z = Q_S (std ⊙ E) Q_Aᵀ`` at all: its output under ``M + Z`` is
its output under ``M`` plus :meth:`KroneckerPosterior.linear_output_noise`,
``((x_h Q_A)(std ⊙ E)ᵀ) Q_Sᵀ``, cheaper when the batch has fewer rows than the layer has units;
``VariationalModel.forward`` takes that route per call where it costs fewer flops
(``VariationalModel.activation_noise_layers``, ``var_model.activation_noise``).

How a model gets (and gets back) Kronecker posteriors: :func:`use_kronecker_posteriors` converts
every eligible layer (the optimizers call it; it is idempotent). A model saved with Kronecker
posteriors records them in its extra state (``_extra_state['posteriors']``), and
``VariationalModel.load_state_dict`` installs them in a freshly variationalized model before
loading, so ``variationalize(Net()).load_state_dict(saved)`` just works; calling
:func:`use_kronecker_posteriors` first works as well.
"""
import math

import torch

from .posteriors import MeanFieldPosterior, Posterior
from .priors import DistributionPrior, GaussianPrior

__all__ = ["KroneckerPosterior", "use_kronecker_posteriors", "kronecker_posteriors"]

_LOG_2PI = math.log(2.0 * math.pi)


def _gaussian_prior_moments(prior, like):
    """``(mean, precision)`` tensors shaped like ``like`` for a Gaussian prior, else ``None``."""
    if isinstance(prior, GaussianPrior):
        return torch.full_like(like, prior.mean), prior.precision(like)
    if isinstance(prior, DistributionPrior) and \
            isinstance(prior.distribution, torch.distributions.Normal):
        dist = prior._on(like)
        return dist.loc.expand(like.shape).to(like), (dist.scale ** -2).expand(like.shape).to(like)
    return None


def matmul_chain(*mats, dtype=None):
    """``mats[0] @ mats[1] @ ...``; with ``dtype`` (e.g. ``torch.bfloat16``) different from the
    inputs', the products run in that dtype (accumulating in float32, as oneDNN and cuBLAS do)
    and the result is cast back."""
    out_dtype = mats[0].dtype
    if dtype is None or dtype == out_dtype:
        out = mats[0]
        for m in mats[1:]:
            out = out @ m
        return out
    out = mats[0].to(dtype)
    for m in mats[1:]:
        out = out @ m.to(dtype)
    return out.to(out_dtype)


def check_matmul_dtype(value):
    """``None``, or a floating dtype (or its name, ``'bfloat16'``), for :func:`matmul_chain`."""
    if value is None:
        return None
    if isinstance(value, str):
        value = getattr(torch, value, None) if value.isidentifier() else None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"matmul_dtype must be None, a floating torch.dtype or its name "
                         f"(e.g. 'bfloat16'), got {value!r}")
    return value


class KroneckerPosterior(Posterior):
    """Matrix-variate Gaussian posterior over a layer's weight (and bias), see the module doc.

    Args:
        weight_name: name of the weight in the wrapped model (``'fc1.weight'``).
        weight_shape: its shape (``(out, in)`` or ``(out, in, kh, kw)``).
        bias_name: name of the bias, or ``None`` when the layer has no bias with a posterior.
        init_std: the initial ``std`` (a number, or an ``out x n_in`` tensor) in identity bases.
    """

    family = "kronecker"

    def __init__(self, weight_name, weight_shape, bias_name=None, init_std=1e-3, dtype=None,
                 device=None):
        names = (weight_name,) if bias_name is None else (weight_name, bias_name)
        super().__init__(names)
        weight_shape = tuple(int(s) for s in weight_shape)
        if len(weight_shape) < 2:
            raise ValueError(f"a Kronecker posterior needs a weight with >= 2 dimensions, got "
                             f"shape {weight_shape} for {weight_name!r}")
        self.weight_shape = weight_shape
        self.has_bias = bias_name is not None
        n_out = weight_shape[0]
        fan_in = math.prod(weight_shape[1:])
        self.fan_in = fan_in
        n_in = fan_in + int(self.has_bias)
        kw = {"dtype": dtype or torch.get_default_dtype(), "device": device}
        if torch.is_tensor(init_std):
            std = init_std.detach().to(**kw).clone()
            if std.shape != (n_out, n_in):
                raise ValueError(f"init_std must have shape {(n_out, n_in)}, got "
                                 f"{tuple(std.shape)}")
        else:
            std = torch.full((n_out, n_in), float(init_std), **kw)
        self.register_buffer("basis_out", torch.eye(n_out, **kw))
        self.register_buffer("basis_in", torch.eye(n_in, **kw))
        self.register_buffer("std", std)
        #: dtype of the two products of :meth:`perturbation` (``None``: the posterior's own).
        #: ``torch.bfloat16`` runs them ~4x faster on a CPU with AVX512-BF16 at ~0.4% relative
        #: error per entry of the noise; a compute setting, not saved in the state dict
        self.matmul_dtype = None

    # ------------------------------------------------------------------ shapes
    @property
    def n_out(self):
        return self.weight_shape[0]

    @property
    def n_in(self):
        return self.fan_in + int(self.has_bias)

    def matrix(self, means):
        """The homogeneous ``out x n_in`` matrix ``[W, b]`` of a list of tensors (weight, bias)."""
        w = means[0].reshape(self.n_out, self.fan_in)
        if not self.has_bias:
            return w
        return torch.cat([w, means[1].reshape(self.n_out, 1)], dim=1)

    def split(self, matrix):
        """Inverse of :meth:`matrix`: a list ``[weight, bias]`` shaped like the parameters."""
        w = matrix[:, :self.fan_in].reshape(self.weight_shape)
        if not self.has_bias:
            return [w]
        return [w, matrix[:, self.fan_in]]

    # ------------------------------------------------------------------ sampling
    def draw_noise(self, means):
        m = means[0]
        return [torch.randn(self.n_out, self.n_in, dtype=m.dtype, device=m.device)]

    def perturbation(self, noise):
        """``Q_S (std ⊙ E) Q_Aᵀ`` for a standard-normal ``E`` (``out x n_in``)."""
        return matmul_chain(self.basis_out, self.std * noise, self.basis_in.T,
                            dtype=self.matmul_dtype)

    def linear_output_noise(self, x, noise):
        """``x_h Zᵀ`` for the perturbation ``Z = Q_S (std ⊙ E) Q_Aᵀ`` of one draw ``E`` of a
        Linear layer (``x``: ``(*, fan_in)``, ``x_h = [x, 1]`` with a bias), computed as
        ``((x_h Q_A)(std ⊙ E)ᵀ) Q_Sᵀ`` without forming ``Z``: the output of the layer with
        weights ``M + Z`` is that of the layer with ``M`` plus this, exactly (same ``E``, same
        draw). Differentiable in ``x``; products in :attr:`matmul_dtype` when set."""
        dt = self.matmul_dtype or self.basis_in.dtype
        q_a, q_s = self.basis_in.to(dt), self.basis_out.to(dt)
        scaled = (self.std * noise).to(dt)
        rows = x.reshape(-1, self.fan_in).to(dt)
        if self.has_bias:   # the homogeneous coordinate 1 picks Q_A's last row
            u = torch.addmm(q_a[self.fan_in], rows, q_a[:self.fan_in])
        else:
            u = rows @ q_a
        out = (u @ scaled.T) @ q_s.T
        return out.reshape(*x.shape[:-1], self.n_out).to(x.dtype)

    def noise_costs(self, rows, input_grad=True):
        """Flop counts of the two ways to perturb a Linear layer's output for ``rows`` input
        rows: ``(activations, sample)``, :meth:`linear_output_noise` (doubled by its backward
        to the input when ``input_grad``) and forming ``Z`` (:meth:`perturbation`)."""
        f, n, o = self.fan_in, self.n_in, self.n_out
        return (2 * rows * (f * n + n * o + o * o) * (2 if input_grad else 1),
                2 * o * n * (o + n))

    def sample(self, means, noise=None):
        if noise is None:
            noise = self.draw_noise(means)
        z = self.perturbation(noise[0])
        w = means[0] + z[:, :self.fan_in].reshape(self.weight_shape)
        if not self.has_bias:
            return [w]
        return [w, means[1] + z[:, self.fan_in]]

    # ------------------------------------------------------------------ moments
    def marginal_variance(self):
        """Variance of every entry of ``[W, b]`` (``out x n_in``)."""
        return (self.basis_out ** 2) @ (self.std ** 2) @ (self.basis_in ** 2).T

    def marginal_stddevs(self):
        """Per-entry standard deviations, one tensor per name, shaped like the parameters."""
        return self.split(self.marginal_variance().sqrt())

    @property
    def stddev(self):
        """Per-entry standard deviation of the weight (the bias's: :meth:`marginal_stddevs`)."""
        return self.marginal_stddevs()[0]

    def covariance(self):
        """Dense covariance of ``vec(W_h)`` (row-major: entry ``W_h[i, j]`` at ``i * n_in + j``).

        ``(out·n_in)²`` numbers: for tests and small layers only."""
        q = torch.kron(self.basis_out, self.basis_in)
        return (q * (self.std ** 2).reshape(1, -1)) @ q.T

    def entropy(self):
        d = self.std.numel()
        return torch.log(self.std).sum() + 0.5 * d * (1.0 + _LOG_2PI)

    def kl(self, means, priors):
        """KL(q || Π_n p_n) = Σ_n CE(q_n, p_n) − H(q): the cross-entropy of a Gaussian prior in
        closed form (trace, Mahalanobis and log-det terms), of any other prior by Monte Carlo
        with its ``n_mc_samples`` reparameterised samples of the whole layer."""
        var = self.split(self.marginal_variance())
        total = -self.entropy()
        mc = []
        for i, (mean, prior) in enumerate(zip(means, priors)):
            moments = _gaussian_prior_moments(prior, mean)
            if moments is None:
                mc.append((i, prior))
                continue
            m0, prec = moments
            d = mean - m0
            total = total + 0.5 * ((prec * (var[i] + d * d)).sum() - torch.log(prec).sum()
                                   + mean.numel() * _LOG_2PI)
        if mc:
            n = max(p.n_mc_samples for _, p in mc)
            ce = 0.0
            for _ in range(n):
                theta = self.sample(means)
                ce = ce - sum(p.log_prob(theta[i]) for i, p in mc)
            total = total + ce / n
        return total

    # ------------------------------------------------------------------ state
    @torch.no_grad()
    def set_state(self, basis_out=None, basis_in=None, std=None):
        """Write new factors (out of the autograd graph); shapes are checked before writing."""
        new = {"basis_out": basis_out, "basis_in": basis_in, "std": std}
        for k, v in new.items():
            if v is not None and tuple(v.shape) != tuple(getattr(self, k).shape):
                raise ValueError(f"{k} must have shape {tuple(getattr(self, k).shape)}, got "
                                 f"{tuple(v.shape)}")
        if std is not None and not (std > 0).all():
            raise ValueError("std must be > 0 everywhere")
        for k, v in new.items():
            if v is not None:
                getattr(self, k).copy_(v)

    def spec(self):
        """What a fresh model needs to rebuild this posterior (saved in the extra state)."""
        return {"family": self.family, "names": list(self.names),
                "weight_shape": list(self.weight_shape), "has_bias": self.has_bias}

    @classmethod
    def from_spec(cls, spec, means):
        names = spec["names"]
        bias = names[1] if spec["has_bias"] else None
        return cls(names[0], spec["weight_shape"], bias, init_std=1.0, dtype=means[0].dtype,
                   device=means[0].device)

    @classmethod
    def from_mean_field(cls, weight_name, weight_posterior, bias_name=None, bias_posterior=None):
        """The same distribution as the given mean-field posteriors, in identity bases."""
        w_std = weight_posterior.stddev.detach()
        std = w_std.reshape(w_std.shape[0], -1)
        if bias_name is not None:
            std = torch.cat([std, bias_posterior.stddev.detach().reshape(-1, 1)], dim=1)
        return cls(weight_name, w_std.shape, bias_name, init_std=std, dtype=w_std.dtype,
                   device=w_std.device)

    def extra_repr(self):
        return f"{', '.join(self.names)}: out={self.n_out}, n_in={self.n_in}"


def kronecker_posteriors(var_model):
    """``{key: KroneckerPosterior}`` of a variational model."""
    return {k: p for k, p in var_model.named_posteriors() if isinstance(p, KroneckerPosterior)}


def use_kronecker_posteriors(var_model, layers=None):
    """Give every eligible Linear/Conv2d layer of ``var_model`` a :class:`KroneckerPosterior`.

    Eligible (see :func:`pyvarinf2.kfac.find_kfac_layers`): ``nn.Linear`` and ``nn.Conv2d``
    (``groups=1``) modules whose weight has a mean-field posterior and is used by no other
    module; the bias joins as a homogeneous coordinate when it has a posterior too. Every other
    parameter keeps its mean-field posterior. The conversion keeps the distribution (identity
    bases, the mean-field scales) and is idempotent: layers that already have a Kronecker
    posterior are left alone. ``layers`` restricts the conversion (layer-path patterns, module
    types or a predicate ``(path, module) -> bool``).

    Returns the list of :class:`pyvarinf2.kfac.KFACLayer` descriptions, with their posteriors.
    """
    from .kfac import find_kfac_layers  # kfac sits above this module
    found = find_kfac_layers(var_model, layers=layers)
    current = dict(var_model.named_posteriors())
    by_name = {n: (k, p) for k, p in current.items() for n in p.names}
    for layer in found:
        key, post = by_name[layer.weight_name]
        if isinstance(post, KroneckerPosterior):
            layer.posterior, layer.key = post, key
            continue
        bias_post = by_name[layer.bias_name][1] if layer.bias_name else None
        new = KroneckerPosterior.from_mean_field(layer.weight_name, post, layer.bias_name,
                                                 bias_post)
        var_model.replace_posterior(layer.key, new)
        layer.posterior = new
    return found
