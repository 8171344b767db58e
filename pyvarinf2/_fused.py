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
    def forward(ctx, n, sigma_out, *tensors):
        ctx.sigma_out = sigma_out
        means, log_stds, eps = list(tensors[:n]), list(tensors[n:2 * n]), list(tensors[2 * n:])
        sig = torch._foreach_exp(log_stds)
        if ctx.sigma_out is not None:
            ctx.sigma_out.extend(sig)
        out = torch._foreach_addcmul(means, sig, eps)
        ctx.n = n
        ctx.sigma_out = None
        ctx.needs_scale = any(ctx.needs_input_grad[2 + n:2 + 2 * n])
        if ctx.needs_scale:
            ctx.save_for_backward(*sig, *eps)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        n = ctx.n
        grad_means = [g if ctx.needs_input_grad[2 + i] else None for i, g in enumerate(grads)]
        grad_scales = [None] * n
        if ctx.needs_scale:
            saved = ctx.saved_tensors
            idx = [i for i in range(n)
                   if grads[i] is not None and ctx.needs_input_grad[2 + n + i]]
            if idx:
                d = torch._foreach_mul([grads[i] for i in idx], [saved[n + i] for i in idx])
                torch._foreach_mul_(d, [saved[i] for i in idx])
                for j, i in enumerate(idx):
                    grad_scales[i] = d[j]
        return (None, None, *grad_means, *grad_scales, *([None] * n))


def mean_field_sample(means, log_stds, eps, sigma_out=None):
    """List of samples ``μ + exp(log_std) ε`` with a fused, analytic backward; if
    ``sigma_out`` is a list, the σ = exp(log_std) tensors are appended to it (for the KL)."""
    n = len(means)
    if n == 0:
        return []
    return list(MeanFieldSample.apply(n, sigma_out, *means, *log_stds, *eps))


class GaussianKL(torch.autograd.Function):
    """Σ_i KL(N(μ_i, exp(log_std_i)²) || N(m_i, s_i²)), summed over all entries of all tensors.

    ``prior_std`` and ``prior_mean`` are per-tensor floats."""

    @staticmethod
    def forward(ctx, n, prior_std, prior_mean, sig, *tensors):
        means, log_stds = list(tensors[:n]), list(tensors[n:])
        if sig is None:
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
        # on the CPU the incoming gradient is read as a number (no device sync to fear), which
        # folds it into the constants: one pass per tensor instead of two
        gv = float(g) if g.device.type == "cpu" and g.dim() == 0 else None
        if any(ctx.needs_input_grad[4:4 + n]):
            if gv is not None:
                grad_means = torch._foreach_mul(diffs, [v * gv for v in inv_var])
            else:
                grad_means = torch._foreach_mul(diffs, inv_var)
                torch._foreach_mul_(grad_means, g)
        if any(ctx.needs_input_grad[4 + n:]):
            # g (σ²/s² − 1): one addcmul against a broadcast constant
            if gv is not None:
                minus_g = g.new_full((), -gv)
                grad_scales = [torch.addcmul(minus_g, s, s, value=v * gv)
                               for s, v in zip(sig, inv_var)]
            else:
                minus_one = g.new_full((), -1.0)
                grad_scales = [torch.addcmul(minus_one, s, s, value=v)
                               for s, v in zip(sig, inv_var)]
                torch._foreach_mul_(grad_scales, g)
        return (None, None, None, None, *grad_means, *grad_scales)


def gaussian_kl(means, log_stds, prior_std, prior_mean, sigmas=None):
    """Closed-form KL summed over tensors; ``sigmas`` = exp(log_stds) when already computed."""
    if not means:
        return None
    return GaussianKL.apply(len(means), list(prior_std), list(prior_mean), sigmas, *means,
                            *log_stds)
