"""Shared core of the diagonal (mean-field) natural-gradient optimizers: NoisyAdam, VOGN, IVON.

All three keep, per weight, a running curvature estimate ``c`` and set the posterior

    σ² = λ / (N (c + δ)),      δ = λ · prior_precision / N,

so that with λ = 1 the posterior precision is ``N·c + prior_precision`` — the data term plus the
prior, as in Bayes' rule. The mean step is a damped Newton step ``α (ḡ + δ(μ − m0)) / (c + δ)``.

Priors (see :mod:`pyvarinf2.priors`):

* :class:`~pyvarinf2.priors.GaussianPrior` enters exactly: its precision is the damping δ (the
  weight decay) and its gradient ``δ (μ − m0)`` is taken at the mean (the expectation under q of
  the gradient at a sample, without its noise).
* Any other prior enters through ``-∇ log p(θ)`` evaluated at the *sampled* weights θ (one
  Monte-Carlo sample per MC sample of the likelihood), an unbiased estimate of the gradient of
  ``E_q[-log p(θ)]`` with respect to μ; its curvature is replaced by the moment-matched precision
  ``1 / Var_p[θ]`` (:meth:`~pyvarinf2.priors.Prior.damping_precision`). That is an
  approximation: for a sparsity prior such as a scale mixture the true curvature varies with θ.

Everything element-wise runs out of place on whole lists of tensors (``torch._foreach_*``) and
is written back only after a finiteness check, so that a refused step changes nothing.
"""
import math
import warnings
import weakref

import torch

from ..curvature import PerExampleSquaredGradients
from ..posteriors import MeanFieldPosterior
from ..priors import GaussianPrior
from ._base import NonFiniteError, VariationalOptimizer, all_finite_fast, check_positive

__all__ = ["DiagonalVariationalOptimizer"]


def _uniform_value(t):
    """A Python float if every entry of ``t`` is the same, else ``t``."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return 1.0
    first = flat[0]
    if bool((flat == first).all()):
        return float(first)
    return t


class DiagonalVariationalOptimizer(VariationalOptimizer):
    """Base class of NoisyAdam, VOGN and IVON (see the module docstring)."""

    #: whether the optimizer needs Σ_i g_i² (installs :class:`PerExampleSquaredGradients`)
    needs_per_example = False
    #: whether the optimizer needs the noise ε of each sample (IVON)
    needs_noise = False

    def __init__(self, var_model, defaults, dataset_size, kl_weight=1.0, mc_samples=1,
                 fisher="empirical", likelihood="categorical", obs_noise=1.0):
        if self.needs_per_example:
            if fisher not in ("empirical", "true"):
                raise ValueError(f"fisher must be 'empirical' or 'true', got {fisher!r}")
            if likelihood not in ("categorical", "gaussian"):
                raise ValueError("likelihood must be 'categorical' or 'gaussian', got "
                                 f"{likelihood!r}")
            if not callable(obs_noise):
                check_positive("obs_noise", obs_noise)
            defaults = dict(defaults, fisher=fisher, likelihood=likelihood)
        super().__init__(var_model, defaults, dataset_size, kl_weight=kl_weight,
                         mc_samples=mc_samples)
        self.obs_noise = obs_noise
        #: the trust-region factor ν of the last step (1 = not clipped; see ``kl_clip``)
        self.kl_clip_factor = 1.0
        for group in self.param_groups:
            for p in group["params"]:
                post = self.posterior_of(p)
                if not isinstance(post, MeanFieldPosterior):
                    raise TypeError(
                        f"{type(self).__name__} needs a mean-field posterior, but parameter "
                        f"{self.name_of(p)!r} has a {type(post).__name__}; use NoisyKFAC / "
                        "NoisyEKFAC for structured posteriors")
        self._prior_cache = {}
        self._collector = None
        if self.needs_per_example:
            self._collector = PerExampleSquaredGradients(
                var_model, [self.name_of(p) for g in self.param_groups for p in g["params"]],
                average=True, fisher=fisher, likelihood=likelihood, obs_noise=obs_noise)
            self._collector.attach()
            # the first step checks that the per-example gradients add up to the gradient
            # (see _check_per_example_sums); the true Fisher's are at sampled labels
            self._collector.verify = fisher == "empirical"
            # the hooks live on the model: take them off when the optimizer goes away
            self._finalizer = weakref.finalize(self, self._collector.detach)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p].update(self._initial_state(p, group))
        self._write_initial_scales()

    # ------------------------------------------------------------------ subclass interface
    def _initial_state(self, p, group):
        """Step count, momentum and the curvature estimate under :meth:`_curvature_key`,
        starting at the group's ``hess_init`` (0 when absent)."""
        return {"step": 0, "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                self._curvature_key(): torch.full_like(p, group.get("hess_init", 0.0),
                                                       memory_format=torch.preserve_format)}

    @staticmethod
    def _bias_corrected(group):
        """Whether the curvature average is divided by 1 - β2^k: only when it starts at 0 (a
        ``hess_init`` > 0 is itself the first term of the average)."""
        return group.get("hess_init", 0.0) == 0.0 and group.get("fisher_bias_correction", True)

    def _curvature_key(self):
        """Name of the state entry holding the curvature estimate ``c``."""
        raise NotImplementedError

    def _curvature_denominator(self, group, state, step):
        """(tensor c', float scale) such that ``c + δ = (c' + scale·δ) / scale``: the stored
        curvature and 1 - β2^k when the average is bias-corrected (:meth:`_bias_corrected`;
        k = 0: c = 0, any scale > 0 works), else 1."""
        bc = 1.0 - group["betas"][1] ** step if step > 0 and self._bias_corrected(group) \
            else 1.0
        return state[self._curvature_key()], bc

    # ------------------------------------------------------------------ hooks / state
    def close(self):
        """Remove the per-example hooks from the model (done automatically when the optimizer
        is garbage-collected)."""
        if self._collector is not None:
            self._finalizer()

    def zero_grad(self, set_to_none=True):
        super().zero_grad(set_to_none=set_to_none)
        if self._collector is not None:
            self._collector.reset()

    def _state_moved(self):
        super()._state_moved()
        self._prior_cache.clear()      # per-entry prior precisions on the old device/dtype

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._state_epoch += 1
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                for k, v in list(st.items()):
                    if torch.is_tensor(v):
                        st[k] = v.to(device=p.device, dtype=p.dtype)
        # the model's scales follow the restored state (bit-identical to the saved model's)
        self._write_initial_scales()

    # ------------------------------------------------------------------ priors
    def _prior_terms(self, p):
        """(precision: float or tensor, gaussian mean: float or None) for parameter ``p``;
        the mean is None for non-Gaussian priors (they enter through their gradient)."""
        prior = self.var_model._priors.get(self._names[p]) or self.prior_of(p)
        cached = self._prior_cache.get(p)
        if cached is not None and cached[0] is prior:
            return cached[1], cached[2]
        prec = _uniform_value(self.prior_precision(p).to(device=p.device, dtype=p.dtype))
        gauss_mean = float(prior.mean) if type(prior) is GaussianPrior else None
        self._prior_cache[p] = (prior, prec, gauss_mean)
        return prec, gauss_mean

    def _priors_of(self, params):
        """[(precision, gaussian mean or None)] for ``params`` (see :meth:`_prior_terms`)."""
        return [self._prior_terms(p) for p in params]

    def _damping(self, p, group):
        """δ = λ · prior precision / N (float or tensor)."""
        prec, _ = self._prior_terms(p)
        return prec * (group["kl_weight"] / group["dataset_size"])

    # ------------------------------------------------------------------ scales
    @torch.no_grad()
    def _write_initial_scales(self):
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            denoms, shifts = [], []
            for p in params:
                st = self.state[p]
                c, scale = self._curvature_denominator(group, st, st.get("step", 0))
                delta = self._damping(p, group)
                denoms.append(torch.add(c, delta * scale) if not torch.is_tensor(delta)
                              else torch.add(c, delta, alpha=scale))
                shifts.append(0.5 * math.log(scale))
            log_stds = self._log_std(group, denoms, shifts)
            self._check(0, params, [], denoms)
            for p, ls in zip(params, log_stds):
                if not bool(torch.isfinite(ls).all()):
                    raise ValueError(
                        f"{type(self).__name__}: with kl_weight={group['kl_weight']!r} and "
                        f"dataset_size={group['dataset_size']!r} the initial posterior std of "
                        f"{self.name_of(p)} is not finite in {p.dtype} (the damping λ·π/N "
                        "underflows to 0); use a larger kl_weight, a positive hess_init, or "
                        "float64")
            for p, ls in zip(params, log_stds):
                _set_log_std(self.posterior_of(p), ls)

    def _log_std(self, group, denoms, shifts):
        """log σ = ½ log(λ/N) + shift − ½ log(denominator), as new tensors."""
        const = 0.5 * math.log(group["kl_weight"] / group["dataset_size"])
        out = torch._foreach_log(denoms)
        torch._foreach_mul_(out, -0.5)
        torch._foreach_add_(out, [const + s for s in shifts])
        return out

    def _check(self, step, params, means, denoms):
        """Raise NonFiniteError, naming the first culprit, if any new mean (``means``, aligned
        with ``params``, may be empty) or curvature denominator (``denoms``, aligned with
        ``params``) is non-finite; nothing has been written at that point."""
        tensors = list(means) + list(denoms)
        if all_finite_fast(tensors):
            return
        for i, t in enumerate(tensors):
            if not bool(torch.isfinite(t).all()):
                if i < len(means):
                    what = f"mean of {self.name_of(params[i])}"
                else:
                    what = (f"posterior std of {self.name_of(params[i - len(means)])} (through "
                            "its curvature estimate)")
                raise NonFiniteError(
                    f"{type(self).__name__} step {step}: the {what} would become non-finite "
                    "(NaN or inf); nothing was changed (model and optimizer state). The loss or "
                    "its gradient is probably non-finite or exploding: lower lr, raise the "
                    "damping (extrinsic damping, prior precision) or check the data.")

    # ------------------------------------------------------------------ statistics
    def _take_per_example(self):
        """The per-example squared-gradient sums of the last forward/backward, for every
        group at once (``{}`` when the optimizer needs none); the first step also checks
        that they add up to the gradients (:meth:`_check_per_example_sums`)."""
        if not self.needs_per_example:
            return {}
        if self._collector.verify:
            self._check_per_example_sums([p for g in self.param_groups for p in g["params"]
                                          if p.grad is not None])
        sums = self._collector.result()            # already (1/B) Σ_i g_i²
        self._collector.reset()
        return sums

    def _sample_stats(self, params, group, priors, sums):
        """What one forward/backward gives: {'grad', 'sq', 'hess', 'prior'} lists aligned
        with ``params`` (the ones with a gradient); ``sums``: :meth:`_take_per_example`."""
        out = {"grad": [p.grad for p in params]}
        if self.needs_per_example:
            sq = []
            for p in params:
                s = sums.get(self.name_of(p))
                if s is None and not bool(p.grad.any()):
                    # a zero gradient kept by zero_grad(set_to_none=False) for a parameter
                    # this forward did not use: no data, no curvature
                    s = torch.zeros_like(p)
                if s is None:
                    raise RuntimeError(
                        f"{type(self).__name__}: parameter {self.name_of(p)!r} has a gradient "
                        "but no per-example gradients were recorded: run the forward of the "
                        "variational model (training mode, gradients enabled) and backward "
                        "before step(), and use each parameter only inside the forward of the "
                        "module that owns it (see pyvarinf2.curvature)")
                sq.append(s)
            out["sq"] = sq
        non_gaussian = any(m0 is None for _, m0 in priors)
        noise = None
        if self.needs_noise or non_gaussian:
            noise = self._noise_list(params)
        if self.needs_noise:
            out["hess"] = self._noise_curvature(params, group, priors, out["grad"], noise)
        prior = [None] * len(params)
        if non_gaussian:
            for i, p in enumerate(params):
                if priors[i][1] is None:
                    theta = torch.addcmul(p, self.posterior_of(p).stddev, noise[i])
                    prior[i] = self.prior_grad(p, theta)
        out["prior"] = prior
        return out

    def _check_per_example_sums(self, params):
        """First step (empirical Fisher): the per-example gradients the hooks recorded should
        add up to each parameter's gradient; where they do not, their squares are not the
        curvature of that loss either. Warns once, naming the parameters (an edit of ``.grad``
        between backward and step, such as gradient clipping, also shows here and is then
        expected)."""
        # (verify stays on while gradient_mismatch flushes the groups still open: a module
        # with an output that got no gradient, such as an unused h_n or attention weights)
        bad = self._collector.gradient_mismatch({self.name_of(p): p.grad for p in params
                                                 if bool(p.grad.any())})
        self._collector.verify = False
        if bad:
            names = ", ".join(f"{n} (relative difference {r:.2g})" for n, r in bad[:5])
            warnings.warn(
                f"{type(self).__name__}: the per-example gradients recorded for {names} do not "
                "add up to their .grad, so their squares are not the curvature of that loss. "
                "Expected if .grad was edited between backward and step (gradient clipping: "
                "the curvature is then that of the unclipped loss). Otherwise: the parameter "
                "is used outside the forward of the module that owns it (e.g. F.linear(h, "
                "self.emb.weight) in a parent module), a module without a closed form draws "
                "random numbers (dropout) in its forward, or the loss has terms on the "
                "parameters themselves (the prior belongs to the optimizer, not the loss). "
                "Keep such parameters deterministic (variationalize(..., deterministic=...)) "
                "or use IVON, which needs no per-example gradients.", UserWarning, stacklevel=4)

    def _noise_curvature(self, params, group, priors, grads, noise):
        """Curvature estimate from the noise of the sample (IVON)."""
        raise NotImplementedError

    def _noise_list(self, params):
        record = self.var_model.last_noise
        out = []
        for p in params:
            key, post = self._posteriors[self._names[p]]
            if record is None or key not in record:
                return [self.noise_of(p) for p in params]   # raises the explanatory error
            out.append(record[key][0])
        return out

    def _collect(self, closure):
        """Per group: (params with a gradient, averaged statistics), and the loss."""
        if closure is None:
            result = []
            sums = self._take_per_example()
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                priors = self._priors_of(params)
                result.append((params, self._sample_stats(params, group, priors, sums)
                               if params else None, priors))
            return result, None
        m = self.defaults["mc_samples"]
        acc = [None] * len(self.param_groups)
        members = [None] * len(self.param_groups)
        total = 0.0
        for i in range(m):
            loss = self._call_closure(closure)
            total = total + (loss.detach() if torch.is_tensor(loss) else loss)
            sums = self._take_per_example()
            for gi, group in enumerate(self.param_groups):
                params = [p for p in group["params"] if p.grad is not None]
                if members[gi] is None:
                    members[gi] = params
                elif [id(p) for p in params] != [id(p) for p in members[gi]]:
                    raise RuntimeError("the closure gave gradients to different parameters in "
                                       "different Monte-Carlo samples")
                if not params:
                    continue
                st = self._sample_stats(params, group, self._priors_of(params), sums)
                if acc[gi] is None:
                    acc[gi] = {k: ([t.clone() if t is not None else None for t in v])
                               for k, v in st.items()}
                else:
                    for k, v in st.items():
                        for j, t in enumerate(v):
                            if t is not None:
                                acc[gi][k][j].add_(t)
        result = []
        for gi in range(len(self.param_groups)):
            if acc[gi] is not None and m > 1:
                for k, v in acc[gi].items():
                    for t in v:
                        if t is not None:
                            t.div_(m)
            params = members[gi] or []
            result.append((params, acc[gi], self._priors_of(params)))
        return result, total / m

    @staticmethod
    def _prior_gradient_terms(group, priors, stats):
        """The prior's part of the mean gradient, per param: ('gauss', δ, m0) for
        δ (μ - m0), δ = λ π / N a float or tensor; ('grad', (-∇log p(θ)), λ/N) otherwise."""
        scale = group["kl_weight"] / group["dataset_size"]
        terms = []
        for (prec, m0), pg in zip(priors, stats["prior"]):
            if m0 is None:
                terms.append(("grad", pg, scale))
            else:
                terms.append(("gauss", prec * scale, m0))
        return terms

    def _gauss_newton_step(self, closure):
        """The step shared by NoisyAdam and VOGN (one algorithm; NoisyAdam adds an extrinsic
        damping of the mean step)::

            m ← β1 m + (1 - β1)(ĝ + prior gradient);   c ← β2 c + (1 - β2) mean_i g_i²
            μ ← μ - ν α (m / (1 - β1^k)) / (ĉ + δ + γ_ex);   σ² = λ / (N (ĉ + δ))

        with ĉ = c / (1 - β2^k) when bias-corrected, ν the ``kl_clip`` factor. Returns the
        closure's mean loss, if any."""
        self.check_forwards(closure)
        key = self._curvature_key()
        collected, loss = self._collect(closure)
        pending = []
        for group, (params, stats, priors) in zip(self.param_groups, collected):
            if not params:
                continue
            beta1, beta2 = group["betas"]
            gamma_ex = group.get("extrinsic_damping", 0.0)
            states = [self.state[p] for p in params]
            steps = [s["step"] + 1 for s in states]
            terms = self._prior_gradient_terms(group, priors, stats)
            v = self._add_prior(stats["grad"], params, terms)
            exp_avg = torch._foreach_lerp([s["exp_avg"] for s in states], v, 1.0 - beta1)
            curv = torch._foreach_lerp([s[key] for s in states], stats["sq"], 1.0 - beta2)
            # with bias correction ĉ = c / bc2: ĉ + δ = (c + bc2 δ) / bc2, so the denominators
            # are kept multiplied by bc2 (bc2 = 1 without correction)
            bc2 = [1.0 - beta2 ** k for k in steps] if self._bias_corrected(group) \
                else [1.0] * len(steps)
            denom_post = add_damping(curv, self._dampings(group, priors), bc2)
            denom_mean = denom_post if gamma_ex <= 0 else \
                [torch.add(d, gamma_ex * b) for d, b in zip(denom_post, bc2)]
            new_means = self._newton_means(group, params, exp_avg, denom_mean, bc2, steps)
            self._check(max(steps), params, new_means, denom_post)
            new_states = [{"step": k, "exp_avg": m, key: c}
                          for k, m, c in zip(steps, exp_avg, curv)]
            pending.append((group, params, new_means, denom_post,
                            [0.5 * math.log(b) for b in bc2], new_states))
        # every group was checked before any is written: a refused step changes nothing
        for args in pending:
            self._commit(*args)
        return loss

    def _newton_means(self, group, params, exp_avg, denoms, bc2, steps):
        """New means ``μ - ν α m̂ / (f̂ + γ)`` with the momentum ``exp_avg``, the denominators
        kept multiplied by ``bc2`` (``f + bc2 γ``) and ν the ``kl_clip`` trust-region factor
        (stored in :attr:`kl_clip_factor`)."""
        beta1, lr = group["betas"][0], group["lr"]
        nu = kl_clip_factor(lr, exp_avg, denoms,
                            [b / (1.0 - beta1 ** k) ** 2 for b, k in zip(bc2, steps)],
                            group.get("kl_clip"))
        self.kl_clip_factor = nu
        return torch._foreach_addcdiv(
            params, exp_avg, denoms, [-nu * lr * b / (1.0 - beta1 ** k) for b, k in zip(bc2, steps)])

    @staticmethod
    def _dampings(group, priors):
        """δ = λ π / N per param (float or tensor)."""
        scale = group["kl_weight"] / group["dataset_size"]
        return [prec * scale for prec, _ in priors]

    @staticmethod
    def _add_prior(grads, params, terms, coeff=1.0):
        """New list: coeff·(grad + prior gradient) per param (out of place)."""
        out = []
        for g, p, (kind, a, b) in zip(grads, params, terms):
            if kind == "grad":
                t = torch.add(g, a, alpha=b)
            elif torch.is_tensor(a):
                t = torch.addcmul(g, a, p - b if b != 0.0 else p)
            elif b != 0.0:
                t = torch.add(g, p - b, alpha=a)
            else:
                t = torch.add(g, p, alpha=a)
            if coeff != 1.0:
                t.mul_(coeff)
            out.append(t)
        return out

    @torch.no_grad()
    def _commit(self, group, params, new_means, denoms, shifts, new_states):
        """Write the checked means, the scales ``log σ`` computed from the checked curvature
        denominators (straight into the posterior's ``log_std`` when it has one) and the
        optimizer state."""
        torch._foreach_copy_(params, new_means)
        posts = [self.posterior_of(p) for p in params]
        if all(isinstance(getattr(post, "log_std", None), torch.Tensor) for post in posts):
            # log σ = ½ log(λ/N) + shift − ½ log(denominator), straight into the posterior
            targets = [post.log_std for post in posts]
            for t, d in zip(targets, denoms):
                torch.log(d, out=t)
            const = 0.5 * math.log(group["kl_weight"] / group["dataset_size"])
            torch._foreach_mul_(targets, -0.5)
            torch._foreach_add_(targets, [const + s for s in shifts])
        else:
            for post, ls in zip(posts, self._log_std(group, denoms, shifts)):
                _set_log_std(post, ls)
        for p, st in zip(params, new_states):
            self.state[p].update(st)
        self._state_epoch += 1


def kl_clip_factor(lr, exp_avg, denoms, coeffs, kl_clip):
    """ν = min(1, sqrt(kl_clip / (lr² Σ m̂ᵀ F̂⁻¹ m̂))): the trust region of K-FAC (Ba et al. 2017)
    on a diagonal natural-gradient step ``lr · m̂ / (f̂ + γ)``; ``coeffs[i]`` turns
    ``exp_avg[i]² / denoms[i]`` into ``m̂² / (f̂ + γ)`` (bias corrections). ``kl_clip=None``: 1."""
    if kl_clip is None or not exp_avg:
        return 1.0
    quad = torch._foreach_div(exp_avg, denoms)
    torch._foreach_mul_(quad, exp_avg)
    total = sum(float(q.sum()) * c for q, c in zip(quad, coeffs)) * lr * lr
    if not math.isfinite(total) or total <= kl_clip:
        return 1.0     # a non-finite step is refused by the finiteness check that follows
    return math.sqrt(kl_clip / total)


def add_damping(tensors, deltas, scales=None):
    """New list ``t + scale·δ`` (δ floats or tensors); one multi-tensor call when every δ is
    a float."""
    if scales is None:
        scales = [1.0] * len(tensors)
    if all(not torch.is_tensor(d) for d in deltas):
        return list(torch._foreach_add(tensors, [d * c for d, c in zip(deltas, scales)]))
    return [torch.add(t, d, alpha=c) if torch.is_tensor(d) else torch.add(t, d * c)
            for t, d, c in zip(tensors, deltas, scales)]


def _set_log_std(post, log_std):
    setter = getattr(post, "set_log_stddev", None)
    if setter is not None:
        setter(log_std)
    else:
        post.set_stddev(torch.exp(log_std))
