"""``variationalize``: a Gaussian posterior over the weights of any ``nn.Module``.

The wrapped model stays intact and its parameters *are* the posterior means, so exporting the
posterior-mean network is a copy of the user's own module. Every parameter that requires a
gradient (and is not kept deterministic by the user) gets a posterior; tied parameters get one.
The forward pass runs the user's module through ``torch.func.functional_call`` with sampled
weights (training mode), the means (evaluation mode) or a frozen draw (:class:`Sample`).
"""
import contextlib
import copy
import fnmatch
import importlib
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._C._functorch import peek_interpreter_stack as _peek_interpreter_stack
from torch.func import functional_call

from ._fused import gaussian_kl, mean_field_sample
from .posteriors import MeanFieldPosterior, Posterior
from .priors import GaussianPrior, Prior, make_prior

__all__ = ["VariationalModel", "variationalize", "Variationalize", "Sample",
           "register_posterior_family"]

_EXTRA_STATE_VERSION = 1

# Structured posterior families a checkpoint can name in its extra state (``'posteriors'``):
# family -> class, or (module, class name) imported on first use. A family class provides
# ``spec()`` (saved) and ``from_spec(spec, means)`` (rebuilds an equivalent, unloaded posterior).
_POSTERIOR_FAMILIES = {"kronecker": ("pyvarinf2.kronecker", "KroneckerPosterior")}


def register_posterior_family(name, cls):
    """Make ``VariationalModel.load_state_dict`` able to rebuild posteriors of family ``name``."""
    _POSTERIOR_FAMILIES[name] = cls


def _posterior_family(name):
    entry = _POSTERIOR_FAMILIES.get(name)
    if entry is None:
        raise RuntimeError(f"state_dict names an unknown posterior family {name!r}; known: "
                           f"{sorted(_POSTERIOR_FAMILIES)} (register_posterior_family)")
    if isinstance(entry, tuple):
        entry = getattr(importlib.import_module(entry[0]), entry[1])
        _POSTERIOR_FAMILIES[name] = entry
    return entry


def _functorch_active():
    """True inside a ``torch.func`` transform (vmap, grad, jacrev, ...): the fused
    ``autograd.Function`` kernels have no functorch rules there, so the plain path is used."""
    return _peek_interpreter_stack() is not None


def _flat_noise(likes):
    """N(0, 1) tensors shaped like ``likes``: views of one flat ``randn`` per (device, dtype).
    One call instead of one per tensor (each costs a few µs on the CPU), and the optimizers'
    flat paths read the buffer without concatenating it again. A factory call rather than an
    in-place fill, so that ``vmap(randomness='different')`` batches it."""
    groups = {}
    for i, t in enumerate(likes):
        groups.setdefault((t.device, t.dtype), []).append(i)
    out = [None] * len(likes)
    for (device, dtype), idx in groups.items():
        sizes = [likes[i].numel() for i in idx]
        buf = torch.randn(sum(sizes), device=device, dtype=dtype)
        for i, piece in zip(idx, buf.split(sizes)):
            out[i] = piece.view(likes[i].shape)
    return out


def _stamp(t):
    """What tells an in-place change of ``t`` (outside ``.data``): its version counter,
    storage and dtype."""
    return t._version, t.data_ptr(), t.dtype


def _check_prior_fits(prior, named_shapes):
    """A distribution prior must fit every parameter it is given to (ValueError)."""
    check = getattr(prior, "check_fits", None)
    if check is not None:
        for name, shape in named_shapes:
            check(shape, name)


def _check_flag(value, argname):
    if not isinstance(value, bool):
        raise TypeError(f"{argname} must be True or False, got {value!r}")


class _LocalReparameterization:
    """Forward hook of one Linear layer for :meth:`VariationalModel.forward` with
    ``local_reparameterization=True``: adds ``sqrt(x² σ_Wᵀ² + σ_b²) ⊙ ε`` to the output the
    layer computed with its posterior means (σ² = exp(2 log_std), so the scales get their
    gradient through it)."""

    def __init__(self, path, weight_post, bias_post):
        self.path, self.weight_post, self.bias_post = path, weight_post, bias_post
        self.calls = 0

    def __call__(self, module, inputs, output):
        self.calls += 1
        x = inputs[0]
        where = self.path or "<root>"
        if self.calls > 1:
            raise RuntimeError(
                f"local_reparameterization: layer {where!r} ran twice in one forward; its "
                "weights must be the same in both calls, which per-call pre-activation noise "
                "does not give. Set var_model.local_reparameterization = False for this model")
        if x.dim() > 2:
            raise RuntimeError(
                f"local_reparameterization: layer {where!r} got an input of shape "
                f"{tuple(x.shape)}; the trick draws one weight sample per row, so it needs "
                "(batch, features) inputs (positions of one example must share the weights). "
                "Set var_model.local_reparameterization = False for this model")
        var_w = torch.exp(2.0 * self.weight_post.log_std)
        var_b = torch.exp(2.0 * self.bias_post.log_std) if self.bias_post is not None else None
        var = F.linear(x * x, var_w, var_b)
        # clamped away from 0, where the square root's gradient is infinite (a zero input row
        # of a layer without a bias posterior): the gradient is then 0, not NaN
        std = torch.sqrt(var.clamp_min(torch.finfo(var.dtype).tiny))
        return output + std * torch.randn_like(output)


class _ActivationNoise:
    """Hooks of one Linear layer with a Kronecker posterior for :meth:`VariationalModel.forward`
    (see :meth:`VariationalModel.activation_noise_layers`). Each call takes the cheaper way for
    the rows it gets (:meth:`KroneckerPosterior.noise_costs`): through the activations (the
    layer runs with its means and ``x_h Zᵀ = ((x_h Q_A)(std ⊙ E)ᵀ) Q_Sᵀ`` is added to its output)
    or through the weights (the pre-hook hands the call ``M + Z``, ``Z`` formed once per forward
    and shared by every call). Either way the output is that of the sampled weights."""

    def __init__(self, path, posterior, noise, routes):
        self.path, self.posterior, self.noise = path, posterior, noise
        self.calls = 0
        self.routes = routes      # the way each call took, in order ('activations'/'weights')
        self._parts = None
        self._saved = None

    @staticmethod
    def _input(args, kwargs):
        return args[0] if args else kwargs.get("input")

    def pre(self, module, args, kwargs):
        self.calls += 1
        x = self._input(args, kwargs)
        post = self.posterior
        if not torch.is_tensor(x):
            return None
        rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 1
        act, sample = post.noise_costs(rows, x.requires_grad and torch.is_grad_enabled())
        if act < sample:
            self.routes.append("activations")
            return None
        self.routes.append("weights")
        if self._parts is None:
            self._parts = post.split(post.perturbation(self.noise[0]))
        names = ("weight", "bias")[:len(self._parts)]
        self._saved = {n: module._parameters[n] for n in names}
        for n, z in zip(names, self._parts):
            module._parameters[n] = self._saved[n] + z
        return None

    def post(self, module, args, kwargs, output):
        if self._saved is not None:          # the call ran with M + Z
            return None
        x = self._input(args, kwargs)
        if not torch.is_tensor(x) or not torch.is_tensor(output):
            return None
        return output + self.posterior.linear_output_noise(x, self.noise[0]).to(output.dtype)

    def restore(self, module, args, kwargs, output):
        if self._saved is not None:          # put the means back
            module._parameters.update(self._saved)
            self._saved = None
        return None


# modules of torch.nn that read a child layer's weight without calling the layer
_READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoder,
                        nn.TransformerDecoder, nn.TransformerEncoderLayer,
                        nn.TransformerDecoderLayer)


def _torch_nn_only(model):
    """Whether every module of ``model`` is one of torch.nn's own (no user-written forward that
    could read a layer's weight outside the layer) and none reads a child's weight directly."""
    return all(type(m).__module__.startswith("torch.nn.")
               and not isinstance(m, _READS_CHILD_WEIGHTS) for m in model.modules())


def _resolve_owner(model, name):
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    return module, attr


def _matcher(spec, argname):
    """Turn a name pattern, a list of patterns/module types, or a callable into a predicate
    ``(name, module) -> bool``."""
    if spec is None:
        return lambda name, module: False
    if callable(spec) and not isinstance(spec, type):
        return lambda name, module: bool(spec(name, module))
    if isinstance(spec, (str, type)):
        items = [spec]
    else:
        try:
            items = list(spec)
        except TypeError:
            raise TypeError(f"{argname} must be a parameter-name pattern (str), an nn.Module type, "
                            f"a list of those, or a callable (name, module) -> bool, got "
                            f"{spec!r}") from None
    patterns, types = [], []
    for item in items:
        if isinstance(item, str):
            patterns.append(item)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        else:
            raise TypeError(f"{argname} must hold parameter-name patterns (str) or nn.Module "
                            f"types, got {item!r}")
    types = tuple(types)
    return lambda name, module: (any(fnmatch.fnmatchcase(name, p) for p in patterns)
                                 or (bool(types) and isinstance(module, types)))


class VariationalModel(nn.Module):
    """A model with a Gaussian posterior over its weights; see :func:`variationalize`."""

    def __init__(self, model, prior="gaussian", init_std=1e-3, deterministic=None,
                 local_reparameterization=False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, VariationalModel):
            raise TypeError("model is already a VariationalModel")
        if not (isinstance(init_std, (int, float)) and not isinstance(init_std, bool)
                and init_std > 0 and init_std == init_std and init_std != float("inf")):
            raise ValueError(f"init_std must be a finite number > 0, got {init_std!r}")
        _check_flag(local_reparameterization, "local_reparameterization")
        is_deterministic = _matcher(deterministic, "deterministic")
        prior_obj = make_prior(prior) if not isinstance(prior, (tuple, list)) else make_prior(*prior)
        named = list(model.named_parameters())  # duplicates (tied weights) removed
        if not named:
            raise ValueError(f"model has no parameters: {type(model).__name__} cannot be given a "
                             "posterior over its weights")
        aliases = {}                             # a tied tensor is named once per use
        for name, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(name)
        patterns = [deterministic] if isinstance(deterministic, str) else (
            [d for d in deterministic if isinstance(d, str)]
            if isinstance(deterministic, (list, tuple)) else [])
        unmatched = [pat for pat in patterns
                     if not any(fnmatch.fnmatchcase(n, pat) for ns in aliases.values() for n in ns)]
        if unmatched:
            raise ValueError(f"deterministic: pattern(s) {unmatched} match no parameter name of "
                             f"the model (names look like {[n for n, _ in named[:3]]})")
        selected = []
        for name, p in named:
            owner, attr = _resolve_owner(model, name)
            # kept deterministic if any of its names (tied weights) or owners matches
            fixed = any(is_deterministic(alias, _resolve_owner(model, alias)[0])
                        for alias in aliases[id(p)])
            if p.requires_grad and not fixed:
                selected.append((name, p, owner, attr))
        if not selected:
            raise ValueError("model has no trainable parameter left to put a posterior on "
                             "(all have requires_grad=False or match `deterministic`)")
        _check_prior_fits(prior_obj, [(name, p.shape) for name, p, _, _ in selected])
        super().__init__()
        self.model = model
        self.posteriors = nn.Module()
        self._posterior_cache = None  # [(key, posterior)], rebuilt when the tree changes
        self._owners = {}  # parameter name -> (module, attribute), filled lazily
        # functional_call's tie handling scans every parameter on every call: only pay for it
        # when the model really has tied tensors
        self._tied = (len(list(model.named_parameters(remove_duplicate=False))) != len(named)
                      or len(list(model.named_buffers(remove_duplicate=False)))
                      != len(list(model.named_buffers())))
        self._priors = {}
        self._sample_override = None
        self.record_noise = False
        self.last_noise = None
        self.local_reparameterization = local_reparameterization
        self.activation_noise = None
        for name, p, owner, attr in selected:
            post = MeanFieldPosterior(name, p, init_std)
            post._mean_source = (owner, attr)
            self._attach(name, post)
            self._priors[name] = prior_obj

    # ----------------------------------------------------------------- structure
    def __getstate__(self):
        # copies and pickles do not carry the σ of the last sample (it refers to this model's
        # own tensors)
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state.pop("_sigma_cache", None)
        return state

    def __setattr__(self, name, value):
        if name == "posteriors":
            self.__dict__["_posterior_cache"] = None
        elif name == "local_reparameterization":
            _check_flag(value, name)
        elif name == "activation_noise":
            if value is not None:
                _check_flag(value, name)
            self.__dict__.pop("_act_plan", None)
        super().__setattr__(name, value)

    def _attach(self, key, posterior):
        self._posterior_cache = None
        parts = key.split(".")
        container = self.posteriors
        for part in parts[:-1]:
            child = container._modules.get(part)
            if child is None:
                child = nn.Module()
                container.add_module(part, child)
            container = child
        container.add_module(parts[-1], posterior)

    def _detach(self, key):
        self._posterior_cache = None
        parts = key.split(".")
        container = self.posteriors
        for part in parts[:-1]:
            container = container._modules[part]
        del container._modules[parts[-1]]

    def replace_posterior(self, key, posterior):
        """Install ``posterior`` (covering ``posterior.names``) in place of the posteriors of
        those parameters, under ``key`` in the ``posteriors`` tree (e.g. a layer's path).
        Used by optimizers that need a structured family (Kronecker factors)."""
        if not isinstance(posterior, Posterior):
            raise TypeError(f"posterior must be a Posterior, got {type(posterior).__name__}")
        current = dict(self.named_posteriors())
        covered = {}
        for k, post in current.items():
            for n in post.names:
                covered[n] = k
        for n in posterior.names:
            if n not in covered:
                raise ValueError(f"parameter {n!r} has no posterior in this model")
        replaced = {covered[n] for n in posterior.names}
        kept = [k for k in current if k not in replaced
                and (k == key or k.startswith(key + "."))]
        if kept:
            raise ValueError(f"key {key!r} would hide the posteriors {kept} that "
                             f"{type(posterior).__name__} does not cover; choose another key")
        for n in posterior.names:
            k = covered[n]
            if k in current:
                self._detach(k)
                current.pop(k)
        for n in posterior.names:
            owner, attr = _resolve_owner(self.model, n)
            posterior._mean_sources = getattr(posterior, "_mean_sources", {})
            posterior._mean_sources[n] = (owner, attr)
        self._attach(key, posterior)
        return posterior

    def named_posteriors(self):
        """Yield ``(key, posterior)``; for the mean-field family the key is the parameter name.

        ``posterior.mean`` and ``posterior.stddev`` are tensors shaped like the parameter."""
        if self._posterior_cache is None:
            self._posterior_cache = [(key, module) for key, module in
                                     self.posteriors.named_modules()
                                     if isinstance(module, Posterior)]
        return iter(self._posterior_cache)

    def posterior_parameters(self):
        """Names of the parameters that have a posterior, in model order."""
        return [n for _, post in self.named_posteriors() for n in post.names]

    def mean_parameters(self):
        """The posterior means (the wrapped model's parameters that have a posterior)."""
        return [self._mean_of(n) for n in self.posterior_parameters()]

    def scale_parameters(self):
        """The parameters that hold the posterior scales (``log_std`` for the mean-field family)."""
        return [p for _, post in self.named_posteriors() for p in post.parameters()]

    def scales_require_grad_(self, flag=True):
        """Turn gradients for the scales on or off (natural-gradient optimizers set the scales
        themselves and switch them off to save a backward pass)."""
        for p in self.scale_parameters():
            p.requires_grad_(flag)
        if flag:
            self.__dict__.pop("_warned_frozen_scales", None)
        return self

    def _mean_of(self, name):
        entry = self._owners.get(name)
        if entry is None:
            entry = self._owners[name] = _resolve_owner(self.model, name)
        return getattr(*entry)

    # ----------------------------------------------------------------- priors
    def prior_of(self, name):
        """The prior on parameter ``name``."""
        if name not in self._priors:
            raise KeyError(f"parameter {name!r} has no posterior; parameters with one: "
                           f"{list(self._priors)}")
        return self._priors[name]

    def named_priors(self):
        return list(self._priors.items())

    def set_prior(self, prior, *args, parameters=None, **kwargs):
        """Set the prior, for all parameters or those matching ``parameters``.

        ``prior`` is a name with PyVarInf's positional arguments (``'gaussian'``,
        ``'conjugate', n_mc_samples, alpha_0, beta_0, mu_0, kappa_0``,
        ``'conjugate_known_mean', n_mc_samples, mean, alpha_0, beta_0``,
        ``'mixtgauss', n_mc_samples, sigma_1, sigma_2, pi``), a :class:`~pyvarinf2.priors.Prior`
        or any ``torch.distributions.Distribution`` (element-wise). ``parameters`` is a name
        pattern (fnmatch), a list of patterns or module types, or a callable
        ``(name, module) -> bool``. Everything is validated before any prior changes.
        """
        prior_obj = make_prior(prior, *args, **kwargs)
        match = _matcher(parameters, "parameters") if parameters is not None else None
        names = []
        for name in self._priors:
            if match is None or match(name, _resolve_owner(self.model, name)[0]):
                names.append(name)
        if not names:
            raise ValueError(f"parameters={parameters!r} matches no parameter with a posterior; "
                             f"those are {list(self._priors)}")
        _check_prior_fits(prior_obj, [(n, self._mean_of(n).shape) for n in names])
        for name in names:
            self._priors[name] = prior_obj
        return self

    def prior_loss(self):
        """KL(q || prior) summed over all parameters, in nats (add ``prior_loss() / N``).

        Mean-field posteriors with Gaussian priors go through one fused closed-form kernel;
        every other (posterior, prior) pair computes its own KL (closed form or Monte Carlo).
        After a training forward it reuses that forward's σ = exp(log_std) while the scales'
        version counters say they are unchanged (an optimizer step or any in-place change under
        ``torch.no_grad()`` invalidates it). Like autograd's own saved tensors, an edit through
        ``.data`` between the forward and this call is not seen: edit under ``torch.no_grad()``.

        Warns once (``UserWarning``) when called with gradients enabled while the scales do not
        require grad, as after a natural-gradient optimizer was built on this model: a
        gradient-based optimizer would then leave the scales where they are."""
        if torch.is_grad_enabled() and not self.__dict__.get("_warned_frozen_scales"):
            scales = self.scale_parameters()
            if scales and not any(p.requires_grad for p in scales):
                self.__dict__["_warned_frozen_scales"] = True
                if self.record_noise:
                    message = (
                        "prior_loss() with gradients enabled while a natural-gradient optimizer "
                        "drives this model: that optimizer adds the prior itself, so "
                        "prior_loss()/N in the loss counts the prior twice. Give it the plain "
                        "mean loss, and call prior_loss() under torch.no_grad() to log the KL. "
                        "(For Bayes-by-backprop, build no natural-gradient optimizer on the "
                        "model and call var_model.scales_require_grad_(True).)")
                else:
                    message = (
                        "prior_loss(): the posterior scales of this model do not require grad, "
                        "so a gradient-based optimizer will not train them. For "
                        "Bayes-by-backprop call var_model.scales_require_grad_(True) first.")
                warnings.warn(message, UserWarning, stacklevel=2)
        total = None
        fast = ([], [], [], [])  # means, log stds, prior stds, prior means
        fused = not _functorch_active()
        for _, post in self.named_posteriors():
            means = [self._mean_of(n) for n in post.names]
            priors = [self._priors[n] for n in post.names]
            if fused and type(post) is MeanFieldPosterior and type(priors[0]) is GaussianPrior:
                fast[0].append(means[0])
                fast[1].append(post.log_std)
                fast[2].append(priors[0].resolve_std(means[0]))
                fast[3].append(priors[0].mean)
                continue
            kl = post.kl(means, priors)
            total = kl if total is None else total + kl
        if fast[0]:
            kl = gaussian_kl(*fast, sigmas=self._cached_sigmas(fast[1]))
            total = kl if total is None else total + kl
        return total

    # ----------------------------------------------------------------- sampling
    def sample_parameters(self, skip=()):
        """Draw one weight sample: ``{name: tensor}`` for every parameter with a posterior
        (except the posteriors whose key is in ``skip``).

        Mean-field posteriors are sampled together by one fused kernel
        (:mod:`pyvarinf2._fused`); other families sample themselves."""
        return self._sample(skip)[0]

    def _sample(self, skip=(), defer=()):
        """:meth:`sample_parameters`; the posteriors whose key is in ``defer`` draw (and record)
        their noise in the same order but return their means: ``(params, {key: noise})``."""
        out, deferred = {}, {}
        record = {} if self.record_noise else None
        mf_keys, mf_posts, mf_names, mf_means, mf_log_stds = [], [], [], [], []
        fused = not _functorch_active()
        for key, post in self.named_posteriors():
            if key in skip:
                continue
            means = [self._mean_of(n) for n in post.names]
            if type(post) is MeanFieldPosterior:
                mf_keys.append(key)
                mf_posts.append(post)
                mf_names.append(post.names[0])
                mf_means.append(means[0])
                mf_log_stds.append(post.log_std)
                continue
            noise = post.draw_noise(means)
            if record is not None:
                record[key] = noise
            if key in defer:
                deferred[key] = noise
                out.update(zip(post.names, means))
                continue
            for n, t in zip(post.names, post.sample(means, noise)):
                out[n] = t
        if mf_means:
            # the same draw inside and outside torch.func transforms
            mf_eps = _flat_noise(mf_means)
            if record is not None:
                for key, eps in zip(mf_keys, mf_eps):
                    record[key] = [eps]
        if mf_means and not fused:
            for post, mean, eps in zip(mf_posts, mf_means, mf_eps):
                (out[post.names[0]],) = post.sample([mean], [eps])
        elif mf_means:
            if torch.is_grad_enabled() and any(t.requires_grad for t in mf_log_stds):
                sigmas = []
                samples = mean_field_sample(mf_means, mf_log_stds, mf_eps, sigmas)
            else:
                # no gradient to the scales (the natural-gradient optimizers set the scales
                # themselves, or a no-grad block): θ = μ + σ ε as one multi-tensor op that
                # autograd differentiates in C++ (identity for μ), with no Python-level node
                with torch.no_grad():
                    sigmas = torch._foreach_exp(mf_log_stds)
                # the same fused multiply-add as the kernel: bit-identical samples
                samples = torch._foreach_addcmul(mf_means, sigmas, mf_eps)
            for n, t in zip(mf_names, samples):
                out[n] = t
            # the KL of the same step reuses σ while the log stds are unchanged
            self.__dict__["_sigma_cache"] = (
                mf_log_stds, [_stamp(t) for t in mf_log_stds], sigmas,
                {id(t): i for i, t in enumerate(mf_log_stds)})
        if record is not None:
            self.last_noise = record
        return out, deferred

    def _cached_sigma(self, log_std):
        """σ = exp(log_std) of the last sample for this very tensor, if it is unchanged since
        (version counter, storage, dtype), else ``None``."""
        cache = self.__dict__.get("_sigma_cache")
        i = cache[3].get(id(log_std)) if cache is not None else None
        if i is None or cache[0][i] is not log_std or _stamp(log_std) != cache[1][i]:
            return None
        return cache[2][i]

    def _cached_sigmas(self, log_stds):
        """σ = exp(log_std) of the last sample if it covered exactly these, unchanged, tensors."""
        cache = self.__dict__.get("_sigma_cache")
        if cache is None or len(cache[0]) != len(log_stds):
            return None
        sigmas = [self._cached_sigma(t) for t in log_stds]
        if any(a is not b for a, b in zip(cache[0], log_stds)) or any(v is None for v in sigmas):
            return None
        return sigmas

    def is_sampling(self):
        if self._sample_override is not None:
            return self._sample_override
        return self.training

    @contextlib.contextmanager
    def sampling(self, enabled=True):
        """Within the block, forward draws weights (``enabled=True``) or uses the means,
        whatever the train/eval mode (which still governs dropout and BatchNorm)."""
        previous = self._sample_override
        self._sample_override = bool(enabled)
        try:
            yield self
        finally:
            self._sample_override = previous

    def forward(self, *args, **kwargs):
        if self.record_noise and torch.is_grad_enabled() and not _functorch_active():
            # an optimizer that reads the noise checks, at its step, that the forwards with
            # gradient since its last step drew weights (and how many)
            key = "_fwd_sampled" if self.is_sampling() else "_fwd_mean"
            self.__dict__[key] = self.__dict__.get(key, 0) + 1
        if not self.is_sampling():
            return self.model(*args, **kwargs)
        if self.training and self.__dict__.get("local_reparameterization") \
                and not _functorch_active():
            # a training-time estimator: sampling in evaluation mode (the predictive helpers,
            # ``sampling(True)``) draws whole weight samples
            return self._local_reparameterization_forward(args, kwargs)
        plan = self._activation_noise_plan()
        if plan:
            return self._activation_noise_forward(plan, args, kwargs)
        params = self.sample_parameters()
        return functional_call(self.model, params, args, kwargs, strict=False,
                               tie_weights=self._tied)

    # ----------------------------------------------------------------- noise through activations
    def activation_noise_layers(self):
        """The Linear layers that take their Kronecker noise per call through the cheaper of two
        exact ways, with ``var_model.activation_noise`` on: ``[(path, module, posterior key,
        posterior)]``.

        A Linear layer's output under the sampled weights ``M + Z``, ``Z = Q_S (std ⊙ E) Q_Aᵀ``
        (:mod:`pyvarinf2.kronecker`), is its output under ``M`` plus
        ``((x_h Q_A)(std ⊙ E)ᵀ) Q_Sᵀ``: the same draw ``E``, without the two dense products that
        form ``Z``. Each call takes that route when it costs fewer flops for the rows it gets
        (:meth:`KroneckerPosterior.noise_costs`; e.g. a 784-400 layer at batch 128: 0.28
        against 0.74 GFlop per draw), else it runs with ``M + Z``. The choice depends on input
        shapes only, so runs repeat exactly. What it needs: nothing but the layer's own forward
        reads its weight (a tied decoder reading ``enc.weight`` directly would see the mean).

        ``activation_noise``: ``None`` (default) uses it when every module of the wrapped model
        is one of torch.nn's own (``nn.Sequential`` of layers: no user-written forward to read
        a weight, no attention/Transformer module, which reads its projections' weights);
        ``True`` for every qualifying layer, on your word that nothing else reads them;
        ``False`` never. A layer qualifies when it is a plain ``nn.Linear`` (its own
        ``forward``) whose weight (and bias, if in the posterior) no other module holds,
        outside an attention module, and outside a module whose per-example gradients an
        optimizer recomputes with ``torch.func`` (which would not see the noise)."""
        cached = self._cached_plan("_act_plan")
        if cached is not None:
            return cached
        counts, foreign = self._use_counts()
        excluded = self.__dict__.get("_act_excluded", set())
        plan = []
        for key, post in self.named_posteriors():
            if getattr(post, "family", None) != "kronecker" or len(post.weight_shape) != 2:
                continue
            path, _, attr = post.names[0].rpartition(".")
            if attr != "weight" or any((path + ".").startswith(f) for f in foreign):
                continue
            try:
                module = self.model.get_submodule(path)
            except AttributeError:
                continue
            if type(module).forward is not nn.Linear.forward or not isinstance(module, nn.Linear) \
                    or id(module) in excluded:
                continue
            prefix = path + "." if path else ""
            if counts.get(id(module.weight), 0) != 1 or (
                    post.has_bias and (post.names[1] != prefix + "bias"
                                       or counts.get(id(module.bias), 0) != 1)):
                continue
            plan.append((path, module, key, post))
        self.__dict__["_act_plan"] = (self._posterior_cache, plan)
        return plan

    def _keep_activation_noise_out(self, modules):
        """Exclude every Linear layer inside ``modules`` (e.g. those an optimizer re-runs
        through ``torch.func``) from :meth:`activation_noise_layers`."""
        ids = {id(m) for mod in modules for m in mod.modules() if isinstance(m, nn.Linear)}
        if not ids <= self.__dict__.get("_act_excluded", set()):
            self.__dict__["_act_excluded"] = self.__dict__.get("_act_excluded", set()) | ids
            self.__dict__.pop("_act_plan", None)

    def _cached_plan(self, attr):
        """A layer plan stored under ``attr``, if the posterior list is still the same."""
        cache = self.__dict__.get(attr)
        if cache is not None and self._posterior_cache is not None \
                and cache[0] is self._posterior_cache:
            return cache[1]
        return None

    def _use_counts(self):
        """``({id(parameter): uses}, [prefixes of nn.MultiheadAttention modules])``: a layer
        plan needs weights used by one module, and MultiheadAttention reads its out_proj's
        weight without calling out_proj."""
        counts = {}
        for _, p in self.model.named_parameters(remove_duplicate=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
        foreign = [path + "." if path else "" for path, module in self.model.named_modules()
                   if isinstance(module, nn.MultiheadAttention)]
        return counts, foreign

    def _activation_noise_plan(self):
        """The layers of :meth:`activation_noise_layers` for this forward, if the route is on."""
        flag = self.__dict__.get("activation_noise")
        if flag is False or _functorch_active():
            return []
        if flag is None:
            auto = self.__dict__.get("_act_auto")
            if auto is None or auto[0] is not self._posterior_cache:
                auto = (self._posterior_cache, _torch_nn_only(self.model))
                self.__dict__["_act_auto"] = auto
            if not auto[1]:
                return []
        return self.activation_noise_layers()

    def _activation_noise_forward(self, plan, args, kwargs):
        params, noises = self._sample(defer={key for _, _, key, _ in plan})
        routes = {}
        hooks = [(module, _ActivationNoise(path, post, noises[key], routes.setdefault(path, [])))
                 for path, module, key, post in plan]
        self.__dict__["_last_routes"] = routes    # {path: the way of each call} (tests, logs)

        def register(module, hook):
            # the noise first, so that every other hook of the layer (K-FAC's capture, its
            # true-Fisher labels) sees the output of the sampled weights; the means put back
            # last, so that other hooks see M + Z where the call ran with it
            return [module.register_forward_pre_hook(hook.pre, with_kwargs=True, prepend=True),
                    module.register_forward_hook(hook.post, with_kwargs=True, prepend=True),
                    module.register_forward_hook(hook.restore, with_kwargs=True)]

        return self._forward_with_hooks(
            params, args, kwargs, hooks, register, "_act_warned", message=(
                "Kronecker posterior: layer(s) {} did not run their forward in this pass. If "
                "the model reads their weights some other way, that use saw the posterior "
                "mean, not a sample: set var_model.activation_noise = False for this model."))

    def _forward_with_hooks(self, params, args, kwargs, hooks, register, warned_key, message):
        """``functional_call`` with each ``(module, hook)`` registered (``register(module,
        hook)`` returns the handles) for this call only; warns once per layer whose hook never
        ran (``message.format(layers)``)."""
        handles = []
        try:
            for module, hook in hooks:
                handles.extend(register(module, hook))
            out = functional_call(self.model, params, args, kwargs, strict=False,
                                  tie_weights=self._tied)
        finally:
            for h in handles:
                h.remove()
        silent = [h.path or "<root>" for _, h in hooks if h.calls == 0]
        warned = self.__dict__.setdefault(warned_key, set())
        if silent and not set(silent) <= warned:
            warned.update(silent)
            warnings.warn(message.format(silent), UserWarning, stacklevel=4)
        return out

    # ----------------------------------------------------------------- local reparameterisation
    def local_reparameterization_layers(self):
        """The ``nn.Linear`` layers that ``local_reparameterization=True`` samples through their
        pre-activations: ``[(path, module, weight key, bias key or None)]``. A layer qualifies
        when it is a plain ``nn.Linear`` (its own ``forward``) whose weight has a mean-field
        posterior used by no other module, and whose bias is absent, deterministic or
        mean-field; the ``out_proj`` of ``nn.MultiheadAttention``, which reads the weight without
        calling the layer, is left out. Every other parameter is sampled as usual (one draw per
        forward). A forward in which a listed layer does not run warns once: if the model
        reads that weight some other way, that use saw the posterior mean."""
        cached = self._cached_plan("_lrt_plan")
        if cached is not None:
            return cached
        mean_field = {key: post for key, post in self.named_posteriors()
                      if type(post) is MeanFieldPosterior}
        counts, foreign = self._use_counts()
        plan = []
        for path, module in self.model.named_modules():
            if type(module).forward is not nn.Linear.forward or not isinstance(module, nn.Linear):
                continue
            if any(path.startswith(f) for f in foreign):
                continue
            prefix = path + "." if path else ""
            w_key, b_key = prefix + "weight", prefix + "bias"
            if w_key not in mean_field or counts.get(id(module.weight), 0) != 1:
                continue
            if module.bias is not None and b_key in self._priors and b_key not in mean_field:
                continue  # a bias with another posterior family
            if module.bias is not None and counts.get(id(module.bias), 0) != 1:
                continue
            plan.append((path, module, w_key, b_key if b_key in mean_field else None))
        self.__dict__["_lrt_plan"] = (self._posterior_cache, plan)
        return plan

    def _local_reparameterization_forward(self, args, kwargs):
        """Train-mode forward with the local reparameterisation trick (Kingma et al. 2015) in
        the qualifying Linear layers: their output is ``x Mᵀ + b̄ + sqrt(x² σ_Wᵀ² + σ_b²) ⊙ ε``
        with ε drawn per example, the exact marginal of ``x Wᵀ + b`` under the mean-field
        posterior; each example thereby gets its own weights in those layers."""
        if self.record_noise:
            raise RuntimeError(
                "local_reparameterization=True draws pre-activations per example, but an "
                "optimizer that reads the weight noise (the natural-gradient optimizers) drives "
                "this model; set var_model.local_reparameterization = False")
        plan = self.local_reparameterization_layers()
        posts = dict(self.named_posteriors())
        params = self.sample_parameters(skip={k for _, _, w, b in plan for k in (w, b) if k})
        hooks = []
        for path, module, w_key, b_key in plan:
            params[w_key] = self._mean_of(w_key)
            if b_key is not None:
                params[b_key] = self._mean_of(b_key)
            hooks.append((module, _LocalReparameterization(
                path, posts[w_key], posts[b_key] if b_key is not None else None)))
        return self._forward_with_hooks(
            params, args, kwargs, hooks, lambda m, h: [m.register_forward_hook(h)],
            "_lrt_warned", message=(
                "local_reparameterization: layer(s) {} did not run their forward in this pass. "
                "If the model reads their weights some other way (as nn.MultiheadAttention "
                "does with out_proj), that use saw the posterior mean, not a sample: set "
                "var_model.local_reparameterization = False for this model"))

    # ----------------------------------------------------------------- export / persistence
    def mean_model(self):
        """A deep copy of the wrapped model (the user's own class) holding the posterior means."""
        return copy.deepcopy(self.model)

    export_mean_model = mean_model

    def get_extra_state(self):
        state = {"version": _EXTRA_STATE_VERSION,
                 "priors": {name: prior.spec() for name, prior in self._priors.items()}}
        structured = {key: post.spec() for key, post in self.named_posteriors()
                      if getattr(post, "family", None) is not None}
        if structured:  # e.g. Kronecker posteriors: rebuilt in a fresh model on load
            state["posteriors"] = structured
        return state

    def _posterior_snapshot(self):
        return list(self.named_posteriors())

    def _restore_posteriors(self, snapshot):
        self.posteriors = nn.Module()
        for key, post in snapshot:
            self._attach(key, post)

    def _adopt_posterior_families(self, extra):
        """Install the structured posteriors (Kronecker, ...) that a checkpoint's extra state
        lists and this model lacks, so a freshly variationalized model can load it. Returns a
        snapshot to undo the change, or ``None`` when nothing changed."""
        specs = extra.get("posteriors") if isinstance(extra, dict) else None
        if not specs:
            return None
        current = dict(self.named_posteriors())
        todo = []
        for key, spec in specs.items():
            post = current.get(key)
            if post is not None and getattr(post, "family", None) == spec.get("family") \
                    and list(post.names) == list(spec.get("names", ())):
                continue
            cls = _posterior_family(spec.get("family"))
            try:
                means = [self._mean_of(n) for n in spec["names"]]
            except AttributeError as exc:
                raise RuntimeError(f"state_dict has a {spec.get('family')} posterior for "
                                   f"{spec['names']}, which this model does not have") from exc
            todo.append((key, cls.from_spec(spec, means)))
        if not todo:
            return None
        snapshot = self._posterior_snapshot()
        try:
            for key, post in todo:
                self.replace_posterior(key, post)
        except Exception:
            self._restore_posteriors(snapshot)
            raise
        return snapshot

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # when loaded as a submodule of a bigger model (our load_state_dict is not called)
        try:
            self._adopt_posterior_families(state_dict.get(prefix + "_extra_state"))
        except (RuntimeError, ValueError) as exc:
            error_msgs.append(str(exc))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def set_extra_state(self, state):
        if not isinstance(state, dict) or "priors" not in state:
            raise RuntimeError("state_dict holds no pyvarinf2 prior settings (_extra_state)")
        priors = state["priors"]
        if set(priors) != set(self._priors):
            missing = sorted(set(self._priors) - set(priors))
            extra = sorted(set(priors) - set(self._priors))
            raise RuntimeError(f"state_dict priors do not match this model: missing {missing}, "
                               f"unexpected {extra}")
        self._priors = {name: make_prior(kind, **settings)
                        for name, (kind, settings) in priors.items()}

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Like ``nn.Module.load_state_dict``, but checks the whole state (names and shapes)
        before changing anything, so a state_dict from another architecture leaves the model
        as it was and the error says what does not match.

        Structured posteriors (Kronecker) named in the checkpoint's extra state are installed
        first, so a freshly variationalized model loads them; they are undone on failure."""
        snapshot = self._adopt_posterior_families(state_dict.get("_extra_state"))
        try:
            return self._load_state_dict_checked(state_dict, strict, assign)
        except Exception:
            if snapshot is not None:
                self._restore_posteriors(snapshot)
            raise

    def _load_state_dict_checked(self, state_dict, strict, assign):
        own = self.state_dict()
        if strict:
            missing = [k for k in own if k not in state_dict]
            unexpected = [k for k in state_dict if k not in own]
            if missing or unexpected:
                raise RuntimeError("state_dict does not match this variational model: "
                                   f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                                   f"unexpected keys {unexpected[:10]}"
                                   f"{' ...' if len(unexpected) > 10 else ''}")
        not_tensors = [f"{k} ({type(state_dict[k]).__name__})" for k, v in own.items()
                       if torch.is_tensor(v) and k in state_dict
                       and not torch.is_tensor(state_dict[k])]
        if not_tensors:
            raise RuntimeError("state_dict does not match this variational model: these entries "
                               "must be tensors: " + ", ".join(not_tensors[:10]))
        bad = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
               for k, v in own.items() if torch.is_tensor(v) and k in state_dict
               and torch.is_tensor(state_dict[k]) and state_dict[k].shape != v.shape]
        if bad:
            raise RuntimeError("state_dict does not match this variational model, shape "
                               "mismatch for " + "; ".join(bad[:10]))
        extra_key = "_extra_state"
        if extra_key in state_dict:
            probe = copy.copy(self)
            probe._priors = dict(self._priors)
            VariationalModel.set_extra_state(probe, state_dict[extra_key])  # validates
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def variationalize(model, prior="gaussian", init_std=1e-3, deterministic=None,
                   local_reparameterization=False):
    """Wrap ``model`` with a mean-field Gaussian posterior over its weights.

    Args:
        model: any ``nn.Module``. Its parameters become the posterior means (it is not copied).
        prior: the prior for every parameter: a name (``'gaussian'`` by default, see
            :meth:`VariationalModel.set_prior`), a :class:`~pyvarinf2.priors.Prior` or a
            ``torch.distributions.Distribution``.
        init_std: initial posterior standard deviation of every weight.
        deterministic: parameters to keep as point estimates: a name pattern (fnmatch, e.g.
            ``'*.bias'``), a module type (e.g. ``nn.BatchNorm2d``), a list of those, or a callable
            ``(name, module) -> bool``. Parameters with ``requires_grad=False`` stay fixed.
        local_reparameterization: opt-in, for Bayes-by-backprop. In training mode the plain
            ``nn.Linear`` layers with mean-field posteriors (see
            :meth:`VariationalModel.local_reparameterization_layers`) then draw their
            pre-activations per example from their exact Gaussian marginal instead of sharing one
            weight sample across the batch (Kingma, Salimans & Welling 2015): the same expected
            loss, with lower-variance gradients. Needs (batch, features) inputs to those layers,
            each layer run once per forward; not for the natural-gradient optimizers, which need
            the shared sample. Also settable later as ``var_model.local_reparameterization``.

    Returns:
        a :class:`VariationalModel`. In training mode every forward draws fresh weights (one
        sample shared by the batch, unless ``local_reparameterization``); in evaluation mode it
        uses the posterior means. The predictive helpers always draw whole weight samples.
    """
    return VariationalModel(model, prior=prior, init_std=init_std, deterministic=deterministic,
                            local_reparameterization=local_reparameterization)


Variationalize = variationalize


class Sample(nn.Module):
    """A frozen draw from a variational model (PyVarInf's ``Sample``).

    ``draw()`` samples the weights once; every call then reuses them until the next ``draw()``.
    Before the first ``draw()`` the posterior means are used. Buffers (BatchNorm statistics)
    are the model's own, used and updated as the model's train/eval mode says.
    """

    def __init__(self, var_model):
        if not isinstance(var_model, VariationalModel):
            raise TypeError("var_model must be a VariationalModel (from variationalize), got "
                            f"{type(var_model).__name__}")
        super().__init__()
        self.var_model = var_model
        self.params = None

    def draw(self):
        """Draw the weights: a posterior sample of every random parameter, and a copy of every
        deterministic one, so that later training of the model does not change the draw. The
        noise record a natural-gradient optimizer reads (``last_noise``) is left as it was."""
        vm = self.var_model
        last = vm.last_noise
        try:
            with torch.no_grad():
                params = {n: t.detach() for n, t in vm.sample_parameters().items()}
                for n, p in vm.model.named_parameters():
                    if n not in params:
                        params[n] = p.detach().clone()
        finally:
            vm.last_noise = last
        self.params = params
        return self

    def _apply(self, fn, *args, **kwargs):
        # .to(device), .double(), ... convert the drawn weights with the model
        super()._apply(fn, *args, **kwargs)
        if self.params is not None:
            self.params = {n: fn(t) for n, t in self.params.items()}
        return self

    def forward(self, *args, **kwargs):
        if self.params is None:
            return self.var_model.model(*args, **kwargs)
        return functional_call(self.var_model.model, self.params, args, kwargs, strict=False)
