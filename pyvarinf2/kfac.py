"""K-FAC factors from module hooks (Martens & Grosse 2015; Grosse & Martens 2016 for convolution).

For a layer with homogeneous inputs ``a`` (a constant 1 appended when the bias is covered) and
pre-activation gradients ``g`` of the *per-example* negative log-likelihood, K-FAC approximates
the layer's Fisher by ``A ⊗ S`` (for the homogeneous matrix ``W_h = [W, b]``, row-major ``vec``:
``F ≈ S ⊗ A``; ``A`` acts on the input side, ``S`` on the output side):

* ``nn.Linear``: ``A = (1/B) Σ_i a_i a_iᵀ``, ``S = (1/B) Σ_i g_i g_iᵀ``. Inputs with more than two
  dimensions (``(B, T, in)``) are treated like a convolution's spatial locations.
* ``nn.Conv2d`` (KFC, Grosse & Martens 2016): ``a_{i,t}`` is the unfolded input patch at output
  location ``t`` (``F.unfold`` order, which is the order of ``weight.view(out, -1)``; padding,
  stride and dilation included, plus the homogeneous 1 per location), ``g_{i,t}`` the output
  gradient at location ``t``. With ``T`` locations: ``A = (1/B) Σ_i Σ_t a_{i,t} a_{i,t}ᵀ`` (a
  *sum* over locations) and ``S = (1/(B T)) Σ_i Σ_t g_{i,t} g_{i,t}ᵀ`` (a *mean* over locations),
  so that ``A ⊗ S = T · E[a aᵀ] ⊗ E[g gᵀ]``: KFC's Fisher under independent activations and
  derivatives, spatial homogeneity and spatially uncorrelated derivatives. With one location
  (kernel covering the input) this is exactly the Linear case.

A layer called several times in one forward (weight sharing) contributes each call as further
locations.

Where ``g`` comes from (``fisher=``):

* ``'empirical'``: the gradient of the user's own loss, taken by a hook on the layer's output
  during the user's ``backward()``. The loss must be the *mean* over the batch (the library's
  convention), so the hook multiplies by the batch size ``B`` to get per-example gradients.
* ``'true'``: labels sampled from the model's own predictive. When a capture is armed, a forward
  hook on the wrapped model takes the network output ``f`` and, *inside the forward*, runs one
  extra backward of ``(1/B) Σ_i NLL(f_i, ỹ_i)`` (a batch mean, like the user's loss) with
  ``ỹ`` drawn from the predictive
  (``likelihood='categorical'``: ``ỹ ~ softmax(f)`` over dim 1, ``f`` being logits or
  log-probabilities; ``likelihood='gaussian'``: ``ỹ ~ N(f, obs_noise²)``), through
  ``torch.autograd.grad`` with ``retain_graph=True`` and only the captured layer outputs as
  inputs (no weight gradients are formed). The user's own backward is untouched. The extra cost
  is about half a backward, paid only on capture steps (every ``T_cov`` steps).

On capture forwards the layer's output is replaced by a copy (``output.clone()``), so in-place
operations after the layer (``ReLU(inplace=True)``) cannot change the tensor whose gradient is
taken.
"""
import fnmatch
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._C._functorch import peek_interpreter_stack as _peek_interpreter_stack

from .curvature import sampled_nll

__all__ = ["KFACLayer", "find_kfac_layers", "layer_inputs", "layer_output_grads",
           "kfac_factors", "KFACCapture"]


class KFACLayer:
    """A layer handled by K-FAC: its module, path and the names of its parameters."""

    def __init__(self, path, module, weight_name, bias_name):
        self.path = path
        self.module = module
        self.kind = "conv2d" if isinstance(module, nn.Conv2d) else "linear"
        self.weight_name = weight_name
        self.bias_name = bias_name
        self.key = path if path else "root"  # where the posterior sits in var_model.posteriors
        self.posterior = None

    @property
    def has_bias(self):
        return self.bias_name is not None

    def __repr__(self):
        return f"KFACLayer({self.path or '<root>'}: {type(self.module).__name__})"


def _layer_matcher(spec):
    if spec is None:
        return lambda path, module: True
    if callable(spec) and not isinstance(spec, type):
        return lambda path, module: bool(spec(path, module))
    items = [spec] if isinstance(spec, (str, type)) else list(spec)
    for item in items:
        if not isinstance(item, (str, type)):
            raise TypeError(f"layers must hold layer-path patterns (str) or nn.Module types, "
                            f"got {item!r}")
    pats = [i for i in items if isinstance(i, str)]
    types = tuple(i for i in items if isinstance(i, type))
    return lambda path, module: (any(fnmatch.fnmatchcase(path, p) for p in pats)
                                 or (bool(types) and isinstance(module, types)))


def _plain_layer(mod):
    """An nn.Linear / nn.Conv2d (groups=1) whose forward is the stock one: the hooks rely on
    ``output = F.linear(x, W, b)`` / ``F.conv2d(x, W, b, ...)`` with ``x`` the input."""
    if isinstance(mod, nn.Linear):
        # MultiheadAttention's out_proj (NonDynamicallyQuantizableLinear) is used without
        # calling its forward
        return (type(mod).forward is nn.Linear.forward
                and type(mod).__name__ != "NonDynamicallyQuantizableLinear")
    if isinstance(mod, nn.Conv2d):
        return (mod.groups == 1 and type(mod).forward is nn.Conv2d.forward
                and type(mod)._conv_forward is nn.Conv2d._conv_forward)
    return False


def find_kfac_layers(var_model, layers=None):
    """The layers of ``var_model.model`` that get K-FAC treatment (see
    :func:`pyvarinf2.kronecker.use_kronecker_posteriors`), in module order."""
    from .kronecker import KroneckerPosterior
    from .posteriors import MeanFieldPosterior
    match = _layer_matcher(layers)
    model = var_model.model
    posts = {}
    for key, post in var_model.named_posteriors():
        for n in post.names:
            posts[n] = post
    # how many module slots refer to each parameter (tied weights are used by several modules)
    users = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        for p in mod._parameters.values():
            if p is not None:
                users[id(p)] = users.get(id(p), 0) + 1
    name_of = {id(p): n for n, p in model.named_parameters()}
    found = []
    for path, mod in model.named_modules():
        if not _plain_layer(mod):
            continue
        w = mod.weight
        if w is None or users.get(id(w), 0) != 1 or id(w) not in name_of:
            continue
        w_name = name_of[id(w)]
        if w_name != (f"{path}.weight" if path else "weight"):
            continue
        post = posts.get(w_name)
        b = mod.bias
        b_name = None
        if b is not None and users.get(id(b), 0) == 1 and id(b) in name_of \
                and name_of[id(b)] in posts:
            b_name = name_of[id(b)]
        if isinstance(post, KroneckerPosterior):  # the model's family: always kept
            b_name = post.names[1] if post.has_bias else None
        elif not match(path, mod):
            continue
        elif not isinstance(post, MeanFieldPosterior):
            continue
        elif b_name is not None and not isinstance(posts[b_name], MeanFieldPosterior):
            continue
        layer = KFACLayer(path, mod, w_name, b_name)
        # the posterior tree node at the layer's key must hold nothing but this layer
        own = {w_name, b_name} - {None}
        clash = [n for n in posts if n not in own
                 and (n == layer.key or n.startswith(layer.key + "."))]
        if clash:
            continue
        found.append(layer)
    return found


# ---------------------------------------------------------------------------- factor maths
def _conv_input(x, module):
    """Pad ``x`` as ``module`` would, returning (input, padding for unfold)."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            pad = (0, 0)
        else:  # 'same' (stride 1): total padding dilation*(k-1), the extra one on the right
            pads = []
            for d, k in zip(module.dilation[::-1], module.kernel_size[::-1]):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads, mode="constant" if module.padding_mode == "zeros"
                      else module.padding_mode)
            return x, (0, 0)
    else:
        pad = module.padding
    if module.padding_mode != "zeros" and any(pad):
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        pad = (0, 0)
    return x, pad


def layer_inputs(module, x, has_bias):
    """Homogeneous inputs of one call, shaped ``(B, T, n_in)`` (T locations per example)."""
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        x, pad = _conv_input(x, module)
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=pad,
                        stride=module.stride)  # (B, C*kh*kw, T)
        a = cols.transpose(1, 2)
    else:
        if x.dim() == 1:
            x = x.unsqueeze(0)
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    if has_bias:
        a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
    return a


def layer_output_grads(module, g):
    """Per-location output gradients of one call, shaped ``(B, T, out)``."""
    if isinstance(module, nn.Conv2d):
        if g.dim() == 3:
            g = g.unsqueeze(0)
        return g.flatten(2).transpose(1, 2)
    if g.dim() == 1:
        g = g.unsqueeze(0)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def kfac_factors(a, g):
    """``(A, S)`` from homogeneous inputs ``a`` (B, T, n_in) and per-example output gradients
    ``g`` (B, T, out): ``A = Σ_{i,t} a aᵀ / B``, ``S = Σ_{i,t} g gᵀ / (B T)``."""
    b, t = a.shape[0], a.shape[1]
    a2 = a.reshape(-1, a.shape[-1])
    g2 = g.reshape(-1, g.shape[-1])
    return a2.T @ a2 / b, g2.T @ g2 / (b * t)


# ---------------------------------------------------------------------------- capture
class KFACCapture:
    """Hooks that record ``(a, g)`` for the given layers on *armed* forwards.

    ``arm()`` asks for one capture: the next forward of the wrapped model run with gradients
    enabled records each layer's input and, for ``fisher='true'``, computes the sampled-label
    output gradients at once; for ``fisher='empirical'`` the output gradients arrive during the
    user's backward. ``take()`` returns ``{layer_index: (a, g)}`` for complete records (``a``:
    (B, T, n_in), ``g``: (B, T, out), per-example scale) and disarms. ``batch_size`` is the
    leading dimension of the last input seen by the wrapped model (recorded on every forward).
    """

    def __init__(self, var_model, layers, fisher="true", likelihood="categorical",
                 obs_noise=1.0):
        self.var_model = var_model
        self.layers = list(layers)
        self.fisher = fisher
        self.likelihood = likelihood
        self.obs_noise = obs_noise
        self.armed = False
        self._active = False
        self._records = None
        self.batch_size = None
        root = var_model.model
        self._handles = [root.register_forward_pre_hook(self._pre_hook)]
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.module.register_forward_hook(self._make_layer_hook(i)))
        # after the layer hooks: the wrapped model may itself be a K-FAC layer
        self._handles.append(root.register_forward_hook(self._post_hook))

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def arm(self):
        self.armed = True

    def disarm(self):
        self.armed = False
        self._active = False
        self._records = None

    # -- hooks
    def _pre_hook(self, module, args):
        if args and torch.is_tensor(args[0]):
            x = args[0]
            self.batch_size = int(x.shape[0]) if x.dim() > 0 else 1
        if self.armed and torch.is_grad_enabled() and not self._active \
                and _peek_interpreter_stack() is None:  # not inside vmap/grad (predict helpers)
            self._active = True
            self._records = {i: [] for i in range(len(self.layers))}

    def _make_layer_hook(self, index):
        def hook(module, inputs, output):
            if not self._active or not torch.is_tensor(output) or not inputs:
                return None
            rec = {"x": inputs[0].detach(), "out": output, "g": None}
            self._records[index].append(rec)
            if not output.requires_grad:
                return None
            if self.fisher == "empirical":
                def store(grad, rec=rec):
                    rec["g"] = grad.detach()
                output.register_hook(store)
            return output.clone()
        return hook

    def _post_hook(self, module, args, output):
        if not self._active:
            return None
        self._active = False
        self.armed = False
        if self.fisher == "true":
            recs = [r for lst in self._records.values() for r in lst if r["out"].requires_grad]
            if recs:
                if not torch.is_tensor(output):
                    raise TypeError("fisher='true' needs the model to return one tensor (logits, "
                                    "log-probabilities or a regression mean); got "
                                    f"{type(output).__name__}. Use fisher='empirical'.")
                loss = self.sampled_nll(output)
                grads = torch.autograd.grad(loss, [r["out"] for r in recs], retain_graph=True,
                                            allow_unused=True)
                for r, g in zip(recs, grads):
                    r["g"] = None if g is None else g.detach()
        for lst in self._records.values():
            for r in lst:
                if self.fisher == "true":
                    r["out"] = None  # free the graph reference
        return None

    def sampled_nll(self, output):
        """``(1/B) Σ_i NLL(output_i, ỹ_i)`` with ``ỹ`` drawn from the model's predictive (a
        batch mean, like the user's loss): :func:`pyvarinf2.curvature.sampled_nll`."""
        return sampled_nll(output, self.likelihood, self.obs_noise)

    def take(self):
        """``{layer_index: (a, g)}`` for the layers with a complete record; disarms."""
        records, self._records = self._records, None
        self._active = False
        out = {}
        if not records:
            return out
        for i, lst in records.items():
            if not lst or any(r["g"] is None for r in lst):
                continue
            layer = self.layers[i]
            a_parts = [layer_inputs(layer.module, r["x"], layer.has_bias) for r in lst]
            g_parts = [layer_output_grads(layer.module, r["g"]) for r in lst]
            sizes = [p.shape[0] for p in a_parts]
            root = self.batch_size
            pieces = (len(sizes) > 1 and root is not None and sum(sizes) == root
                      and all(n < root for n in sizes))
            if len(set(sizes)) == 1 and not pieces:
                # every call sees the whole batch (a layer applied several times): the uses
                # are more locations of the same examples; both losses are means over those
                # B examples, so B times the gradient is the per-example gradient
                a = torch.cat(a_parts, dim=1)
                g = torch.cat(g_parts, dim=1) * a.shape[0]
            else:
                # calls on pieces of the model's batch (equal or not), or on different numbers
                # of examples: each call's examples are examples of the layer, the loss a mean
                # over all of them; calls with fewer locations are padded with zero rows
                # (which add nothing to the sums)
                t = max(p.shape[1] for p in a_parts)
                pad = lambda p: p if p.shape[1] == t else torch.nn.functional.pad(  # noqa: E731
                    p, (0, 0, 0, t - p.shape[1]))
                a = torch.cat([pad(p) for p in a_parts], dim=0)
                g = torch.cat([pad(p) for p in g_parts], dim=0) * a.shape[0]
            out[i] = (a, g)
        return out
