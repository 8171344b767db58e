"""Shared machinery of the natural-gradient optimizers.

Conventions (every optimizer in :mod:`pyvarinf2.optim` follows them):

* The first argument is the :class:`~pyvarinf2.VariationalModel`; the optimizer's parameters are
  the posterior means (the wrapped model's parameters that have a posterior). The posterior
  scales live on the model: after every step the optimizer writes them there
  (:meth:`MeanFieldPosterior.set_stddev`), so the model alone samples, predicts and saves.
* ``dataset_size`` N is given once; the user's loss is the plain mean NLL of the minibatch and
  the prior is the optimizer's business, weighted by ``kl_weight`` λ (1 = the ELBO).
* Priors: a Gaussian prior enters exactly through its precision (the intrinsic damping). Any
  other prior enters through the gradient of its log density at the sampled weights, and its
  moment-matched precision ``1/Var_p[θ]`` is used in the curvature (an approximation, see
  :meth:`~pyvarinf2.priors.Prior.damping_precision`).
* ``step()`` without a closure uses the gradients of the last backward and the weights drawn in
  the last forward; ``step(closure)`` calls the closure ``mc_samples`` times (each call must
  zero the gradients, run forward and backward, and return the loss) and averages.
* Hyper-parameters are validated in ``__init__`` (``ValueError`` naming the argument and the
  value); ``param_groups`` work with ``torch.optim.lr_scheduler``; ``state_dict()`` /
  ``load_state_dict()`` hold everything, so a run resumed with the same RNG state continues
  bit-identically.
* A step that would make any mean or scale non-finite raises :class:`NonFiniteError` and leaves
  the model and the optimizer state untouched.
"""
import math
import numbers
import warnings

import torch

from ..posteriors import MeanFieldPosterior
from ..variational import VariationalModel

__all__ = ["NonFiniteError", "VariationalOptimizer", "check_positive", "check_nonnegative",
           "check_beta", "check_betas", "check_positive_int"]


class NonFiniteError(FloatingPointError):
    """A step would have made a mean or scale non-finite; nothing was changed."""


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive(name, value):
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def check_nonnegative(name, value):
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def check_beta(name, value):
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return value


def check_betas(betas, name="betas"):
    """Validate a pair of decay rates in [0, 1); returns it as floats."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {betas!r}")
    return check_beta(f"{name}[0]", betas[0]) * 1.0, check_beta(f"{name}[1]", betas[1]) * 1.0


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def all_finite_fast(tensors):
    """True when every entry of every tensor is surely finite, decided with one multi-tensor
    call and one synchronisation: a 2-norm is finite iff every entry is (NaN and inf
    propagate), barring an overflow of the norm itself (entries ~1e19 in float32). False means
    "maybe not": the caller's exact per-tensor test then decides (and names the culprit)."""
    if not tensors:
        return True
    try:
        return bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all())
    except RuntimeError:      # several devices, or a dtype without a norm
        return False


class VariationalOptimizer(torch.optim.Optimizer):
    """Base class: binds a variational model's mean-field posteriors to optimizer state."""

    #: moves whenever the state is written other than in place (flat paths cache views of it)
    _state_epoch = 0

    def __init__(self, var_model, defaults, dataset_size, kl_weight=1.0, mc_samples=1):
        self.check_common(var_model, dataset_size, kl_weight, mc_samples, defaults.get("lr"))
        names, params = [], []
        for name in var_model.posterior_parameters():
            names.append(name)
            params.append(var_model._mean_of(name))
        defaults = dict(defaults, dataset_size=int(dataset_size), kl_weight=float(kl_weight),
                        mc_samples=int(mc_samples))
        super().__init__(params, defaults)
        self.var_model = var_model
        self._names = {p: n for n, p in zip(names, params)}
        self._posteriors = {}
        for key, post in var_model.named_posteriors():
            for n in post.names:
                self._posteriors[n] = (key, post)
        var_model.record_noise = True
        var_model.scales_require_grad_(False)
        self._follow_params()       # the parameters' dtypes and devices, to see them change

    def add_param_group(self, param_group):
        """torch.optim's, plus checks once the optimizer is built: the parameters must be
        posterior means of this optimizer's model, and ``lr``, ``dataset_size`` and
        ``kl_weight`` given in the group valid (ValueError before anything changes)."""
        names = self.__dict__.get("_names")
        if names is not None:
            params = param_group.get("params")
            params = [params] if isinstance(params, torch.Tensor) else list(params or [])
            foreign = [p for p in params if p not in names]
            if foreign:
                raise ValueError(
                    f"add_param_group: {len(foreign)} tensor(s) are not posterior means of this "
                    f"{type(self).__name__}'s model (shapes "
                    f"{[tuple(p.shape) for p in foreign][:5]}); an optimizer covers the means "
                    "of the model it was built on")
            for key, check in (("lr", check_positive), ("kl_weight", check_positive),
                               ("dataset_size", check_positive_int)):
                if key in param_group:
                    check(key, param_group[key])
        return super().add_param_group(param_group)

    def __getstate__(self):
        # torch.optim.Optimizer pickles only defaults, state and param_groups: a copy would
        # lose its model, its hooks and its caches and fail (or worse) at its first step
        raise TypeError(
            f"a {type(self).__name__} cannot be copied or pickled: it is bound to its model "
            "(hooks, posteriors). Save opt.state_dict() and load it into a new optimizer built "
            "on the (copied) model.")

    @staticmethod
    def check_common(var_model, dataset_size, kl_weight, mc_samples, lr=None):
        """The checks every variational optimizer makes; subclasses that change the model
        before calling ``__init__`` (NoisyKFAC installs its posteriors) call it first."""
        if not isinstance(var_model, VariationalModel):
            raise TypeError("var_model must be a VariationalModel (from pyvarinf2.variationalize), "
                            f"got {type(var_model).__name__}")
        if var_model.__dict__.get("local_reparameterization"):
            raise ValueError(
                "var_model.local_reparameterization is True: the natural-gradient optimizers "
                "estimate the curvature from one weight sample shared by the batch, which that "
                "setting replaces by per-example pre-activation noise; set it to False")
        check_positive_int("dataset_size", dataset_size)
        check_positive("kl_weight", kl_weight)
        check_positive_int("mc_samples", mc_samples)
        if lr is not None:
            check_positive("lr", lr)

    # ---------------------------------------------------------------- helpers for subclasses
    def name_of(self, p):
        return self._names[p]

    def posterior_of(self, p):
        return self._posteriors[self._names[p]][1]

    def noise_of(self, p):
        """The standard-normal noise ε of the last forward for parameter ``p`` (mean-field)."""
        name = self._names[p]
        key, post = self._posteriors[name]
        record = self.var_model.last_noise
        if record is None or key not in record:
            raise RuntimeError("no weight sample recorded: run a forward pass of the variational "
                               "model in training mode (and backward) before step()")
        return record[key][post.names.index(name)]

    def prior_of(self, p):
        return self.var_model.prior_of(self._names[p])

    def prior_precision(self, p):
        """Per-entry prior precision (exact for Gaussian priors, moment-matched otherwise)."""
        return self.prior_of(p).damping_precision(p.detach())

    def prior_grad(self, p, theta, scale=1.0):
        """``scale · (−∇ log p(θ))`` per entry (``scale · precision · (θ − mean)`` for a
        Gaussian prior)."""
        return self.prior_of(p).neg_log_prob_grad(theta.detach(), scale)

    def mean_field_params(self, group):
        for p in group["params"]:
            if isinstance(self.posterior_of(p), MeanFieldPosterior):
                yield p

    def zero_grad(self, set_to_none=True):
        super().zero_grad(set_to_none=set_to_none)
        self._take_forward_counts()

    def _follow_params(self):
        """After the model moved (``var_model.double()``, ``.to('cuda')``) since the last step,
        bring the optimizer's state along: each floating tensor to its parameter's dtype and
        device, the others to its device (torch.optim's rule for ``load_state_dict``)."""
        sig = self._param_signature()
        previous = self.__dict__.get("_param_sig")
        self.__dict__["_param_sig"] = sig
        if previous is None or previous == sig:
            return
        for p, st in self.state.items():
            for k, v in list(st.items()):
                if torch.is_tensor(v):
                    st[k] = v.to(device=p.device, dtype=p.dtype if v.is_floating_point()
                                 else v.dtype)
        self._state_moved()

    def _state_moved(self):
        """The state tensors were replaced by :meth:`_follow_params`: caches keyed on the
        state are stale."""
        self._state_epoch += 1

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)    # casts the state to each parameter's dtype
        self.__dict__["_param_sig"] = self._param_signature()

    def _param_signature(self):
        return [(p.dtype, p.device) for g in self.param_groups for p in g["params"]]

    def _take_forward_counts(self):
        """``(sampling forwards, forwards at the means)`` with gradient since the last call."""
        d = self.var_model.__dict__
        return d.pop("_fwd_sampled", 0), d.pop("_fwd_mean", 0)

    def check_forwards(self, closure=None):
        """At a step from the last backward (``closure=None``): the forwards with gradient
        since the last step (or ``zero_grad``) must have drawn weights, which the step's
        gradient, curvature and noise all refer to. A forward at the posterior means (the
        model in evaluation mode, ``sampling(False)``) raises before anything changes; several
        sampling forwards warn for an optimizer whose curvature reads the noise of the last one
        (IVON). Subclasses call it first thing in ``step``."""
        self._follow_params()
        sampled, at_mean = self._take_forward_counts()
        if closure is not None:
            return
        name = type(self).__name__
        if sampled == 0 and at_mean > 0:
            raise RuntimeError(self._at_means_message(
                f"{name}.step: the forward(s) since the last step",
                " before the training forward (and use torch.no_grad() for evaluation between "
                "backward and step)"))
        if sampled > 1 and getattr(self, "needs_noise", False):
            warnings.warn(
                f"{name}.step: {sampled} sampling forwards since the last step, each with its "
                "own weight sample; the curvature estimate reads the noise of the last one "
                "only, which the accumulated gradient does not match. For several samples (or "
                "micro-batches) per step use step(closure) with mc_samples, one forward per "
                "closure call.", UserWarning, stacklevel=3)

    def _call_closure(self, closure):
        """One call of a step's closure (with gradient), checked: it must return the loss and
        run the model at a weight sample."""
        self._take_forward_counts()
        with torch.enable_grad():
            loss = closure()
        if loss is None:
            raise TypeError(f"{type(self).__name__}.step(closure): the closure must return "
                            "the loss (it returned None)")
        sampled, at_mean = self._take_forward_counts()
        if sampled == 0 and at_mean > 0:
            raise RuntimeError(self._at_means_message(
                f"{type(self).__name__}.step(closure): the closure", " first"))
        return loss

    @staticmethod
    def _at_means_message(who, when):
        return (f"{who} ran the model at its posterior means (evaluation mode, or "
                "var_model.sampling(False)), not at a weight sample, which the natural-gradient "
                f"step needs; nothing was changed. Call var_model.train(){when}.")

    def run_closure(self, closure, accumulate):
        """Call ``closure`` ``mc_samples`` times; after each call ``accumulate(sample_index)``
        collects what the subclass needs (gradients, noise, curvature). Returns the mean loss."""
        m = self.defaults["mc_samples"]
        total = 0.0
        for i in range(m):
            loss = self._call_closure(closure)
            accumulate(i)
            total = total + (loss.detach() if torch.is_tensor(loss) else loss)
        return total / m

    @torch.no_grad()
    def commit(self, step, means=None, stddevs=None, states=None, posterior_states=None):
        """Check every new tensor for finiteness, then write them all.

        ``means``: {param: new value}; ``stddevs``: {posterior: new std};
        ``states``: {param: {key: new tensor}} written into ``self.state``;
        ``posterior_states``: {posterior: {buffer: new tensor}} for structured posteriors,
        written with ``posterior.set_state(**buffers)`` (a ``'std'`` entry must be > 0).
        """
        means = means or {}
        stddevs = stddevs or {}
        states = states or {}
        posterior_states = posterior_states or {}
        checks = [(f"mean of {self._names[p]}", v) for p, v in means.items()]
        checks += [(f"posterior std of {'/'.join(post.names)}", v) for post, v in stddevs.items()]
        checks += [(f"optimizer state {k!r} of {self._names[p]}", v)
                   for p, st in states.items() for k, v in st.items() if torch.is_tensor(v)]
        checks += [(f"posterior {k} of {'/'.join(post.names)}", v)
                   for post, st in posterior_states.items() for k, v in st.items()]
        for what, value in ([] if all_finite_fast([v for _, v in checks]) else checks):
            if not torch.isfinite(value).all():
                raise NonFiniteError(
                    f"{type(self).__name__} step {step}: the {what} would become non-finite "
                    "(NaN or inf); nothing was changed. The loss or its gradient is probably "
                    "non-finite or exploding: lower lr, raise the damping, or check the data.")
        for post, v in stddevs.items():
            if (v <= 0).any():
                raise NonFiniteError(
                    f"{type(self).__name__} step {step}: the posterior std of "
                    f"{'/'.join(post.names)} would become <= 0; nothing was changed. Raise the "
                    "damping or lower lr.")
        for post, st in posterior_states.items():
            if "std" in st and (st["std"] <= 0).any():
                raise NonFiniteError(
                    f"{type(self).__name__} step {step}: the posterior std of "
                    f"{'/'.join(post.names)} would become <= 0; nothing was changed. Raise the "
                    "damping or lower lr.")
        for p, v in means.items():
            p.copy_(v)
        for post, st in posterior_states.items():
            post.set_state(**st)
        for post, v in stddevs.items():
            post.set_stddev(v)
        for p, st in states.items():
            self.state[p].update(st)
        if states:
            self._state_epoch += 1
