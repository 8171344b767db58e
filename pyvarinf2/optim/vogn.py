"""VOGN, the variational online Gauss-Newton method (Khan et al. 2018; Osawa et al. 2019)."""
import torch

from ._base import check_betas, check_nonnegative, check_positive
from ._diagonal import DiagonalVariationalOptimizer

__all__ = ["VOGN"]


class VOGN(DiagonalVariationalOptimizer):
    r"""Variational Online Gauss-Newton with a mean-field Gaussian posterior.

    With N = ``dataset_size``, λ = ``kl_weight``, π the prior precision of each weight and
    ``δ̃ = λ π / N``, each step, at weight samples θ_j = μ + σ ε_j (j = 1..M, M = ``mc_samples``
    with ``step(closure)``, else the one sample of the last forward)::

        ĝ = mean_j ∇_θ NLL(θ_j) + δ̃ (μ - m0)
        ĥ = mean_j (1/B) Σ_i g_i(θ_j)²                # Gauss-Newton: per-example squared gradients
        m ← β1 m + (1 - β1) ĝ                          # momentum (Osawa et al.); β1 = 0: none
        s ← β2 s + (1 - β2) ĥ,   ŝ = s / (1 - β2^k)    # bias-corrected running average
        μ ← μ - α (m / (1 - β1^k)) / (ŝ + δ̃)
        σ² = λ / (N (ŝ + δ̃))                           # written to the model

    At a fixed point the posterior precision is ``N ŝ / λ + π``: the Gauss-Newton estimate of
    the data term plus the prior, the natural-gradient VI fixed point of Khan et al. 2018 with the
    Gauss-Newton approximation. Per-example squared gradients come in closed form from the same
    backward pass for Linear/Conv/normalisation/Embedding layers and from ``torch.func`` for any
    other parameter (:mod:`pyvarinf2.curvature`). The bias correction makes ŝ a proper average
    from the first step (s = 0 at start, so the posterior starts at the prior). Priors enter as
    described in :mod:`pyvarinf2.optim._diagonal`.

    Args:
        var_model: the :class:`~pyvarinf2.VariationalModel` to train (mean-field posteriors).
        lr: α (default 1e-2; a fraction of a Newton step).
        betas: (β1, β2) for the momentum and the Gauss-Newton average (default (0.9, 0.999)).
        dataset_size: N (required).
        kl_weight: λ (1 = the ELBO).
        hess_init: initial value of s (default 0: start at the prior, bias-corrected average);
            > 0 starts the posterior at σ² = λ / (N (hess_init + δ̃)) and turns the bias
            correction off (the initial value is the average's first term).
        fisher: ``'empirical'`` (default: per-example gradients of the user's loss) or
            ``'true'`` (labels drawn from the model's predictive: an unbiased one-sample
            estimate of the Gauss-Newton diagonal; see :mod:`pyvarinf2.curvature`).
        likelihood, obs_noise: the likelihood of ``fisher='true'``, as in
            :class:`~pyvarinf2.optim.NoisyAdam`.
        kl_clip: trust region of the mean step (default None: off), as in
            :class:`~pyvarinf2.optim.NoisyAdam`.
        mc_samples: M, weight samples per ``step(closure)`` (default 1; the reference code used
            up to 50 — the cost grows linearly).
    """

    needs_per_example = True

    def __init__(self, var_model, lr=1e-2, betas=(0.9, 0.999), *, dataset_size, kl_weight=1.0,
                 hess_init=0.0, kl_clip=None, mc_samples=1,
                 fisher="empirical", likelihood="categorical", obs_noise=1.0):
        check_positive("lr", lr)
        betas = check_betas(betas)
        check_nonnegative("hess_init", hess_init)
        if kl_clip is not None:
            check_positive("kl_clip", kl_clip)
        defaults = dict(lr=lr, betas=betas, hess_init=float(hess_init),
                        kl_clip=None if kl_clip is None else float(kl_clip))
        super().__init__(var_model, defaults, dataset_size, kl_weight=kl_weight,
                         mc_samples=mc_samples, fisher=fisher, likelihood=likelihood,
                         obs_noise=obs_noise)

    def _curvature_key(self):
        return "ggn"

    @torch.no_grad()
    def step(self, closure=None):
        """One update from the last backward (or from ``closure``, called ``mc_samples``
        times). Returns the closure's mean loss, if any."""
        return self._gauss_newton_step(closure)
