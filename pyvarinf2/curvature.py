"""Curvature estimators shared by the natural-gradient optimizers.

Per-example squared gradients
=============================
:class:`PerExampleSquaredGradients` collects, for chosen parameters, the sum over the examples of
a minibatch of the *squared per-example gradients*

    S[name] = Σ_i g_i ⊙ g_i,      g_i = ∂ℓ_i / ∂θ   (ℓ_i the loss of example i),

from one ordinary ``loss.backward()`` — no loop over examples. ``S / B`` is the diagonal of the
empirical Fisher (the Gauss-Newton estimate of VOGN and of noisy Adam), as opposed to the
squared minibatch gradient ``(Σ_i g_i / B)²``, which underestimates it by up to a factor B.

How it works: forward hooks on the modules that own the parameters capture each call's inputs
(and, inside :class:`~pyvarinf2.VariationalModel`, the *sampled* weights, which
``functional_call`` swaps in); a hook on the call's output receives ``∂L/∂output`` during the
backward pass. From the two, per layer type:

* ``nn.Linear`` (any number of leading dims; dims between the batch and the features, e.g. a
  sequence, are summed per example before squaring): weight ``Σ_i (g_i²)ᵀ(a_i²)``, one matmul,
  when there are no extra dims; bias ``Σ_i g_i²``.
* ``nn.Conv1d`` / ``nn.Conv2d`` (zero padding, any stride, dilation, groups): one grouped
  convolution of the inputs with the output gradients, the batch folded into the groups
  (2-3x faster on CPU than ``unfold`` + batched matmul).
* ``nn.BatchNorm*`` / ``nn.LayerNorm`` / ``nn.GroupNorm`` affine parameters: closed form from the
  normalised input ``x̂`` (BatchNorm in training mode uses the batch statistics as constants: the
  usual "individual gradient" of a BatchNorm layer, see below).
* ``nn.Embedding``: per-example row sums by ``index_add`` (``padding_idx`` rows get nothing).
* any other module (``nn.Conv3d``, transposed convolutions, ``nn.PReLU``, ``nn.Bilinear``,
  recurrent layers, user modules, ``nn.MultiheadAttention`` as one unit, ...): ``torch.func``
  — ``vmap`` over the examples of ``vjp`` of the module's own forward at the captured input and
  sampled weights (one ``vjp`` per example where a kernel has no batching rule, e.g. the fused
  GRU/LSTM kernels). It assumes the module treats examples independently.

A module called several times in one forward (weight sharing inside a model, an RNN cell in a
Python loop) gets exact results: the per-example gradients of the calls are added before
squaring. A parameter used *outside* the forward of the module that owns it (e.g.
``F.linear(x, self.emb.weight)`` in a parent's forward) is not seen; the optimizers raise an
error when a parameter has a gradient but no per-example record.

Conventions:

* The batch dimension is dim 0 (``batch_first=False`` recurrent layers and attention: dim 1).
* ``loss_reduction='mean'`` (default): the loss is ``(1/B) Σ_i ℓ_i``, and the collector
  multiplies the output gradients by B to undo the ``1/B``; ``'sum'``: the loss is ``Σ_i ℓ_i``.
* BatchNorm in training mode: examples interact through the batch statistics, so a per-example
  gradient is not defined; like BackPACK and Opacus's notion of individual gradients, the
  statistics are treated as constants: ``g_i = Σ_{spatial} (∂L/∂y_i) x̂_i``.
* Several forward/backward passes between two :meth:`reset` calls (gradient accumulation)
  accumulate: :meth:`result` sums over all examples seen and :attr:`batch_size` counts them.

Which gradients (``fisher=``):

* ``'empirical'`` (default): the gradients of the user's own loss, taken by hooks during the
  user's ``backward()`` — ``S / B`` is the empirical Fisher diagonal.
* ``'true'``: the gradients of ``(1/B) Σ_i NLL(f_i, ỹ_i)`` with labels ``ỹ_i`` drawn from the
  model's own predictive (``likelihood='categorical'``: ``ỹ ~ softmax(f)``; ``'gaussian'``:
  ``ỹ ~ N(f, obs_noise²)``). A hook on the root model runs one extra ``torch.autograd.grad``
  *inside the forward*, with only the hooked layers' outputs as inputs (no weight gradients),
  and the squares are formed at once; the user's backward is untouched. ``S / B`` is then a
  one-sample Monte-Carlo estimate of the diagonal of the *true* Fisher, which for these
  likelihoods equals the generalised Gauss-Newton matrix ``Jᵀ ∇²ℓ J`` — the expected Hessian
  that the natural-gradient VI fixed point asks for. The empirical Fisher is not: for an
  example the model already fits with probability p, its square scales like ``(1 - p)²``
  where the Gauss-Newton term scales like ``p (1 - p)``, so as training fits the data the
  empirical estimate collapses, the posterior variance grows back towards the prior and a
  Newton step ``ĝ / Ĥ`` grows like ``1 / (1 - p)`` (Kunstner et al. 2019). The extra cost is
  the input-gradient half of one backward pass.

Usage::

    with PerExampleSquaredGradients(model) as sq:          # or a VariationalModel
        loss = F.cross_entropy(model(x), y)                 # mean over the batch
        loss.backward()
    sums = sq.result()                                      # {param name: Σ_i g_i²}
    fisher_diag = {n: s / sq.batch_size for n, s in sums.items()}

or, persistently (what :class:`~pyvarinf2.optim.VOGN` and :class:`~pyvarinf2.optim.NoisyAdam`
do): ``sq.attach()`` once, then ``sq.result()`` and ``sq.reset()`` around every step, and
``sq.detach()`` at the end.

Reparameterisation Hessian estimate
===================================
:func:`reparam_hessian_estimate` is IVON's (Shen et al. 2024) estimate of the diagonal Hessian
from a gradient at a Gaussian sample: ``ĥ = ĝ ⊙ ε / σ`` (Stein's lemma; unbiased for
``E_q[diag ∇²ℓ]``, no per-example gradients).
"""
import functools
import inspect
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["PerExampleSquaredGradients", "per_example_squared_gradients",
           "reparam_hessian_estimate", "sampled_nll"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
# modules whose parameters are used by the module's own forward as one unit (their children are
# not called as modules, e.g. MultiheadAttention's out_proj)
_OPAQUE = (nn.MultiheadAttention, nn.RNNBase)


def _is_plain(module, classes):
    """``module`` is one of torch's ``classes`` computing with torch's own forward: a subclass
    that redefines ``forward`` (or a convolution's ``_conv_forward``), e.g. a masked Linear or
    a weight-standardised convolution, computes something else, and gets the generic
    torch.func path instead of the closed forms."""
    if not isinstance(module, classes):
        return False
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn."):
            return True
        if "forward" in cls.__dict__ or "_conv_forward" in cls.__dict__:
            return False
    return True


def reparam_hessian_estimate(grad, noise, std):
    """``ĝ ⊙ ε / σ``: IVON's unbiased estimate of the expected diagonal Hessian at a sample
    ``θ = μ + σ ε`` (``grad`` taken at θ)."""
    return grad * noise / std


def sampled_nll(output, likelihood="categorical", obs_noise=1.0):
    """``(1/B) Σ_i NLL(output_i, ỹ_i)`` with ``ỹ`` drawn from the model's own predictive: a batch
    mean, like the user's loss (``B = output.shape[0]``).

    ``likelihood='categorical'``: ``output`` holds logits or log-probabilities over dim 1
    (``(B, C, ...)``) and ``ỹ ~ softmax(output)``; ``'gaussian'``: ``output`` is the mean and
    ``ỹ ~ N(output, obs_noise²)`` (``obs_noise`` a number, a tensor or a callable returning one).
    The labels are drawn from the global generator without gradient.
    """
    f = output
    batch = f.shape[0] if f.dim() > 0 else 1
    if likelihood == "categorical":
        if f.dim() < 2:
            raise ValueError("likelihood='categorical' needs outputs of shape (B, C, ...), "
                             f"got {tuple(f.shape)}")
        with torch.no_grad():
            logits = f.detach().movedim(1, -1).reshape(-1, f.shape[1])
            probs = torch.softmax(logits.float(), dim=-1)
            bad = ~torch.isfinite(probs).all(-1)
            if bad.any():  # keep sampling; the NaN reaches g and the optimizer's guard
                probs[bad] = 1.0 / probs.shape[-1]
            y = torch.multinomial(probs, 1).reshape((f.shape[0],) + tuple(f.shape[2:]))
        return F.cross_entropy(f, y, reduction="sum") / batch
    if likelihood != "gaussian":
        raise ValueError(f"likelihood must be 'categorical' or 'gaussian', got {likelihood!r}")
    sigma = obs_noise() if callable(obs_noise) else obs_noise
    sigma = torch.as_tensor(sigma, dtype=f.dtype, device=f.device).detach()
    with torch.no_grad():
        y = f.detach() + sigma * torch.randn_like(f)
    return 0.5 * (((f - y) / sigma) ** 2).sum() / batch


def _batch_dim(module):
    if isinstance(module, _OPAQUE) and not getattr(module, "batch_first", False):
        return 1
    return 0


class _Call:
    """One call of a hooked module: captured inputs, the tensors of the unit as the forward saw
    them (sampled weights), and the output gradients as they arrive."""

    __slots__ = ("args", "kwargs", "tensors", "grads", "pending", "out_meta", "batch_size",
                 "outs", "loss_batch")


class _Group:
    """The calls of one hooked module during one forward of the root model."""

    __slots__ = ("module", "local", "calls", "round", "done")

    def __init__(self, module, local, round_id):
        self.module, self.local, self.calls = module, local, []
        self.round, self.done = round_id, False


class PerExampleSquaredGradients:
    """Collect ``Σ_i g_i²`` (sum over examples of squared per-example gradients) per parameter.

    Args:
        model: a :class:`~pyvarinf2.VariationalModel` (hooks go on its wrapped model; the
            default parameters are those with a posterior) or any ``nn.Module``.
        param_names: parameter names (as in ``model.named_parameters()``, or in the wrapped
            model for a VariationalModel) to collect; default: all with a posterior / all
            that require a gradient.
        loss_reduction: ``'mean'`` if the loss is the batch mean of the example losses (the
            output gradients are multiplied by the batch size), ``'sum'`` if it is their sum.
        average: if True, each forward's contribution is divided by its batch size, so that
            after one forward/backward :meth:`result` is the mean ``(1/B) Σ_i g_i²`` (the
            empirical Fisher diagonal) at no extra cost (the output gradients are scaled by
            ``sqrt(B)`` instead of ``B``).
        fisher: ``'empirical'`` (gradients of the user's loss, default) or ``'true'`` (labels
            sampled from the model's predictive in an extra pass inside the forward; see the
            module docstring). With ``'true'`` the model must return one tensor.
        likelihood: for ``fisher='true'``: ``'categorical'`` (logits over dim 1) or
            ``'gaussian'``.
        obs_noise: for ``likelihood='gaussian'``: the observation-noise standard deviation (a
            number, tensor or callable).

    Use as a context manager, or call :meth:`attach` / :meth:`detach` yourself. See the module
    docstring for the rules per layer type.
    """

    def __init__(self, model, param_names=None, loss_reduction="mean", average=False,
                 fisher="empirical", likelihood="categorical", obs_noise=1.0):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if fisher not in ("empirical", "true"):
            raise ValueError(f"fisher must be 'empirical' or 'true', got {fisher!r}")
        if likelihood not in ("categorical", "gaussian"):
            raise ValueError(f"likelihood must be 'categorical' or 'gaussian', got {likelihood!r}")
        if fisher == "true" and loss_reduction != "mean":
            raise ValueError("fisher='true' draws a batch-mean loss itself; use "
                             f"loss_reduction='mean', got {loss_reduction!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        from .variational import VariationalModel  # local import: curvature sits below optim
        if isinstance(model, VariationalModel):
            root = model.model
            default = model.posterior_parameters()
        else:
            root = model
            default = [n for n, p in model.named_parameters() if p.requires_grad]
        names = list(default if param_names is None else param_names)
        known = dict(root.named_parameters())
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown parameter names {unknown}; the model has {list(known)}")
        self.root = root
        self.names = names
        self.loss_reduction = loss_reduction
        self.average = bool(average)
        self.fisher = fisher
        self.likelihood = likelihood
        self.obs_noise = obs_noise
        self._wanted = {id(known[n]): n for n in names}
        self._units = self._find_units()
        covered = {n for _, local in self._units for n in local.values()}
        #: parameters no hooked module owns (never recorded; see the module docstring)
        self.unreachable = [n for n in names if n not in covered]
        owners = {}
        for module, local in self._units:
            for n in local.values():
                owners.setdefault(n, []).append(type(module).__name__)
        #: parameters owned by several modules (tied weights): each module's per-example
        #: gradients are squared on their own, Σ g_a² + Σ g_b² instead of Σ (g_a + g_b)²
        self.shared = sorted(n for n, mods in owners.items() if len(mods) > 1)
        if self.shared:
            warnings.warn(
                f"per-example squared gradients: {self.shared} are used by several modules "
                "(tied weights); their uses are squared separately, dropping the cross terms "
                "2 Σ_i g_a,i g_b,i, an approximation of the curvature of those parameters. Keep "
                "them deterministic (variationalize(..., deterministic=...)) or use IVON, which "
                "needs no per-example gradients, where this matters.", UserWarning, stacklevel=3)
        self._handles = []
        self._computing = False
        #: also record the plain sums Σ_i g_i, for :meth:`gradient_mismatch`
        self.verify = False
        self._no_vmap = set()
        self._round_id = 0
        self.reset()

    # ------------------------------------------------------------------ set-up
    def _find_units(self):
        """[(module, {local parameter path: full name})]: the modules to hook."""
        units, opaque_inside = [], set()
        for _, module in self.root.named_modules():
            if isinstance(module, _OPAQUE):
                local = {}
                for lname, p in module.named_parameters(remove_duplicate=False):
                    if id(p) in self._wanted:
                        local[lname] = self._wanted[id(p)]
                if local:
                    units.append((module, local))
                for sub in module.modules():
                    opaque_inside.add(id(sub))
        for _, module in self.root.named_modules():
            if id(module) in opaque_inside:
                continue
            local = {}
            for lname, p in module._parameters.items():
                if p is not None and id(p) in self._wanted:
                    local[lname] = self._wanted[id(p)]
            if local:
                units.append((module, local))
        return units

    def func_modules(self):
        """The hooked modules whose per-example gradients are recomputed with ``torch.func``
        (no closed form): they are re-run, with the tensors their forward saw, after it."""
        return [module for module, _ in self._units if not _closed_form(module)]

    def attach(self):
        """Register the hooks (idempotent)."""
        if self._handles:
            return self
        self._handles.append(self.root.register_forward_pre_hook(self._new_round))
        for module, local in self._units:
            self._handles.append(module.register_forward_hook(
                self._make_forward_hook(module, local), with_kwargs=True))
        if self.fisher == "true":
            # after the module hooks: the root may itself be a hooked module
            self._handles.append(self.root.register_forward_hook(self._true_fisher_hook))
        return self

    def detach(self):
        """Remove the hooks and drop anything captured."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.reset()
        return self

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        # keep the results readable after the block; only the hooks go
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def reset(self):
        """Forget everything collected (call between optimisation steps)."""
        self._sums = {}
        self._grad_sums = {}        # Σ_i g_i per parameter, while ``verify`` is on
        self._root_batch = {}       # round id -> the model's batch size
        self._round_batch = {}      # round id -> batch size
        self._groups = {}           # id(module) -> _Group of the current forward
        self._open = []             # groups not processed yet

    @property
    def batch_size(self):
        """Number of examples seen since the last :meth:`reset` (summed over forwards)."""
        self._flush()
        return sum(self._round_batch.values())

    # ------------------------------------------------------------------ hooks
    def _new_round(self, module, args):
        if not self._computing:
            self._round_id += 1
            self._groups = {}
            try:             # the model's batch: a layer run on pieces of it is told apart
                root = _infer_batch(args, 0)
            except RuntimeError:
                root = None  # no tensor input: pieces cannot be told from repeated uses
            self._root_batch[self._round_id] = root

    def _make_forward_hook(self, module, local):
        bdim = _batch_dim(module)
        # the closed forms need only the input and the output gradient; torch.func needs the
        # tensors (sampled weights, buffers) the forward used
        closed_form = _closed_form(module)

        def hook(mod, args, kwargs, output):
            if self._computing or not torch.is_grad_enabled():
                return None
            flat_out, _ = tree_flatten(output)
            outs = [(k, t) for k, t in enumerate(flat_out)
                    if torch.is_tensor(t) and t.requires_grad]
            if not outs:
                return None
            call = _Call()
            call.outs = None
            call.loss_batch = None
            if not args and kwargs:
                # called by keyword (``layer(input=x)``): the first argument of the forward
                # is the input the closed forms and the batch size read
                first = _first_forward_arg(type(mod))
                if first in kwargs:
                    args = (kwargs[first],)
                    kwargs = {k: v for k, v in kwargs.items() if k != first}
            call.args = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
            call.kwargs = {k: (v.detach() if torch.is_tensor(v) else v)
                           for k, v in kwargs.items()}
            if closed_form:
                call.tensors = None
            elif len(local) == len(mod._parameters) and not mod._buffers and not mod._modules:
                call.tensors = {n: t.detach() for n, t in mod._parameters.items() if t is not None}
            else:
                call.tensors = {n: t.detach() for n, t in mod.named_parameters(
                    remove_duplicate=False)}
                call.tensors.update(mod.named_buffers(remove_duplicate=False))
            call.out_meta = [(t.shape, t.dtype, t.device) if torch.is_tensor(t) else None
                             for t in flat_out]
            call.grads = [None] * len(flat_out)
            call.pending = len(outs)
            call.batch_size = _infer_batch(call.args, bdim)
            group = self._groups.get(id(mod))
            if group is None:
                group = self._groups[id(mod)] = _Group(mod, local, self._round_id)
                self._open.append(group)
            group.calls.append(call)
            if self.fisher == "true":
                call.outs = outs
                if torch.is_tensor(output):
                    # gradients are taken w.r.t. this tensor: hand the rest of the forward a
                    # copy, so that in-place operations (ReLU(inplace=True)) cannot alter it
                    return output.clone()
                return None
            for k, t in outs:
                t.register_hook(self._make_grad_hook(group, call, k))
            return None

        return hook

    def _true_fisher_hook(self, module, args, output):
        """Root forward hook for ``fisher='true'``: the sampled-label output gradients of every
        call of this forward, then their squared per-example gradients."""
        groups = [g for g in self._groups.values() if not g.done and g.round == self._round_id]
        calls = [(g, c) for g in groups for c in g.calls if getattr(c, "outs", None)]
        if not calls or self._computing or not torch.is_grad_enabled():
            return None
        if not torch.is_tensor(output):
            raise TypeError("fisher='true' needs the model to return one tensor (logits or a "
                            f"regression mean); got {type(output).__name__}. Use "
                            "fisher='empirical'.")
        targets = [t for _, c in calls for _, t in c.outs]
        loss = sampled_nll(output, self.likelihood, self.obs_noise)
        grads = torch.autograd.grad(loss, targets, retain_graph=True, allow_unused=True)
        it = iter(grads)
        for _, c in calls:
            for k, _ in c.outs:
                g = next(it)
                c.grads[k] = None if g is None else g.detach()
            c.outs = None
            c.pending = 0
        for g in groups:
            self._process(g)
        return None

    def _make_grad_hook(self, group, call, k):
        def grad_hook(grad):
            if group.done or call.grads is None:
                return None
            call.grads[k] = None if grad is None else grad.detach()
            call.pending -= 1
            if call.pending == 0 and all(c.pending == 0 for c in group.calls):
                self._process(group)
            return None

        return grad_hook

    # ------------------------------------------------------------------ processing
    def _flush(self):
        """Process groups whose output gradients did not all arrive (a missing output gradient
        counts as zero); groups with no gradient at all (no backward) are dropped."""
        for group in list(self._open):
            if any(g is not None for c in group.calls for g in c.grads):
                self._process(group)
        self._open = []
        self._groups = {}

    def _process(self, group):
        group.done = True
        if group in self._open:
            self._open.remove(group)
        mod, local = group.module, group.local
        live = [c for c in group.calls if any(g is not None for g in c.grads)]
        sizes = sorted({c.batch_size for c in live})
        root = self._root_batch.get(group.round)
        # calls on pieces of the model's batch (x[:32], x[32:]): their examples are different
        # examples of the one loss, not more uses by the same examples
        pieces = (len(live) > 1 and root is not None
                  and sum(c.batch_size for c in live) == root
                  and all(c.batch_size < root for c in live))
        if len(sizes) > 1 and not pieces:
            for c in group.calls:
                c.grads = None
                c.args = c.kwargs = c.tensors = None
            raise RuntimeError(
                f"per-example gradients: the {type(mod).__name__} holding "
                f"{sorted(local.values())} ran on inputs with {sizes} examples in one forward. "
                "Its uses cannot be added example by example (they do not see the same "
                "examples). Keep its parameters deterministic, or use IVON, which needs no "
                "per-example gradients.")
        if live:
            self._computing = True
            try:
                with torch.no_grad():
                    plain = None
                    if pieces:
                        sq, plain = {}, ({} if self.verify else None)
                        for c in live:
                            c.loss_batch = root          # the loss is a mean over all of them
                            s_c, p_c = self._squared_sums(mod, local, c, self.verify)
                            for k, v in s_c.items():
                                sq[k] = sq[k] + v if k in sq else v
                            for k, v in (p_c or {}).items():
                                plain[k] = plain[k] + v if k in plain else v
                    elif len(live) == 1:
                        sq, plain = self._squared_sums(mod, local, live[0], self.verify)
                    else:
                        per = None
                        for c in live:
                            pe = self._per_example(mod, local, c)
                            if per is None:
                                per = pe
                            else:
                                for k in per:
                                    per[k] = per[k] + pe[k]
                        sq = {k: (v * v).sum(0) for k, v in per.items()}
                        if self.verify:
                            plain = {k: v.sum(0) / self._scale(live[0]) for k, v in per.items()}
            finally:
                self._computing = False
            for lname, value in (plain or {}).items():
                name = local[lname]
                self._grad_sums[name] = self._grad_sums.get(name, 0.0) + value
            for lname, value in sq.items():
                name = local[lname]
                if name in self._sums:
                    self._sums[name] = self._sums[name] + value   # results already handed out stay
                else:
                    self._sums[name] = value
            self._round_batch[group.round] = root if pieces else live[0].batch_size
        for c in group.calls:
            c.grads = None
            c.args = c.kwargs = c.tensors = None

    def _scale(self, call):
        # per-example gradients are linear in the output gradient and the results quadratic:
        # scaling by B undoes a mean, by 1/sqrt(B) on top of that averages over the batch
        # (B: the batch the loss averages, the model's when the call saw a piece of it)
        B = getattr(call, "loss_batch", None) or call.batch_size
        scale = B if self.loss_reduction == "mean" else 1
        if self.average:
            scale = scale / B ** 0.5
        return scale

    def _scaled_grads(self, call):
        scale = self._scale(call)
        if scale == 1:
            return list(call.grads)
        return [g * scale if g is not None else None for g in call.grads]

    def _squared_sums(self, mod, local, call, plain_sums=False):
        """({local name: Σ_i g_i²}, {local name: Σ_i g_i} or None) for one call (closed forms
        where they exist); the plain sums, the gradient of the loss through this call, only
        when ``plain_sums``."""
        grads = self._scaled_grads(call)
        scale = self._scale(call)
        g = grads[0] if len(grads) == 1 else None
        if g is not None and _is_plain(mod, nn.Linear) and call.args[0].dim() == 2:
            a = call.args[0]
            g2 = g * g
            out = {}
            if "weight" in local:
                out["weight"] = torch.mm(g2.t(), a * a)
            if "bias" in local:
                out["bias"] = g2.sum(0)
            if not plain_sums:           # (the check's extra product, first step only)
                return out, None
            plain = {}
            if "weight" in local:
                plain["weight"] = torch.mm(g.t(), a) / scale
            if "bias" in local:
                plain["bias"] = g.sum(0) / scale
            return out, plain
        if g is not None and _is_plain(mod, nn.Embedding) and _embedding_closed_form(mod):
            if "weight" not in local:
                return {}, ({} if plain_sums else None)
            out = {"weight": _embedding_squared_sum(mod, call.args[0], g)}
            plain = {"weight": _embedding_sum(mod, call.args[0], g) / scale} \
                if plain_sums else None
            return out, plain
        per = self._per_example(mod, local, call, grads)
        return ({k: (v * v).sum(0) for k, v in per.items()},
                {k: v.sum(0) / scale for k, v in per.items()} if plain_sums else None)

    def gradient_mismatch(self, grads, rtol=None):
        """The parameters whose recorded per-example gradients do not add up to ``grads``
        (``{name: gradient}``, e.g. each parameter's ``.grad`` after the backward), with
        the relative difference: ``[(name, rel)]``. Needs :attr:`verify` on during that
        backward (empirical Fisher only: the true Fisher's gradients are at sampled labels).

        The sum of the per-example gradients is the gradient of the loss *through the hooked
        modules*. It differs from ``.grad`` when a parameter is also used outside the forward
        of the module that owns it, when a module's computation is random per call (dropout
        inside a module without a closed form, recomputed by torch.func with another mask),
        or when the loss has terms that use the parameter directly: in each case the squared
        per-example gradients are wrong too.

        ``rtol`` (default: 1e-3 in float32/64, 5e-2 in 16-bit floats) is relative to the
        parameter's gradient norm, floored at 1e-4 of the whole gradient's norm: a gradient
        that is rounding noise (a bias just before a BatchNorm) is not compared."""
        self._flush()
        norms = {n: float(g.float().norm()) for n, g in grads.items() if g is not None}
        total = sum(v * v for v in norms.values()) ** 0.5
        out = []
        for name, g in grads.items():
            if g is None:
                continue
            tol = rtol if rtol is not None else (
                5e-2 if g.dtype in (torch.float16, torch.bfloat16) else 1e-3)
            got = self._grad_sums.get(name)
            ref = norms[name]
            diff = float((g - got).float().norm()) if torch.is_tensor(got) else ref
            if diff > tol * max(ref, 1e-4 * total) + 1e-12:
                out.append((name, diff / ref if ref > 0 else float("inf")))
        return out

    def _per_example(self, mod, local, call, grads=None):
        """{local name: per-example gradients, shape (B, *param.shape)} for one call."""
        if grads is None:
            grads = self._scaled_grads(call)
        g = grads[0] if len(grads) == 1 else None
        if g is not None:
            if _is_plain(mod, nn.Linear):
                return _linear_per_example(call.args[0], g, local)
            if _is_plain(mod, (nn.Conv1d, nn.Conv2d)) and _unfoldable(mod):
                return _conv_per_example(mod, call.args[0], g, local)
            if _is_plain(mod, _NORMS):
                return _norm_per_example(mod, call.args[0], g, local)
            if _is_plain(mod, nn.Embedding) and _embedding_closed_form(mod):
                return _embedding_per_example(mod, call.args[0], g, local)
        return self._per_example_func(mod, local, call, grads)

    def _per_example_func(self, mod, local, call, grads):
        """torch.func: vmap over the examples of the vjp of the module's own forward, at the
        captured input and the tensors (sampled weights, buffers) the forward saw."""
        # oneDNN's CPU RNN kernels (float32) have no usable backward under torch.func (its
        # flags() context manager warns about TF32 on every call: the plain switch instead)
        previous = torch._C._get_mkldnn_enabled()
        torch._C._set_mkldnn_enabled(False)
        try:
            return self._per_example_func_impl(mod, local, call, grads)
        finally:
            torch._C._set_mkldnn_enabled(previous)

    def _per_example_func_impl(self, mod, local, call, grads):
        from torch.func import functional_call, vjp, vmap

        batch_stats = [n for n, m in mod.named_modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        if batch_stats:
            raise RuntimeError(
                f"per-example gradients: the {type(mod).__name__} holding "
                f"{sorted(local.values())} has no closed form and normalises with batch "
                f"statistics inside (BatchNorm {batch_stats} in training mode): recomputed one "
                "example at a time it would see other statistics (and update its running "
                "ones). Give those parameters to a module of their own, keep them "
                "deterministic, or use IVON, which needs no per-example gradients.")
        bdim = _batch_dim(mod)
        B = call.batch_size
        frozen = dict(call.tensors)
        params = {k: frozen.pop(k) for k in local}
        flat_args, args_spec = tree_flatten((list(call.args), call.kwargs))
        in_dims_args = [bdim if (torch.is_tensor(t) and t.dim() > bdim and t.shape[bdim] == B)
                        else None for t in flat_args]
        if isinstance(mod, nn.RNNBase) and len(flat_args) > 1 and torch.is_tensor(flat_args[1]):
            in_dims_args[1] = 1 if flat_args[1].dim() == 3 else None   # h_0: (layers, B, H)
        tensor_idx, cots, cot_dims = [], [], []
        for i, (g, meta) in enumerate(zip(grads, call.out_meta)):
            if meta is None:
                continue
            shape, dtype, device = meta
            if g is None:
                g = torch.zeros(shape, dtype=dtype, device=device)
            tensor_idx.append(i)
            cots.append(g)
            cot_dims.append(_output_batch_dim(mod, i, shape, bdim, B))

        def one(p, xs, cs):
            xs = [x.unsqueeze(d) if d is not None else x for x, d in zip(xs, in_dims_args)]
            a, kw = tree_unflatten(xs, args_spec)

            def fwd(pp):
                out = functional_call(mod, {**frozen, **pp}, tuple(a), kw, strict=False)
                flat, _ = tree_flatten(out)
                return tuple(flat[i] for i in tensor_idx)

            _, pull = vjp(fwd, p)
            (gp,) = pull(tuple(c.unsqueeze(d) for c, d in zip(cs, cot_dims)))
            return gp

        if type(mod) not in self._no_vmap:
            try:
                per = vmap(one, in_dims=(None, in_dims_args, cot_dims), randomness="same")(
                    params, flat_args, cots)
                return dict(per)
            except RuntimeError:
                # kernels without batching rules (fused RNNs, ...): one vjp per example
                self._no_vmap.add(type(mod))
        outs = []
        for i in range(B):
            xs = [x.select(d, i) if d is not None else x for x, d in zip(flat_args, in_dims_args)]
            cs = [c.select(d, i) for c, d in zip(cots, cot_dims)]
            outs.append(one(params, xs, cs))
        return {k: torch.stack([o[k] for o in outs]) for k in params}

    # ------------------------------------------------------------------ results
    def result(self):
        """``{param name: Σ_i g_i²}`` over every example since the last :meth:`reset`
        (parameters that received no gradient are absent)."""
        self._flush()
        return dict(self._sums)


def per_example_squared_gradients(model, loss_fn, *inputs, param_names=None,
                                  loss_reduction="mean"):
    """One forward + backward of ``loss_fn(model(*inputs))`` under
    :class:`PerExampleSquaredGradients`; returns ``(sums, batch_size)``. The gradients of the
    parameters are left in ``.grad`` as after any backward."""
    with PerExampleSquaredGradients(model, param_names, loss_reduction) as sq:
        loss_fn(model(*inputs)).backward()
    return sq.result(), sq.batch_size


# ---------------------------------------------------------------------- closed forms
@functools.lru_cache(maxsize=None)
def _first_forward_arg(cls):
    """Name of the first argument (after self) of ``cls.forward``, or None."""
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    return params[0].name if params and params[0].kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY) else None


def _output_batch_dim(mod, index, shape, bdim, B):
    """Batch dim of the ``index``-th (flattened) output of ``mod``: known for RNNs (h_n, c_n:
    dim 1) and MultiheadAttention (the weights: dim 0), where guessing by size goes wrong when
    another dimension equals the batch size (num_layers or the sequence length); guessed
    otherwise."""
    if index >= 1 and isinstance(mod, nn.RNNBase) and len(shape) == 3 and shape[1] == B:
        return 1
    if index == 1 and isinstance(mod, nn.MultiheadAttention) and len(shape) >= 1 \
            and shape[0] == B:
        return 0
    return _guess_batch_dim(shape, bdim, B)


def _guess_batch_dim(shape, bdim, B):
    """Batch dim of an output: the module's, else the first of size B (an RNN's h_n)."""
    if len(shape) > bdim and shape[bdim] == B:
        return bdim
    for d, s in enumerate(shape):
        if s == B:
            return d
    raise RuntimeError(f"PerExampleSquaredGradients: an output of shape {tuple(shape)} has no "
                       f"batch dimension of size {B}")


def _infer_batch(args, bdim):
    for a in tree_flatten(list(args))[0]:
        if torch.is_tensor(a) and a.dim() > bdim:
            return int(a.shape[bdim])
    raise RuntimeError("PerExampleSquaredGradients: could not find the batch dimension of a "
                       "module's input (dim 0, or dim 1 for batch_first=False layers)")


def _linear_per_example(a, g, local):
    B = a.shape[0]
    a3 = a.reshape(B, -1, a.shape[-1])
    g3 = g.reshape(B, -1, g.shape[-1])
    out = {}
    if "weight" in local:
        out["weight"] = torch.bmm(g3.transpose(1, 2), a3)
    if "bias" in local:
        out["bias"] = g3.sum(1)
    return out


def _closed_form(module):
    """Whether the module's per-example gradients have a closed form here (no torch.func)."""
    return (_is_plain(module, (nn.Linear,) + _NORMS)
            or (_is_plain(module, (nn.Conv1d, nn.Conv2d)) and _unfoldable(module))
            or (_is_plain(module, nn.Embedding) and _embedding_closed_form(module)))


def _unfoldable(mod):
    return mod.padding_mode == "zeros" and not isinstance(mod.padding, str)


def _conv_per_example(mod, x, g, local):
    """Per-example weight gradients of Conv1d/Conv2d as one grouped convolution: for each
    example i and input channel c, the correlation of x_i[c] with the output gradients g_i[o]
    of c's group (stride and dilation swap roles), i.e. ``torch.nn.grad.conv2d_weight`` with
    the batch folded into the groups."""
    B = x.shape[0]
    if isinstance(mod, nn.Conv1d):
        x = x.unsqueeze(2)
        g = g.unsqueeze(2)
        k, s, p, d = (1,) + mod.kernel_size, (1,) + mod.stride, (0,) + mod.padding, \
            (1,) + mod.dilation
    else:
        k, s, p, d = mod.kernel_size, mod.stride, mod.padding, mod.dilation
    out = {}
    if "weight" in local:
        C, H, W = x.shape[1], x.shape[2], x.shape[3]
        G = mod.groups
        O, oh, ow = g.shape[1], g.shape[2], g.shape[3]
        Cg, Og = C // G, O // G
        inp = x.reshape(1, B * C, H, W)
        w = g.reshape(B, G, 1, Og, oh, ow).expand(B, G, Cg, Og, oh, ow)
        w = w.reshape(B * C * Og, 1, oh, ow)
        r = F.conv2d(inp, w, None, stride=d, padding=p, dilation=s, groups=B * C)
        r = r[:, :, :k[0], :k[1]]                                  # (1, B*C*Og, kh, kw)
        r = r.reshape(B, G, Cg, Og, k[0], k[1]).transpose(2, 3)      # (B, G, Og, Cg, kh, kw)
        out["weight"] = r.reshape((B,) + tuple(mod.weight.shape))
    if "bias" in local:
        out["bias"] = g.reshape(B, g.shape[1], -1).sum(2)
    return out


def _norm_per_example(mod, x, g, local):
    B = x.shape[0]
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        use_batch = mod.training or mod.running_mean is None
        xhat = F.batch_norm(x, None if use_batch else mod.running_mean,
                            None if use_batch else mod.running_var, None, None,
                            use_batch, 0.0, mod.eps)
        red = lambda t: t.reshape(B, t.shape[1], -1).sum(2)  # noqa: E731
    elif isinstance(mod, nn.GroupNorm):
        xhat = F.group_norm(x, mod.num_groups, None, None, mod.eps)
        red = lambda t: t.reshape(B, t.shape[1], -1).sum(2)  # noqa: E731
    else:  # LayerNorm
        xhat = F.layer_norm(x, mod.normalized_shape, None, None, mod.eps)
        nd = len(mod.normalized_shape)
        red = lambda t: t.reshape((B, -1) + tuple(t.shape[t.dim() - nd:])).sum(1)  # noqa: E731
    out = {}
    if "weight" in local:
        out["weight"] = red(g * xhat)
    if "bias" in local:
        out["bias"] = red(g)
    return out


def _embedding_closed_form(mod):
    return not mod.scale_grad_by_freq and mod.max_norm is None


def _embedding_keys(mod, idx, g):
    """Flattened (example * V + row) keys and the matching output-gradient rows, without the
    padding_idx positions."""
    B = idx.shape[0]
    V, D = mod.num_embeddings, mod.embedding_dim
    flat_idx = idx.reshape(B, -1)
    gf = g.reshape(-1, D)
    key = (flat_idx + V * torch.arange(B, device=idx.device).unsqueeze(1)).reshape(-1)
    if mod.padding_idx is not None:
        keep = flat_idx.reshape(-1) != mod.padding_idx
        key, gf = key[keep], gf[keep]
    return key, gf


def _embedding_per_example(mod, idx, g, local):
    if "weight" not in local:
        return {}
    B, V, D = idx.shape[0], mod.num_embeddings, mod.embedding_dim
    key, gf = _embedding_keys(mod, idx, g)
    out = g.new_zeros(B * V, D).index_add_(0, key, gf)
    return {"weight": out.reshape(B, V, D)}


def _embedding_sum(mod, idx, g):
    """Σ_i (per-example embedding gradient): the rows' gradients added into (V, D)."""
    key, gf = _embedding_keys(mod, idx, g)
    return g.new_zeros(mod.num_embeddings, mod.embedding_dim).index_add_(
        0, key % mod.num_embeddings, gf)


def _embedding_squared_sum(mod, idx, g):
    """Σ_i (per-example embedding gradient)² without materialising (B, V, D)."""
    V, D = mod.num_embeddings, mod.embedding_dim
    key, gf = _embedding_keys(mod, idx, g)
    uniq, inv = torch.unique(key, return_inverse=True)
    sums = g.new_zeros(uniq.numel(), D).index_add_(0, inv, gf)
    return g.new_zeros(V, D).index_add_(0, uniq % V, sums * sums)
