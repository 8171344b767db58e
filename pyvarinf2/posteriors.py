"""Gaussian posterior families.

A posterior covers one or more parameters of the wrapped model (``names``). It does not own the
means: the means are the wrapped model's own parameters, so the posterior-mean network is the
user's model itself. A posterior owns its scale (``log_std`` for the mean-field family, Kronecker
factors for the matrix-variate family) and knows how to draw a sample given the current means.

Sampling is always out of place with fresh noise: ``theta = mean + std * eps`` builds a new
tensor, so a gradient taken through an earlier sample is never changed by a later draw.
"""
import math

import torch
import torch.nn as nn


__all__ = ["Posterior", "MeanFieldPosterior"]


class Posterior(nn.Module):
    """Base class for a Gaussian posterior over the parameters ``names`` of the wrapped model."""

    def __init__(self, names):
        super().__init__()
        self.names = tuple(names)

    def sample(self, means, noise=None):
        """Return a list of sampled tensors, one per name, given the list of current means."""
        raise NotImplementedError

    def draw_noise(self, means):
        return [torch.randn_like(m) for m in means]

    def kl(self, means, priors):
        """KL(q || prior) in nats for this posterior, the priors being one per name."""
        raise NotImplementedError


class MeanFieldPosterior(Posterior):
    """Fully factorised Gaussian ``N(mean, exp(log_std)²)`` over one parameter tensor.

    The scale is stored as ``log_std`` (σ = exp(log_std)) rather than PyVarInf's softplus(ρ):
    the log parametrisation is unconstrained, never over- or underflows in practice (σ between
    1e-38 and 1e38), makes log σ in the KL and the entropy exact and free, and costs one
    vectorised ``exp`` per sample — on the 2-core CPU this project is measured on, float32
    ``softplus`` (``log1p``/``expm1``) runs a scalar fallback 17x slower than ``exp``.
    """

    def __init__(self, name, like, init_std):
        super().__init__((name,))
        log_std = torch.full_like(like.detach(), math.log(float(init_std)))
        self.log_std = nn.Parameter(log_std, requires_grad=like.requires_grad)
        self._mean_source = None  # (module, attribute) set by VariationalModel, not registered

    # the mean lives in the wrapped model
    @property
    def mean(self):
        module, attr = self._mean_source
        return getattr(module, attr)

    @property
    def stddev(self):
        return torch.exp(self.log_std)

    @property
    def variance(self):
        return self.stddev ** 2

    @torch.no_grad()
    def set_stddev(self, std):
        """Set the scale (out of the autograd graph) from a positive tensor or number."""
        std = torch.as_tensor(std, dtype=self.log_std.dtype, device=self.log_std.device)
        if not bool(((std > 0) & torch.isfinite(std)).all()):
            raise ValueError(f"std must be finite and > 0 everywhere, got {std!r}"
                             if std.numel() == 1 else
                             "std must be finite and > 0 everywhere, got a tensor with "
                             f"{int((~((std > 0) & torch.isfinite(std))).sum())} bad entries")
        torch.log(std.expand_as(self.log_std), out=self.log_std)

    @torch.no_grad()
    def set_log_stddev(self, log_std):
        """Set ``log σ`` directly (no ``log`` pass)."""
        self.log_std.copy_(log_std)

    def sample(self, means, noise=None):
        (mean,) = means
        eps = torch.randn_like(mean) if noise is None else noise[0]
        return [torch.addcmul(mean, torch.exp(self.log_std), eps)]

    def kl(self, means, priors):
        (mean,), (prior,) = means, priors
        return prior.kl(mean, torch.exp(self.log_std))

    def entropy(self):
        return (self.log_std + 0.5 * (math.log(2 * math.pi) + 1.0)).sum()

    def extra_repr(self):
        return f"{self.names[0]}: shape={tuple(self.log_std.shape)}"
