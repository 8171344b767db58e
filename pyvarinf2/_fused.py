"""Fused kernels for the mean-field hot path (sampling and the Gaussian KL).

Both are ``torch.autograd.Function`` s over *lists* of tensors, written with ``torch._foreach_*``
ops and analytic backward passes, so that a Bayes-by-backprop step costs a handful of
element-wise passes over the weights instead of the dozens that autograd records for the
textbook expressions. The scale is σ = exp(log_std) (see
:class:`~pyvarinf2.posteriors.MeanFieldPosterior`), so dσ/d log_std = σ and log σ is free.

Sample:   θ = μ + σ ⊙ ε;            ∂/∂μ = g,   ∂/∂log_std = g ⊙ ε ⊙ σ.
KL:       Σ [log s − log σ + (σ² + (μ − m)²) / (2 s²) − ½]  (prior N(m, s²) per tensor);
          ∂/∂μ = (μ − m) / s²,   ∂/∂log_std = σ² / s² − 1.
"""
import math

import torch


class MeanFieldSample(torch.autograd.Function):
    """``θ_i = μ_i + exp(log_std_i) ⊙ ε_i`` for every tensor i at once (out of place)."""

    @staticmethod
    def forward(ctx, n, *tensors):
        means, log_stds, eps = list(tensors[:n]), list(tensors[n:2 * n]), list(tensors[2 * n:])
        sig = torch._foreach_exp(log_stds)
        out = torch._foreach_addcmul(means, sig, eps)
        ctx.n = n
        ctx.needs_scale = any(ctx.needs_input_grad[1 + n:1 + 2 * n])
        if ctx.needs_scale:
            ctx.save_for_backward(*sig, *eps)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        n = ctx.n
        grad_means = [g if ctx.needs_input_grad[1 + i] else None for i, g in enumerate(grads)]
        grad_scales = [None] * n
        if ctx.needs_scale:
            saved = ctx.saved_tensors
            idx = [i for i in range(n)
                   if grads[i] is not None and ctx.needs_input_grad[1 + n + i]]
            if idx:
                d = torch._foreach_mul([grads[i] for i in idx], [saved[n + i] for i in idx])
                torch._foreach_mul_(d, [saved[i] for i in idx])
                for j, i in enumerate(idx):
                    grad_scales[i] = d[j]
        return (None, *grad_means, *grad_scales, *([None] * n))


def mean_field_sample(means, log_stds, eps):
    """List of samples ``μ + exp(log_std) ε`` with a fused, analytic backward."""
    n = len(means)
    if n == 0:
        return []
    return list(MeanFieldSample.apply(n, *means, *log_stds, *eps))


class GaussianKL(torch.autograd.Function):
    """Σ_i KL(N(μ_i, exp(log_std_i)²) || N(m_i, s_i²)), summed over all entries of all tensors.

    ``prior_std`` and ``prior_mean`` are per-tensor floats."""

    @staticmethod
    def forward(ctx, n, prior_std, prior_mean, *tensors):
        means, log_stds = list(tensors[:n]), list(tensors[n:])
        sig = torch._foreach_exp(log_stds)
        diffs = [m if pm == 0.0 else m - pm for m, pm in zip(means, prior_mean)]
        acc = means[0].new_zeros(())
        const = 0.0
        for i in range(n):
            s, d = sig[i].reshape(-1), diffs[i].reshape(-1)
            quad = (torch.dot(s, s) + torch.dot(d, d)) / (2.0 * prior_std[i] * prior_std[i])
            acc = acc + quad - log_stds[i].sum()
            const += s.numel() * (math.log(prior_std[i]) - 0.5)
        ctx.n, ctx.prior_std = n, prior_std
        ctx.save_for_backward(*diffs, *sig)
        return acc + const

    @staticmethod
    def backward(ctx, g):
        n, prior_std = ctx.n, ctx.prior_std
        saved = ctx.saved_tensors
        diffs, sig = list(saved[:n]), list(saved[n:])
        inv_var = [1.0 / (s * s) for s in prior_std]
        grad_means = grad_scales = [None] * n
        if any(ctx.needs_input_grad[3:3 + n]):
            grad_means = torch._foreach_mul(diffs, inv_var)
            torch._foreach_mul_(grad_means, g)
        if any(ctx.needs_input_grad[3 + n:]):
            # g (σ²/s² − 1): one addcmul against a broadcast −1, then one multiply by g
            minus_one = g.new_full((), -1.0)
            grad_scales = [torch.addcmul(minus_one, s, s, value=v) for s, v in zip(sig, inv_var)]
            torch._foreach_mul_(grad_scales, g)
        return (None, None, None, *grad_means, *grad_scales)


def gaussian_kl(means, log_stds, prior_std, prior_mean):
    if not means:
        return None
    return GaussianKL.apply(len(means), list(prior_std), list(prior_mean), *means, *log_stds)
