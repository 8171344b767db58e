"""Noisy Adam (Zhang, Sun, Duvenaud & Grosse, ICML 2018): natural-gradient VI with a fully
factorised Gaussian posterior, written as an Adam-like update."""
import torch

from ._base import check_betas, check_nonnegative, check_positive
from ._diagonal import DiagonalVariationalOptimizer

__all__ = ["NoisyAdam"]


class NoisyAdam(DiagonalVariationalOptimizer):
    r"""Noisy Adam: a mean-field Gaussian posterior trained by noisy natural gradient.

    With N = ``dataset_size``, λ = ``kl_weight``, π the prior precision of each weight and the
    intrinsic damping ``γ_in = λ π / N``, each step, at the weights θ = μ + σ ε the model drew in
    its forward pass, does (Zhang et al. 2018, Algorithm 1)::

        v = ∇_θ NLL(θ) + γ_in (μ - m0)                 # mean NLL of the minibatch + the prior
        m ← β1 m + (1 - β1) v
        f ← β2 f + (1 - β2) · (1/B) Σ_i g_i(θ)²       # per-example (empirical) Fisher diagonal
        f̂ = f / (1 - β2^k)                             # bias correction (see below)
        μ ← μ - α · (m / (1 - β1^k)) / (f̂ + γ_in + γ_ex)
        σ² = λ / (N (f̂ + γ_in))                        # written to the model

    so the posterior precision is ``N f̂ / λ + π`` (data + prior). The Fisher uses the squared
    *per-example* gradients g_i (given labels: the empirical Fisher), computed in closed form
    from the same backward pass (:mod:`pyvarinf2.curvature`) — not the squared minibatch
    gradient, which underestimates the Fisher up to B-fold and inflates the posterior variance.

    ``f`` starts at 0, so the posterior starts at the prior (σ² = 1/π). The paper's update uses
    ``f`` itself, which after k steps is only ``(1 - β2^k)`` of the Fisher: the posterior stays
    near the prior for ~1/(1 - β2) steps and the first mean steps, damped by γ_in alone, are
    large (for a bias with a N(0, 1) prior and N = 10⁴, γ_in = 10⁻⁴). With
    ``fisher_bias_correction=True`` (default) f̂ is Adam's bias-corrected average instead; on
    the 784-200-10 MNIST MLP (3 epochs of 10k images, batch 100, seed 0, λ = 1, the other
    defaults, test accuracy of the posterior mean) that is 92.0% against 26.8% with a N(0, 1)
    prior, and 87.5% against 86.2% with the default fan-in prior. ``False`` gives the paper's
    update. The Gaussian prior's
    gradient is taken at the mean μ (the expectation of the paper's γ_in θ over the sample);
    other priors enter as described in :mod:`pyvarinf2.optim._diagonal`.

    Args:
        var_model: the :class:`~pyvarinf2.VariationalModel` to train (mean-field posteriors).
        lr: α (default 1e-2; a fraction of a Newton step, not an Adam step size).
        betas: (β1, β2) for the gradient momentum and the Fisher average (0.9, 0.999).
        dataset_size: N, the number of training examples (required).
        kl_weight: λ (1 = the ELBO; < 1 tempers the posterior, e.g. 0.1 with data
            augmentation or small data sets).
        extrinsic_damping: γ_ex added to the denominator of the mean step only (default 0).
        fisher_bias_correction: divide f by 1 - β2^k (default True; False: the paper's update).
        hess_init: initial value of f (default 0: start at the prior, with the bias
            correction above). A value > 0 starts the posterior at σ² = λ / (N (hess_init +
            γ_in)) and is itself the first term of the running average, so no bias correction
            is applied (IVON's convention).
        fisher: ``'empirical'`` (default: the squared per-example gradients of the user's loss,
            given labels) or ``'true'`` (labels drawn from the model's own predictive in one
            extra pass inside the forward: an unbiased estimate of the Gauss-Newton diagonal,
            which the empirical Fisher underestimates on examples the model already fits; see
            :mod:`pyvarinf2.curvature`). ``'true'`` costs the input-gradient half of a backward.
            Where labels disagree with the predictive (noisy labels) the true Fisher can be far
            below the squared gradients and the mean step large: add ``extrinsic_damping``
            (e.g. 1e-3) there.
        likelihood: for ``fisher='true'``: ``'categorical'`` (outputs are logits over dim 1) or
            ``'gaussian'`` (outputs are the regression mean).
        obs_noise: for ``likelihood='gaussian'``: the observation-noise std (a number or a
            callable returning a tensor, e.g. a learned noise).
        kl_clip: trust region of the mean step, as in noisy K-FAC (Ba et al. 2017): the step is
            scaled by ν = min(1, sqrt(kl_clip / (lr² Σ m̂² / (f̂ + γ)))) (default None: off).
            A Newton-type step is unbounded where the curvature vanishes (a saturated softmax
            is linear in its logits); this bounds it. :attr:`kl_clip_factor` holds the last ν.
        mc_samples: weight samples per ``step(closure)`` (default 1).

    One MC sample per step in the usual loop (``zero_grad``, forward, ``backward``, ``step``);
    ``step(closure)`` averages the gradients and Fisher estimates of ``mc_samples`` samples
    (the closure must zero the gradients, run the forward and backward, and return the loss).
    """

    needs_per_example = True

    def __init__(self, var_model, lr=1e-2, betas=(0.9, 0.999), *, dataset_size, kl_weight=1.0,
                 extrinsic_damping=0.0, fisher_bias_correction=True, hess_init=0.0, kl_clip=None,
                 mc_samples=1,
                 fisher="empirical", likelihood="categorical", obs_noise=1.0):
        check_positive("lr", lr)
        betas = check_betas(betas)
        check_nonnegative("extrinsic_damping", extrinsic_damping)
        check_nonnegative("hess_init", hess_init)
        if kl_clip is not None:
            check_positive("kl_clip", kl_clip)
        if not isinstance(fisher_bias_correction, bool):
            raise ValueError("fisher_bias_correction must be True or False, got "
                             f"{fisher_bias_correction!r}")
        defaults = dict(lr=lr, betas=betas,
                        extrinsic_damping=float(extrinsic_damping),
                        fisher_bias_correction=fisher_bias_correction,
                        hess_init=float(hess_init),
                        kl_clip=None if kl_clip is None else float(kl_clip))
        super().__init__(var_model, defaults, dataset_size, kl_weight=kl_weight,
                         mc_samples=mc_samples, fisher=fisher, likelihood=likelihood,
                         obs_noise=obs_noise)

    def _curvature_key(self):
        return "fisher"

    @torch.no_grad()
    def step(self, closure=None):
        """One update from the last backward (or from ``closure``, called ``mc_samples``
        times). Returns the closure's mean loss, if any."""
        return self._gauss_newton_step(closure)
