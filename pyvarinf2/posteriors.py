"""Gaussian posterior families.

A posterior covers one or more parameters of the wrapped model (``names``). It does not own the
means: the means are the wrapped model's own parameters, so the posterior-mean network is the
user's model itself. A posterior owns its scale (``rho`` for the mean-field family, Kronecker
factors for the matrix-variate family) and knows how to draw a sample given the current means.

Sampling is always out of place with fresh noise: ``theta = mean + std * eps`` builds a new
tensor, so a gradient taken through an earlier sample is never changed by a later draw.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .priors import GaussianPrior

__all__ = ["Posterior", "MeanFieldPosterior", "softplus_inverse"]


def softplus_inverse(x):
    """Inverse of ``softplus``, stable for small and large ``x`` (``x > 0``)."""
    x = torch.as_tensor(x)
    return torch.where(x > 20.0, x, x + torch.log(-torch.expm1(-x)))


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
    """Fully factorised Gaussian ``N(mean, softplus(rho)²)`` over one parameter tensor."""

    def __init__(self, name, like, init_std):
        super().__init__((name,))
        rho = softplus_inverse(torch.full_like(like.detach(), float(init_std)))
        self.rho = nn.Parameter(rho, requires_grad=like.requires_grad)
        self._mean_source = None  # (module, attribute) set by VariationalModel, not registered

    # the mean lives in the wrapped model
    @property
    def mean(self):
        module, attr = self._mean_source
        return getattr(module, attr)

    @property
    def stddev(self):
        return F.softplus(self.rho)

    @property
    def variance(self):
        return self.stddev ** 2

    @torch.no_grad()
    def set_stddev(self, std):
        """Set the scale (out of the autograd graph) from a positive tensor or number."""
        std = torch.as_tensor(std, dtype=self.rho.dtype, device=self.rho.device)
        self.rho.copy_(softplus_inverse(std.expand_as(self.rho)))

    def sample(self, means, noise=None):
        (mean,) = means
        eps = torch.randn_like(mean) if noise is None else noise[0]
        return [torch.addcmul(mean, F.softplus(self.rho), eps)]

    def kl(self, means, priors):
        (mean,), (prior,) = means, priors
        return prior.kl(mean, F.softplus(self.rho))

    def entropy(self):
        return (torch.log(self.stddev) + 0.5 * (math.log(2 * math.pi) + 1.0)).sum()

    def extra_repr(self):
        return f"{self.names[0]}: shape={tuple(self.rho.shape)}"
