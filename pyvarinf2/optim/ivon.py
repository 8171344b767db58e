"""IVON, the improved variational online Newton method (Shen et al. 2024, "Variational Learning
is Effective for Large Deep Networks"). Written from the paper's equations."""
import math

import torch

from ._base import check_betas, check_nonnegative, check_positive
from ._diagonal import DiagonalVariationalOptimizer, add_damping

__all__ = ["IVON"]


class IVON(DiagonalVariationalOptimizer):
    r"""IVON: a mean-field Gaussian posterior trained with a reparameterisation-trick Hessian.

    No per-example gradients: the diagonal Hessian is estimated from the minibatch gradient at
    the sampled weights θ = m + σ ε (Stein's lemma), ``ĥ = ĝ ⊙ ε / σ``. With N =
    ``dataset_size``, λ = ``kl_weight``, the effective sample size ``ess = N / λ`` and the weight
    decay ``δ = λ π / N`` (π the precision of the model's prior on that weight), each step does
    (Shen et al. 2024, Algorithm 1)::

        ĝ = mean_j ∇_θ NLL(θ_j),   ĥ = mean_j ĝ_j ε_j / σ        (j over MC samples)
        g ← β1 g + (1 - β1) ĝ
        h ← β2 h + (1 - β2) ĥ + ½ (1 - β2)² (h - ĥ)² / (h + δ)   # stays > -δ: h + δ > 0
        m ← m - α (g / (1 - β1^t) + δ (m - m0)) / (h + δ)       # optionally clipped, see below
        σ = 1 / sqrt(ess (h + δ))                                  # written to the model

    Posterior precision ``ess (h + δ) = N h / λ + π``: the data term plus the prior.

    Weight decay and the prior: IVON's ``weight_decay`` δ *is* the prior here, δ = λ π / N, so
    the model's prior (not a separate optimizer setting) decides it; a Gaussian prior with
    standard deviation ``s`` gives δ = λ / (N s²). To reproduce a run of the paper with weight
    decay δ on every weight, set the prior to ``N(0, λ / (N δ))``::

        var_model.set_prior("gaussian", std=IVON.prior_std_for_weight_decay(1e-4, N))

    With the default prior of :func:`pyvarinf2.variationalize` (std 1/sqrt(fan_in)) δ is larger
    than the paper's 1e-4 (e.g. 784/N for a first MNIST layer). Other priors enter through
    their gradient at the sampled weights and a moment-matched δ (:mod:`._diagonal`).

    Args:
        var_model: the :class:`~pyvarinf2.VariationalModel` to train (mean-field posteriors).
        lr: α (default 0.2; IVON's step is SGD-like, α / (h + δ) per weight, not Adam-like:
            the paper used 0.1-0.5 with hess_init 1).
        betas: (β1, β2), default (0.9, 0.99999) as in the paper.
        hess_init: initial h (default 1.0, the paper's), so σ starts at 1/sqrt(ess (1 + δ)).
        dataset_size: N (required); ``ess = N / kl_weight``.
        kl_weight: λ (1 = the ELBO).
        clip_radius: clip each entry of the preconditioned step ``(ḡ + δ m)/(h + δ)`` to
            ``[-clip_radius, clip_radius]`` (the paper's element-wise clipping; default inf:
            off).
        mc_samples: weight samples per ``step(closure)`` (default 1).
    """

    needs_noise = True

    def __init__(self, var_model, lr=0.2, betas=(0.9, 0.99999), *, dataset_size, kl_weight=1.0,
                 hess_init=1.0, clip_radius=math.inf, mc_samples=1):
        check_positive("lr", lr)
        betas = check_betas(betas)
        check_nonnegative("hess_init", hess_init)
        if not (isinstance(clip_radius, (int, float)) and not isinstance(clip_radius, bool)
                and clip_radius > 0 and clip_radius == clip_radius):
            raise ValueError(f"clip_radius must be a number > 0 (math.inf: no clipping), got "
                             f"{clip_radius!r}")
        defaults = dict(lr=lr, betas=betas,
                        hess_init=float(hess_init), clip_radius=float(clip_radius))
        #: run the update on flat buffers where it applies (see ``_flat_plan``); False
        #: forces the per-tensor path
        self.flat_path = True
        #: ... and only for groups whose tensors average at most this many entries
        self.flat_max_mean_size = 16384
        self._flat = {}
        super().__init__(var_model, defaults, dataset_size, kl_weight=kl_weight,
                         mc_samples=mc_samples)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._flat.clear()      # plans are keyed by param group, and the groups are new

    def _state_moved(self):
        super()._state_moved()
        self._flat.clear()      # the flat buffers hold the old dtype/device

    @staticmethod
    def prior_std_for_weight_decay(weight_decay, dataset_size, kl_weight=1.0):
        """Standard deviation of the Gaussian prior that gives IVON's weight decay
        ``weight_decay``: ``sqrt(λ / (N δ))``."""
        check_positive("weight_decay", weight_decay)
        check_positive("dataset_size", dataset_size)
        check_positive("kl_weight", kl_weight)
        return math.sqrt(kl_weight / (dataset_size * weight_decay))

    def _initial_state(self, p, group):
        return {"step": 0, "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "hess": torch.full_like(p, group["hess_init"],
                                        memory_format=torch.preserve_format)}

    @staticmethod
    def _bias_corrected(group):
        # IVON's h is never bias-corrected (hess_init is its first term, even when 0)
        return False

    def _curvature_key(self):
        return "hess"

    def _noise_curvature(self, params, group, priors, grads, noise):
        # ĝ ε of this sample; the factor 1/σ — the model's σ, which the sample was drawn with
        # and which stays the same for every MC sample of a step — is applied once in step()
        return list(torch._foreach_mul(grads, noise))

    def _stds(self, params):
        """σ of each parameter's posterior as the model holds it (what the sample used): the
        sample's own σ while the scales are unchanged since, else computed."""
        posts = [self.posterior_of(p) for p in params]
        if all(isinstance(getattr(post, "log_std", None), torch.Tensor) for post in posts):
            cached = [self.var_model._cached_sigma(post.log_std) for post in posts]
            if all(c is not None for c in cached):
                return cached
            return torch._foreach_exp([post.log_std for post in posts])
        return [post.stddev for post in posts]

    @torch.no_grad()
    def step(self, closure=None):
        """One update from the last backward (or from ``closure``, called ``mc_samples``
        times). Returns the closure's mean loss, if any."""
        self.check_forwards(closure)
        if closure is None and self.flat_path and self._flat_step_from_grads():
            return None
        collected, loss = self._collect(closure)
        # every group is computed and checked before any is written: a refused step in one
        # group leaves the others untouched as well
        commits = []
        for group, (params, stats, priors) in zip(self.param_groups, collected):
            if not params:
                continue
            plan = self._flat_plan(group, params, priors)
            if plan is not None:
                flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
                commits.append(self._flat_step(group, params, flat(stats["grad"]),
                                               flat(stats["hess"]), plan))
                continue
            beta1, beta2 = group["betas"]
            lr, clip = group["lr"], group["clip_radius"]
            states = [self.state[p] for p in params]
            steps = [s["step"] + 1 for s in states]
            hess = [s["hess"] for s in states]
            deltas = self._dampings(group, priors)
            exp_avg = torch._foreach_lerp([s["exp_avg"] for s in states], stats["grad"],
                                          1.0 - beta1)
            # ĥ = (ĝ ε) / σ with the σ the sample was drawn with, read from the model (not
            # rebuilt from h, λ and N, which may have changed since it was written)
            a = 1.0 - beta2
            d_old = add_damping(hess, deltas)
            h_hat = stats["hess"]                     # ĝ ε, owned by this step
            torch._foreach_div_(h_hat, self._stds(params))
            # h ← h − (1−β2)(h − ĥ) + ½(1−β2)² (h − ĥ)² / (h + δ)
            diff = torch._foreach_sub(hess, h_hat)
            new_hess = torch._foreach_add(hess, diff, alpha=-a)
            torch._foreach_mul_(diff, diff)
            torch._foreach_addcdiv_(new_hess, diff, d_old, 0.5 * a * a)
            d_new = add_damping(new_hess, deltas)
            # numerator g/(1−β1^t) + prior gradient, kept scaled by bc1 = 1−β1^t
            bc1 = [1.0 - beta1 ** k for k in steps]
            terms = self._prior_gradient_terms(group, priors, stats)
            if math.isinf(clip) and all(kind == "gauss" and not torch.is_tensor(d) and m0 == 0.0
                                        for kind, d, m0 in terms):
                # m − α (g/bc1 + δ m)/(h + δ) as two fused passes
                new_means = torch._foreach_addcdiv(params, params, d_new,
                                                   [-lr * d for _, d, _ in terms])
                torch._foreach_addcdiv_(new_means, exp_avg, d_new, [-lr / b for b in bc1])
            elif math.isinf(clip):
                num = self._scaled_prior_sum(exp_avg, params, terms, bc1)
                new_means = torch._foreach_addcdiv(params, num, d_new,
                                                   [-lr / b for b in bc1])
            else:
                num = self._scaled_prior_sum(exp_avg, params, terms, bc1)
                upd = torch._foreach_div(num, d_new)
                torch._foreach_mul_(upd, [1.0 / b for b in bc1])
                torch._foreach_clamp_min_(upd, -clip)
                torch._foreach_clamp_max_(upd, clip)
                new_means = torch._foreach_add(params, upd, alpha=-lr)
            self._check(max(steps), params, new_means, d_new)
            new_states = [{"step": k, "exp_avg": m, "hess": h}
                          for k, m, h in zip(steps, exp_avg, new_hess)]
            commits.append(lambda a=(group, params, new_means, d_new, [0.0] * len(params),
                                     new_states): self._commit(*a))
        for commit in commits:
            commit()
        return loss

    # ------------------------------------------------------------------ flat fast path
    # On CPU a multi-tensor (``_foreach``) op is a loop over the tensors, a few µs each; a
    # network of many small tensors (the README CNN: 12 tensors, 22k weights) then spends
    # more time in the ~25 per-tensor passes of the update than in arithmetic. Where the
    # tensors of a group are small on average (``flat_max_mean_size``) and every
    # parameter of a group shares dtype, device and a contiguous layout, has a Gaussian prior
    # with mean 0 and the same step count (the usual case), the update runs on one flat
    # vector: the optimizer state lives in two flat buffers whose views are the per-parameter
    # state entries (so ``state[p]``, ``state_dict()`` and resume are unchanged); the noise of
    # the sample already is one flat buffer (``variational._flat_noise``), the gradients and
    # means are concatenated once per step. A plan is reused while a cheap fingerprint holds
    # (the parameters, their prior objects, where means and scales live, the state object and
    # ``_state_epoch``, λ/N); anything else rebuilds it. The arithmetic is the same element by
    # element, so both paths agree to rounding (tested, including changes made between steps).

    def _flat_plan(self, group, params, priors=None):
        """The flat buffers of ``group``, reused while their fingerprint holds, else built; or
        ``None`` where the flat path does not apply. ``priors``: ``_priors_of(params)``, computed
        here when ``None`` and needed."""
        if not self.flat_path:
            return None
        plan = self._flat_plan_cached(group, params)
        if plan is not None:
            return plan
        if priors is None:
            priors = self._priors_of(params)
        # only where per-tensor overhead dominates: the concatenations cost ~5 passes over
        # the weights, which on the 784-400-400-10 MLP (80k weights a tensor) made the step
        # 2.37x a plain Adam step against 1.88x per tensor (a development measurement, one
        # run; diagonal_step.json has today's per-tensor figure, 1.97x)
        if sum(p.numel() for p in params) > self.flat_max_mean_size * len(params):
            return None
        p0 = params[0]
        if any(p.dtype != p0.dtype or p.device != p0.device or not p.is_contiguous()
               for p in params):
            return None
        if any(m0 != 0.0 or torch.is_tensor(prec) for prec, m0 in priors):
            return None
        posts = [self.posterior_of(p) for p in params]
        if not all(isinstance(getattr(post, "log_std", None), torch.Tensor)
                   and post.log_std.is_contiguous() for post in posts):
            return None
        states = [self.state[p] for p in params]
        steps = {st["step"] for st in states}
        if len(steps) != 1:
            return None
        precs = [prec for prec, _ in priors]
        scale = group["kl_weight"] / group["dataset_size"]
        sizes = [p.numel() for p in params]
        m = torch.cat([st["exp_avg"].reshape(-1) for st in states])
        h = torch.cat([st["hess"].reshape(-1) for st in states])
        m_views = [v.view_as(p) for v, p in zip(m.split(sizes), params)]
        h_views = [v.view_as(p) for v, p in zip(h.split(sizes), params)]
        for st, mv, hv in zip(states, m_views, h_views):
            st["exp_avg"], st["hess"] = mv, hv
        deltas = [prec * scale for prec in precs]
        if all(d == deltas[0] for d in deltas):
            delta = deltas[0]
        else:
            delta = torch.cat([torch.full((n,), d, dtype=p0.dtype, device=p0.device)
                               for n, d in zip(sizes, deltas)])
        plan = {"sizes": sizes, "m": m, "h": h, "delta": delta,
                # flat views of the means and of the scales, written in place each step
                "p_flat": [p.view(-1) for p in params],
                "ls_flat": [post.log_std.view(-1) for post in posts],
                "states": states,
                "noise_keys": [self._posteriors[self._names[p]][0] for p in params]}
        plan["fingerprint"] = self._flat_fingerprint(group, params)
        self._flat[id(group)] = plan
        return plan

    def _flat_fingerprint(self, group, params):
        """What a valid plan depends on beyond its own buffers, cheap to check every step: the
        parameters, their priors (``set_prior`` replaces prior objects, never changes them),
        where the means and scales live, the state (``_state_epoch`` moves whenever the
        per-tensor path or ``load_state_dict`` writes it) and the damping scale λ/N."""
        names = [self._names[p] for p in params]
        posts = [self._posteriors[n][1] for n in names]
        priors = self.var_model._priors
        return {"params": list(params), "names": names, "posts": posts,
                "priors": [priors.get(n) for n in names],
                "ptrs": [p.data_ptr() for p in params],
                "ls_ptrs": [post.log_std.data_ptr() for post in posts],
                "state": self.state, "epoch": self._state_epoch,
                "limit": self.flat_max_mean_size,
                "scale": group["kl_weight"] / group["dataset_size"]}

    def _flat_plan_cached(self, group, params):
        """The plan of ``group`` when nothing it depends on changed since the last step."""
        plan = self._flat.get(id(group))
        if plan is None:
            return None
        fp = plan["fingerprint"]
        if not (self.state is fp["state"] and self._state_epoch == fp["epoch"]
                and self.flat_max_mean_size == fp["limit"]
                and group["kl_weight"] / group["dataset_size"] == fp["scale"]
                and len(params) == len(fp["params"])
                and all(a is b for a, b in zip(params, fp["params"]))):
            return None
        priors = self.var_model._priors
        if not (all(priors.get(n) is o for n, o in zip(fp["names"], fp["priors"]))
                and all(p.data_ptr() == q for p, q in zip(params, fp["ptrs"]))
                and all(post.log_std.data_ptr() == q
                        for post, q in zip(fp["posts"], fp["ls_ptrs"]))):
            return None
        return plan

    @staticmethod
    def _as_flat(tensors, total):
        """The 1-D tensor whose consecutive pieces ``tensors`` are (the noise buffer of a
        sample), or ``None``."""
        base = tensors[0]._base
        if base is None or base.dim() != 1 or base.numel() != total:
            return None
        offset = base.storage_offset()
        for t in tensors:
            if t._base is not base or t.storage_offset() != offset:
                return None
            offset += t.numel()
        return base

    def _flat_step_from_grads(self):
        """The one-sample step (no closure) straight from ``.grad`` and the recorded noise
        when every group takes the flat path; False (nothing done) otherwise."""
        todo = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            plan = self._flat_plan(group, params)
            if plan is None:
                return False
            todo.append((group, params, plan))
        record = self.var_model.last_noise
        commits = []
        for group, params, plan in todo:
            grad = torch.cat([p.grad.reshape(-1) for p in params])
            if record is not None and all(k in record for k in plan["noise_keys"]):
                noise = [record[k][0] for k in plan["noise_keys"]]
            else:
                noise = self._noise_list(params)     # raises the explanatory error
            flat = self._as_flat(noise, grad.numel())
            h_hat = (torch.mul(flat, grad) if flat is not None
                     else torch.cat([e.reshape(-1) for e in noise]).mul_(grad))
            commits.append(self._flat_step(group, params, grad, h_hat, plan))   # ĥ·σ = ĝ ε
        for commit in commits:       # after every group was checked
            commit()
        return True

    def _flat_step(self, group, params, grad, h_hat, plan):
        """The update of :meth:`step` on the flat buffers of ``plan``; ``grad`` and ``h_hat``
        (ĝ ε, consumed) are flat. Computes and checks; returns the function that writes it."""
        beta1, beta2 = group["betas"]
        lr, clip = group["lr"], group["clip_radius"]
        states = plan["states"]
        k = states[0]["step"] + 1
        m, h, delta, sizes = plan["m"], plan["h"], plan["delta"], plan["sizes"]
        mean = torch.cat(plan["p_flat"])
        a = 1.0 - beta2
        exp_avg = torch.lerp(m, grad, 1.0 - beta1)
        d_old = h + delta
        h_hat.div_(torch.cat(plan["ls_flat"]).exp_())     # ĥ = ĝ ε / σ
        diff = torch.sub(h, h_hat)
        new_hess = torch.add(h, diff, alpha=-a)
        diff.mul_(diff)
        new_hess.addcdiv_(diff, d_old, value=0.5 * a * a)
        d_new = new_hess + delta
        bc1 = 1.0 - beta1 ** k
        tensor_delta = torch.is_tensor(delta)
        if math.isinf(clip):
            if tensor_delta:
                new_mean = torch.addcdiv(mean, mean * delta, d_new, value=-lr)
            else:
                new_mean = torch.addcdiv(mean, mean, d_new, value=-lr * delta)
            new_mean.addcdiv_(exp_avg, d_new, value=-lr / bc1)
        else:
            num = (torch.addcmul(exp_avg, mean, delta, value=bc1) if tensor_delta
                   else torch.add(exp_avg, mean, alpha=delta * bc1))
            upd = num.div_(d_new).mul_(1.0 / bc1).clamp_(-clip, clip)
            new_mean = torch.add(mean, upd, alpha=-lr)
        # a sum is finite iff every entry is (NaN and inf propagate), barring an overflow of
        # the sum itself, which the exact per-tensor test then clears
        if not math.isfinite(float(new_mean.sum() + d_new.sum())):
            split = lambda t: [v.view_as(p) for v, p in zip(t.split(sizes), params)]  # noqa: E731
            self._check(k, params, split(new_mean), split(d_new))   # raises, naming the culprit
        def commit():
            # means, scales (log σ = ½ log(λ/N) − ½ log(h + δ)), then the state
            torch._foreach_copy_(plan["p_flat"], new_mean.split(sizes))
            log_std = d_new.log_().mul_(-0.5).add_(
                0.5 * math.log(group["kl_weight"] / group["dataset_size"]))
            torch._foreach_copy_(plan["ls_flat"], log_std.split(sizes))
            m.copy_(exp_avg)
            h.copy_(new_hess)
            for st in states:
                st["step"] = k

        return commit

    @staticmethod
    def _scaled_prior_sum(exp_avg, params, terms, bc1):
        """g + bc1 · (prior gradient), per param, out of place."""
        if all(kind == "gauss" and not torch.is_tensor(a) and b == 0.0
               for kind, a, b in terms):                 # the common case: two multi-tensor ops
            out = list(torch._foreach_mul(params, [a * c for (_, a, _), c in zip(terms, bc1)]))
            torch._foreach_add_(out, exp_avg)
            return out
        out = []
        for g, p, (kind, a, b), c in zip(exp_avg, params, terms, bc1):
            if kind == "grad":
                out.append(torch.add(g, a, alpha=b * c))
            elif torch.is_tensor(a):
                out.append(torch.addcmul(g, a, p - b if b != 0.0 else p, value=c))
            elif b != 0.0:
                out.append(torch.add(g, p - b, alpha=a * c))
            else:
                out.append(torch.add(g, p, alpha=a * c))
        return out
