"""Noisy K-FAC (Zhang, Sun, Duvenaud & Grosse 2018) and noisy EK-FAC (Bae, Zhang & Grosse 2018).

Usage, the same loop as every optimizer of :mod:`pyvarinf2.optim`::

    var_model = pyvarinf2.variationalize(model)
    opt = pyvarinf2.optim.NoisyKFAC(var_model, lr=1e-2, dataset_size=N)   # or NoisyEKFAC
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(var_model(x), y).backward()     # the mean NLL; no prior term
        opt.step()                                       # or opt.step(closure)

What gets which posterior. ``nn.Linear`` and ``nn.Conv2d`` (``groups=1``) layers whose weight has
a posterior get a matrix-variate Gaussian (:class:`pyvarinf2.kronecker.KroneckerPosterior`, the
bias as a homogeneous coordinate) that lives in the model: the constructor calls
:func:`pyvarinf2.kronecker.use_kronecker_posteriors`. Every other parameter with a posterior
(BatchNorm, Embedding, LayerNorm, ...) keeps its mean-field posterior and gets the diagonal noisy
Adam update below; the split is reported once with ``logging.info``.

The K-FAC update of a layer (homogeneous matrix ``W_h = [W, b]``, ``out x n_in``), with
``γ_in = λ·p̄/N`` (``p̄``: the mean prior precision over the layer's entries, exact for the
``N(0, η I)`` prior of the paper, where ``γ_in = λ/(Nη)``) and ``γ = γ_in + extrinsic_damping``:

* every ``T_cov`` steps: ``A ← β A + (1−β) A_batch``, ``S ← β S + (1−β) S_batch``
  (:mod:`pyvarinf2.kfac`; ``β = min(cov_decay, n/(n+1))`` for the n-th update, so the first
  updates are plain averages). ``fisher='true'`` (default) samples labels from the model's
  predictive (``likelihood='categorical'`` or ``'gaussian'`` with ``obs_noise``) in one extra
  backward on capture steps; ``fisher='empirical'`` uses the given labels.
* every ``T_inv`` steps: ``A = Q_A diag(d_A) Q_Aᵀ`` and ``S = Q_S diag(d_S) Q_Sᵀ``
  (``torch.linalg.eigh``), and the posterior in the model is rewritten. During the first
  ``T_inv`` steps the eigendecompositions follow every factor update (a warm start: the factors
  of the first batches are the least representative).
* ``V = ∇_W mean-NLL + (λ/N)·(−∇ log p(W))``: the prior's gradient enters exactly, at the mean
  for a Gaussian prior, at the sampled weights for any other prior.
* preconditioned direction ``Δ = Q_S [(Q_Sᵀ V Q_A) / D] Q_Aᵀ`` with
  ``damping_mode='pi'`` (default, the paper's): ``D = (d_S + √γ/π)(d_A + π√γ)ᵀ``, i.e.
  ``Δ = S_γ⁻¹ V A_γ⁻¹`` with π-split damping ``A_γ = A + π√γ I``, ``S_γ = S + √γ/π I``,
  ``π² = (tr A / dim A) / (tr S / dim S)`` (computed as two products with the cached inverses
  ``S_γ⁻¹``, ``A_γ⁻¹``); ``damping_mode='eigen'``: ``D = d_S d_Aᵀ + γ``, the exact inverse of
  the damped Kronecker Fisher ``S ⊗ A + γ I`` (four products per step).
* KL clipping (``kl_clip``): ``ν = min(1, sqrt(kl_clip / (lr² Σ_layers ⟨Δ, V⟩)))``; then
  ``buf ← momentum·buf + ν Δ`` and ``W_h ← W_h − lr·buf``.
* the posterior: ``W_h = M_h + Q_S (σ ⊙ E) Q_Aᵀ`` with ``σ² = (λ/N) / D_in`` where ``D_in`` is
  ``D`` with the intrinsic damping ``γ_in`` only (``extrinsic_damping`` is not part of the
  posterior, as in the paper). With ``'pi'`` this is ``W = M + sqrt(λ/N) S_γin^{-1/2} E
  A_γin^{-1/2}`` in distribution (the factors damped with ``γ_in`` alone). On single-output
  Bayesian linear regression, where ``S`` is a scalar and the
  Fisher is exactly Kronecker, ``'eigen'`` gives the exact posterior covariance
  ``(N/λ · Fisher + prior precision)⁻¹``; ``'pi'`` adds the cross terms of the split damping.

Noisy EK-FAC keeps K-FAC's eigenbasis but replaces ``d_S d_Aᵀ`` by a re-estimated diagonal
scale ``R ← β R + (1−β) mean_i [(Q_Sᵀ G_i Q_A)²]`` (``G_i`` the per-example gradient
``Σ_t g_{i,t} a_{i,t}ᵀ``), updated on the capture steps and reset to ``d_S d_Aᵀ`` whenever the
basis is recomputed; ``D = R + γ`` and ``σ² = (λ/N)/(R + γ_in)``.

The diagonal (noisy Adam) part, for parameters outside K-FAC layers, with per-entry
``γ_in = λ·p/N``: ``v = ∇ mean-NLL + (λ/N)(−∇ log p)``, ``m ← β1 m + (1−β1) v``,
``f ← β2 f + (1−β2) F̂``, ``μ ← μ − lr·m̂/(f̂ + γ_in + extrinsic_damping)`` (bias-corrected
``m̂, f̂``),
``σ = sqrt(λ / (N (f̂ + γ_in)))``. ``F̂`` is the mean of the per-example squared gradients from
:class:`pyvarinf2.curvature.PerExampleSquaredGradients` (on capture steps with
``fisher='true'`` those of the sampled labels), or ``B·ĝ²`` (the squared minibatch gradient
rescaled to one example) for a parameter it cannot reach.

KL clipping covers the K-FAC layers only. Everything (factors, eigenbases, ``R``, momentum,
step counters) is in ``state_dict()``; the posterior factors are in the model's state_dict.
"""
import logging
import math

import torch

from ..kfac import KFACCapture, kfac_factors
from ..kronecker import (KroneckerPosterior, check_matmul_dtype, matmul_chain,
                         use_kronecker_posteriors)
from ..posteriors import MeanFieldPosterior
from ._base import (NonFiniteError, VariationalOptimizer, check_beta, check_betas,
                    check_nonnegative, check_positive, check_positive_int)

__all__ = ["NoisyKFAC", "NoisyEKFAC"]

logger = logging.getLogger(__name__)

# per-example projected gradients of a conv layer are formed in chunks of at most this many
_CHUNK_NUMBERS = 2 ** 22


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value



def _symmetric_eigh(matrix):
    """Eigendecomposition of a symmetric PSD factor, computed in float64.

    In float32 LAPACK's ``syevd`` fails to converge on K-FAC input factors with many exactly
    zero rows and columns (MNIST's always-black border pixels: 233 of 785 for a 2,000-image
    subset), depending on the thread count; float64 converges on the same matrices. The factor
    is symmetrised first so that round-off cannot make it non-symmetric."""
    m64 = matrix.double()
    m64 = 0.5 * (m64 + m64.transpose(-1, -2))
    vals, vecs = torch.linalg.eigh(m64)
    return vals.to(matrix.dtype), vecs.to(matrix.dtype)

class NoisyKFAC(VariationalOptimizer):
    """Noisy K-FAC: natural-gradient VI with a matrix-variate Gaussian per Linear/Conv2d layer.

    Args:
        var_model: the :class:`~pyvarinf2.VariationalModel` to train (its eligible layers get
            Kronecker posteriors, see the module doc).
        lr: learning rate α (default 1e-2).
        dataset_size: N, the number of training examples (required).
        kl_weight: λ (1 = the ELBO; < 1 tempers the posterior).
        extrinsic_damping: γ_ex, added to the preconditioner only (default 1e-3).
        cov_decay: decay β of the running averages of the factors (default 0.95).
        T_cov: factor statistics every ``T_cov`` steps (default 10).
        T_inv: eigendecompositions every ``T_inv`` steps (default 100).
        momentum: momentum on the (clipped) natural-gradient direction (default 0.9).
        kl_clip: KL clipping bound, or ``None`` for none (default 3e-4).
        damping_mode: ``'pi'`` (π-split damping of the two factors, default) or ``'eigen'``
            (exact damping of the Kronecker Fisher; exact posterior on single-output linear
            regression).
        fisher: ``'true'`` (labels sampled from the model, default) or ``'empirical'``.
        likelihood: ``'categorical'`` (outputs are logits or log-probabilities over dim 1) or
            ``'gaussian'`` (outputs are the regression mean) for the true Fisher.
        obs_noise: observation-noise standard deviation of the Gaussian likelihood, a number or
            a callable returning a tensor (e.g. a learned noise).
        betas: (β1, β2) of the diagonal noisy-Adam part (default (0.9, 0.999)).
        mc_samples: weight samples per ``step(closure)`` (the closure is called that often).
        layers: restrict K-FAC to these layers (layer-path patterns, module types or a predicate
            ``(path, module) -> bool``); the others get the diagonal treatment.
        matmul_dtype: ``None`` (default: the parameters' dtype) or a lower precision such as
            ``torch.bfloat16`` / ``'bfloat16'`` for the dense products of every step (the
            preconditioned mean step and the model's Kronecker samples; factor statistics and
            eigendecompositions stay in full precision). On the 2-core AVX512-BF16 CPU of
            ``benchmarks/`` the amortised MLP step drops from 2.63x to 1.75x a NoisyAdam step
            (``kronecker_step.json``); each entry
            of the step and of the noise then carries ~0.4% relative rounding error
            (tested), far below the Monte-Carlo noise of one weight sample.
    """

    eigen_corrected = False

    def __init__(self, var_model, lr=1e-2, *, dataset_size, kl_weight=1.0,
                 extrinsic_damping=1e-3, cov_decay=0.95, T_cov=10, T_inv=100, momentum=0.9,
                 kl_clip=3e-4,
                 damping_mode="pi", fisher="true", likelihood="categorical", obs_noise=1.0,
                 betas=(0.9, 0.999), mc_samples=1, layers=None, matmul_dtype=None):
        # validate everything before the model is touched
        self.check_common(var_model, dataset_size, kl_weight, mc_samples, lr)
        check_nonnegative("extrinsic_damping", extrinsic_damping)
        check_beta("cov_decay", cov_decay)
        T_cov = check_positive_int("T_cov", T_cov)
        T_inv = check_positive_int("T_inv", T_inv)
        check_beta("momentum", momentum)
        if kl_clip is not None:
            check_positive("kl_clip", kl_clip)
        _check_choice("damping_mode", damping_mode, ("eigen", "pi"))
        _check_choice("fisher", fisher, ("true", "empirical"))
        _check_choice("likelihood", likelihood, ("categorical", "gaussian"))
        if not callable(obs_noise):
            check_positive("obs_noise", obs_noise)
        betas = check_betas(betas)
        matmul_dtype = check_matmul_dtype(matmul_dtype)
        if layers is not None and not (callable(layers) or isinstance(layers, (str, type, list,
                                                                              tuple))):
            raise ValueError(f"layers must be patterns, module types or a predicate, got "
                             f"{layers!r}")

        kfac_layers = use_kronecker_posteriors(var_model, layers=layers)
        defaults = dict(lr=lr, extrinsic_damping=float(extrinsic_damping),
                        cov_decay=float(cov_decay), T_cov=T_cov,
                        T_inv=T_inv, momentum=float(momentum),
                        kl_clip=None if kl_clip is None else float(kl_clip),
                        damping_mode=damping_mode, fisher=fisher, likelihood=likelihood,
                        betas=betas)
        super().__init__(var_model, defaults, dataset_size, kl_weight=kl_weight,
                         mc_samples=mc_samples)
        self.obs_noise = obs_noise
        self._layers = kfac_layers
        #: dtype of the dense products of the mean step and of the model's Kronecker samples
        #: (``None``: the parameters' own; see ``matmul_dtype`` in the class doc)
        self.matmul_dtype = matmul_dtype
        for _, post in var_model.named_posteriors():
            if isinstance(post, KroneckerPosterior):
                post.matmul_dtype = matmul_dtype
        names = {n for layer in kfac_layers for n in (layer.weight_name, layer.bias_name) if n}
        self._diag_names = [n for n in var_model.posterior_parameters() if n not in names]
        odd = [n for n in self._diag_names
               if not isinstance(self._posteriors[n][1], MeanFieldPosterior)]
        if odd:
            raise TypeError(f"{type(self).__name__} handles Kronecker posteriors of Linear/Conv2d "
                            f"layers and mean-field posteriors; {odd} have neither")
        self._capture = KFACCapture(var_model, kfac_layers, fisher=fisher,
                                    likelihood=likelihood, obs_noise=obs_noise)
        self._sq = None
        if self._diag_names:
            try:
                from ..curvature import PerExampleSquaredGradients
                self._sq = PerExampleSquaredGradients(var_model, self._diag_names).attach()
                # a module re-run through torch.func after the forward would not see a Linear
                # layer's noise taken through its activations: those layers form M + Z
                var_model._keep_activation_noise_out(self._sq.func_modules())
            except Exception as exc:  # noqa: BLE001 -- fall back to B * g^2, said in the log
                logger.info("%s: per-example squared gradients unavailable (%s); the diagonal "
                            "part uses B * (minibatch gradient)^2", type(self).__name__, exc)
        self._cache = {}  # prior-derived constants; holds the priors so their ids stay unique
        self._kstep = 0
        #: the KL-clipping factor ν of the last step (1 = not clipped)
        self.kl_clip_factor = 1.0
        self._stats_pending = True
        self._capture.arm()
        logger.info(
            "%s: Kronecker-factored (matrix-variate) posterior on %d layer(s) [%s]; diagonal "
            "noisy-Adam treatment for %d other parameter(s) [%s]", type(self).__name__,
            len(kfac_layers), ", ".join(f"{layer.path or '<root>'} "
                                        f"({type(layer.module).__name__})"
                                        for layer in kfac_layers),
            len(self._diag_names), ", ".join(self._diag_names))

    # ------------------------------------------------------------------ bookkeeping
    @property
    def kfac_layers(self):
        """The layers with a Kronecker posterior (:class:`pyvarinf2.kfac.KFACLayer`)."""
        return list(self._layers)

    @property
    def diagonal_parameters(self):
        """Names of the parameters with the diagonal noisy-Adam treatment."""
        return list(self._diag_names)

    def remove_hooks(self):
        """Remove the capture hooks from the model (the optimizer cannot step afterwards)."""
        self._capture.remove()
        if self._sq is not None:
            self._sq.detach()

    def state_dict(self):
        sd = super().state_dict()
        sd["noisy_kfac"] = {"step": self._kstep, "stats_pending": self._stats_pending}
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("noisy_kfac", None)
        if extra is None:
            raise ValueError(f"state_dict was not saved by {type(self).__name__} (no "
                             "'noisy_kfac' entry)")
        super().load_state_dict(state_dict)
        self._kstep = int(extra["step"])
        self._stats_pending = bool(extra["stats_pending"])
        self._capture.disarm()
        if self._stats_pending:
            self._capture.arm()

    def _group_of(self, p):
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError(self.name_of(p))

    def _layer_params(self, layer):
        w = self.var_model._mean_of(layer.weight_name)
        b = self.var_model._mean_of(layer.bias_name) if layer.bias_name else None
        return w, b

    # ------------------------------------------------------------------ gradients
    def _is_gaussian(self, p):
        prior = self.prior_of(p)
        key = ("gaussian", id(prior), tuple(p.shape))
        if key not in self._cache:
            self._cache[key] = (prior, prior.precision(p.detach()) is not None)
        return self._cache[key][1]

    def _mean_prior_precision(self, layer, post, w, b):
        """p̄: the mean prior precision over the layer's homogeneous matrix (cached per prior)."""
        priors = (self.prior_of(w), self.prior_of(b) if b is not None else None)
        key = ("layer", layer.key, id(priors[0]), id(priors[1]))
        if key not in self._cache:
            prec = post.matrix([self.prior_precision(w)]
                               + ([self.prior_precision(b)] if b is not None else []))
            self._cache[key] = (priors, float(prec.mean()))
        return self._cache[key][1]

    def _current_thetas(self):
        """Sampled weights of the last forward, for the parameters whose prior is not
        Gaussian (their prior gradient is taken at the sample)."""
        need = [p for g in self.param_groups for p in g["params"] if not self._is_gaussian(p)]
        if not need:
            return {}
        record = self.var_model.last_noise
        if record is None:
            raise RuntimeError("no weight sample recorded: run a forward pass of the variational "
                               "model in training mode (and backward) before step()")
        out = {}
        done = set()
        for p in need:
            key, post = self._posteriors[self.name_of(p)]
            if key in done:
                continue
            done.add(key)
            means = [self.var_model._mean_of(n) for n in post.names]
            with torch.no_grad():
                thetas = post.sample(means, record[key])
            for n, t in zip(post.names, thetas):
                out[n] = t
        return out

    def _collect(self, closure):
        """Mean gradients and mean prior gradients over the weight samples of this step."""
        params = [p for g in self.param_groups for p in g["params"]]
        grads, prior_grads = {}, {}
        lam_n = {}
        for g in self.param_groups:
            for p in g["params"]:
                lam_n[p] = g["kl_weight"] / g["dataset_size"]

        # a Gaussian prior's gradient is taken at the mean, the same for every sample: once
        at_mean = [p for p in params if self._is_gaussian(p)]
        at_sample = [p for p in params if not self._is_gaussian(p)]

        def accumulate(_):
            thetas = self._current_thetas() if at_sample else {}
            for p in params:
                if p.grad is not None:
                    grads[p] = grads[p] + p.grad.detach() if p in grads else p.grad.detach().clone()
            for p in at_sample:
                pg = self.prior_grad(p, thetas[self.name_of(p)])
                prior_grads[p] = prior_grads[p] + pg if p in prior_grads else pg

        if closure is None:
            loss = None
            accumulate(0)
            m = 1
        else:
            loss = self.run_closure(closure, accumulate)
            m = self.defaults["mc_samples"]
        if m > 1:
            grads = {p: v / m for p, v in grads.items()}
            prior_grads = {p: v / m for p, v in prior_grads.items()}
        prior_terms = {p: lam_n[p] * v for p, v in prior_grads.items()}
        for p in at_mean:
            prior_terms[p] = self.prior_grad(p, p, scale=lam_n[p])
        return loss, grads, prior_terms

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        """One noisy natural-gradient step; returns the closure's mean loss (or ``None``)."""
        try:
            self.check_forwards(closure)
            return self._step(closure)
        finally:  # per-step captures are spent, whether the step succeeded or not
            if self._stats_pending:
                self._capture.arm()
            if self._sq is not None:
                self._sq.reset()

    def _step(self, closure):
        loss, grads, prior_terms = self._collect(closure)
        if not grads:
            # no gradient at all (step() without a backward): nothing to do, and the
            # T_cov / T_inv schedule does not move either
            return loss
        for layer in self._layers:
            w, b = self._layer_params(layer)
            if grads.get(w) is None and b is not None and grads.get(b) is not None:
                raise RuntimeError(
                    f"{type(self).__name__}: layer {layer.path or '<root>'!r} has a gradient for "
                    "its bias but none for its weight (frozen after variationalize?). Its "
                    "Kronecker posterior covers both; freeze the weight before "
                    "variationalize, or keep the layer out with layers=...; nothing was "
                    "changed.")
        k = self._kstep
        captured = self._capture.take() if self._stats_pending else {}
        if captured:
            # (a zero gradient kept by zero_grad(set_to_none=False) for a layer this forward
            # did not use is no gradient)
            missing = [layer.path or "<root>" for i, layer in enumerate(self._layers)
                       if i not in captured
                       and _nonzero(grads.get(self._layer_params(layer)[0]))]
            if missing:
                raise RuntimeError(
                    f"{type(self).__name__}: layer(s) {missing} received a gradient but no "
                    "K-FAC record (their weight is used outside the module's own forward, or, "
                    "with fisher='true', they do not feed the model's output). Exclude them "
                    "with layers=... so that they get the diagonal treatment.")
        means, states, post_states = {}, {}, {}
        pending = []  # (layer, group, preconditioned direction, state)
        vg = {}
        for idx, layer in enumerate(self._layers):
            self._layer_step(idx, layer, k, grads, prior_terms, captured, states, post_states,
                             pending, vg)
        # KL clipping over the K-FAC layers of each group, then momentum and the mean update
        for group in self.param_groups:
            clip = group["kl_clip"]
            total = vg.get(id(group), 0.0)
            nu = 1.0
            if clip is not None and total > 0:
                nu = min(1.0, math.sqrt(clip / total))
            self.kl_clip_factor = nu
            for layer, g, delta, st in pending:
                if g is not group:
                    continue
                w, b = self._layer_params(layer)
                post = layer.posterior
                if nu != 1.0:
                    delta = delta * nu
                if g["momentum"] > 0:
                    buf = st.get("momentum_buffer")
                    buf = delta if buf is None else buf * g["momentum"] + delta
                    states.setdefault(w, {})["momentum_buffer"] = buf
                    delta = buf
                parts = post.split(delta)
                means[w] = torch.add(w, parts[0], alpha=-g["lr"])
                if b is not None:
                    means[b] = torch.add(b, parts[1], alpha=-g["lr"])
        stddevs = self._diagonal_step(grads, prior_terms, means, states)
        self.commit(k, means=means, states=states, posterior_states=post_states,
                    stddevs=stddevs)
        # bookkeeping after a successful commit only
        if captured or not self._layers:
            self._stats_pending = False
        self._kstep = k + 1
        if self._kstep % self.defaults["T_cov"] == 0:
            self._stats_pending = True
        return loss

    def _layer_step(self, idx, layer, k, grads, prior_terms, captured, states, post_states,
                    pending, vg):
        w, b = self._layer_params(layer)
        group = self._group_of(w)
        post = layer.posterior
        st = self.state[w]
        new = {}
        lam, n_data = group["kl_weight"], group["dataset_size"]
        # 1. factor statistics
        fresh_stats = idx in captured
        if fresh_stats:
            a, gout = captured[idx]
            a_b, s_b = kfac_factors(a.to(w.dtype), gout.to(w.dtype))
            n = st.get("n_stats", 0)
            beta = min(group["cov_decay"], n / (n + 1.0))
            if n == 0:
                new["A"], new["S"] = a_b, s_b
            else:
                new["A"] = beta * st["A"] + (1.0 - beta) * a_b
                new["S"] = beta * st["S"] + (1.0 - beta) * s_b
            for key in ("A", "S"):
                if not torch.isfinite(new[key]).all():
                    raise NonFiniteError(
                        f"{type(self).__name__} step {k}: the K-FAC factor {key} of "
                        f"{layer.path or '<root>'} would become non-finite (NaN or inf); nothing "
                        "was changed. The loss or its gradient is probably non-finite.")
            new["n_stats"] = n + 1
        has_factors = "A" in new or "A" in st
        # 2. eigendecompositions
        # (at a multiple of T_inv only if the factors changed since the last one: with T_inv
        # not a multiple of T_cov it would redo the same decomposition and, for EK-FAC, throw
        # away the re-estimated scale)
        n_stats = new.get("n_stats", st.get("n_stats", 0))
        new_basis = has_factors and (
            "basis_A" not in st or (fresh_stats and k < group["T_inv"])
            or (k % group["T_inv"] == 0 and st.get("basis_stats") != n_stats))
        if new_basis:
            new["basis_stats"] = n_stats
            fa = new.get("A", st.get("A"))
            fs = new.get("S", st.get("S"))
            d_a, q_a = _symmetric_eigh(fa)
            d_s, q_s = _symmetric_eigh(fs)
            new.update(eigvals_A=d_a.clamp_min(0.0), basis_A=q_a, eigvals_S=d_s.clamp_min(0.0),
                       basis_S=q_s)
        if has_factors:
            d_a = new.get("eigvals_A", st.get("eigvals_A"))
            q_a = new.get("basis_A", st.get("basis_A"))
            d_s = new.get("eigvals_S", st.get("eigvals_S"))
            q_s = new.get("basis_S", st.get("basis_S"))
        else:  # no statistics yet: identity factors (a damped gradient step)
            d_a = w.new_ones(post.n_in)
            d_s = w.new_ones(post.n_out)
            q_a = torch.eye(post.n_in, dtype=w.dtype, device=w.device)
            q_s = torch.eye(post.n_out, dtype=w.dtype, device=w.device)
        # 3. EK-FAC diagonal scale
        scale = None
        if self.eigen_corrected and has_factors:
            if new_basis:
                scale = torch.outer(d_s, d_a)
                new["R"] = scale
            elif fresh_stats:
                a, gout = captured[idx]
                r_b = _projected_squares(a.to(w.dtype), gout.to(w.dtype), q_a, q_s,
                                         dtype=self.matmul_dtype)
                scale = group["cov_decay"] * st["R"] + (1.0 - group["cov_decay"]) * r_b
                new["R"] = scale
            else:
                scale = st["R"]
        # 4. damping
        gamma_in = lam / n_data * self._mean_prior_precision(layer, post, w, b)
        gamma = gamma_in + group["extrinsic_damping"]
        pi_split = scale is None and group["damping_mode"] == "pi"

        def split_pi():
            # π² = (tr A / dim A) / (tr S / dim S); read (a device sync) only on the steps
            # that rewrite the posterior or the damped inverses
            mean_a, mean_s = float(d_a.mean()), float(d_s.mean())
            return math.sqrt(mean_a / mean_s) if mean_a > 0 and mean_s > 0 else 1.0
        # 5. posterior (rewritten when the basis, the scale or λ/N and γ_in changed: a
        # kl_weight or dataset_size changed in the param group takes effect at once)
        post_key = (lam / n_data, gamma_in)
        if has_factors and (new_basis or (scale is not None and fresh_stats)
                            or st.get("posterior_key") != post_key):
            new["posterior_key"] = post_key
            if scale is not None:
                d_in = scale + gamma_in
            elif pi_split:
                pi = split_pi()
                d_in = torch.outer(d_s + math.sqrt(gamma_in) / pi, d_a + pi * math.sqrt(gamma_in))
            else:
                d_in = torch.outer(d_s, d_a) + gamma_in
            std = torch.sqrt((lam / n_data) / d_in)
            post_states[post] = {"basis_out": q_s, "basis_in": q_a, "std": std}
        if pi_split and has_factors and (new_basis or st.get("inverse_damping") != gamma):
            # S_γ⁻¹ and A_γ⁻¹ as matrices: two matmuls per step instead of four
            pi = split_pi()
            new["inverse_A"] = (q_a / (d_a + pi * math.sqrt(gamma))) @ q_a.T
            new["inverse_S"] = (q_s / (d_s + math.sqrt(gamma) / pi)) @ q_s.T
            new["inverse_damping"] = gamma
        if new:
            states[w] = new
        # 6. the preconditioned direction (KL clipping and momentum follow in step())
        gw = grads.get(w)
        if gw is None:
            return
        gb = grads.get(b) if b is not None else None
        if b is not None and gb is None:
            gb = torch.zeros_like(b)
        v = post.matrix([gw + prior_terms[w]]
                        + ([gb + prior_terms[b]] if b is not None else []))
        if pi_split and has_factors:
            delta = matmul_chain(new.get("inverse_S", st.get("inverse_S")), v,
                                 new.get("inverse_A", st.get("inverse_A")),
                                 dtype=self.matmul_dtype)
        elif pi_split:
            delta = v / ((1.0 + math.sqrt(gamma)) ** 2)
        else:
            d = (scale if scale is not None else torch.outer(d_s, d_a)) + gamma
            dt = self.matmul_dtype
            delta = matmul_chain(q_s, matmul_chain(q_s.T, v, q_a, dtype=dt) / d, q_a.T,
                                 dtype=dt)
        if group["kl_clip"] is not None:      # (a device sync: only when it is used)
            vg[id(group)] = vg.get(id(group), 0.0) + group["lr"] ** 2 * float((delta * v).sum())
        pending.append((layer, group, delta, st))

    def _diagonal_step(self, grads, prior_terms, means, states):
        stddevs = {}
        if not self._diag_names:
            return stddevs
        sums, seen = {}, 0
        if self._sq is not None:
            sums = self._sq.result()
            seen = self._sq.batch_size
        batch = self._capture.batch_size or 1
        for name in self._diag_names:
            p = self.var_model._mean_of(name)
            g_raw = grads.get(p)
            if g_raw is None:
                continue
            group = self._group_of(p)
            beta1, beta2 = group["betas"]
            lam, n_data = group["kl_weight"], group["dataset_size"]
            st = self.state[p]
            t = st.get("step", 0) + 1
            v = g_raw + prior_terms[p]
            m = st.get("exp_avg")
            m = (1 - beta1) * v if m is None else beta1 * m + (1 - beta1) * v
            if name in sums and seen > 0:
                fisher = sums[name] / seen
            else:
                fisher = batch * g_raw * g_raw
            f = st.get("fisher")
            f = (1 - beta2) * fisher if f is None else beta2 * f + (1 - beta2) * fisher
            m_hat = m / (1 - beta1 ** t)
            f_hat = f / (1 - beta2 ** t)
            gamma_in = (lam / n_data) * self.prior_precision(p)
            means[p] = p - group["lr"] * m_hat / (f_hat + gamma_in + group["extrinsic_damping"])
            stddevs[self.posterior_of(p)] = torch.sqrt((lam / n_data) / (f_hat + gamma_in))
            states[p] = {"exp_avg": m, "fisher": f, "step": t}
        return stddevs


def _nonzero(t):
    return t is not None and bool(t.any())


def _projected_squares(a, g, q_a, q_s, dtype=None):
    """``mean_i (Q_Sᵀ G_i Q_A)²`` with ``G_i = Σ_t g_{i,t} a_{i,t}ᵀ`` (a: B,T,n_in; g: B,T,out);
    ``dtype``: that of the two projections (see ``matmul_dtype``)."""
    ap = matmul_chain(a, q_a, dtype=dtype)
    gp = matmul_chain(g, q_s, dtype=dtype)
    b, t = a.shape[0], a.shape[1]
    if t == 1:
        return (gp[:, 0] ** 2).T @ (ap[:, 0] ** 2) / b
    out = torch.zeros(g.shape[-1], a.shape[-1], dtype=a.dtype, device=a.device)
    chunk = max(1, _CHUNK_NUMBERS // max(1, g.shape[-1] * a.shape[-1]))
    for s in range(0, b, chunk):
        per = gp[s:s + chunk].transpose(1, 2) @ ap[s:s + chunk]
        out += (per * per).sum(0)
    return out / b


class NoisyEKFAC(NoisyKFAC):
    """Noisy EK-FAC: K-FAC's eigenbasis with a re-estimated diagonal scale ``R`` in it (Bae,
    Zhang & Grosse 2018). Same arguments as :class:`NoisyKFAC` (``damping_mode`` is unused: the
    damping is added to ``R``); see the module doc for the update."""

    eigen_corrected = True
