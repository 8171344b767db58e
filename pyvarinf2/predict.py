"""Monte-Carlo prediction with a variational model.

Every helper draws ``n_samples`` weight samples from the posterior and runs the model in
*evaluation* mode (BatchNorm uses its running statistics, dropout is off), so the only randomness
is the weights'; the model's train/eval mode is restored afterwards. Gradients follow the
caller's grad mode: wrap calls in ``torch.no_grad()`` for plain prediction.

The S forward passes are vectorised with ``torch.func.vmap`` over stacked weight samples when
that pays (``vectorize=None``, the default: when the S stacked samples of all the weights fit in
``2**24`` numbers, i.e. 64 MiB in float32, and the model's operations support ``vmap``); otherwise
the helpers loop over samples, one weight sample alive at a time, through
``with var_model.sampling(): var_model(...)``.

Quantities, for per-sample outputs ``f_s(x)`` (s = 1..S):

* classification: the model returns logits or log-probabilities over the class dimension ``dim``
  (``softmax`` of either is the class probability vector ``p_s``). The predictive is
  ``p = mean_s p_s``; :func:`predictive_entropy` is ``H[p]`` (total uncertainty),
  :func:`expected_entropy` is ``mean_s H[p_s]`` (aleatoric part) and :func:`mutual_information`
  is their difference, the information the label carries about the weights (epistemic part).
  Entropies are in nats.
* regression: the predictive mean is ``mean_s f_s``; with observation-noise variance ``v_s``
  (a known constant, or a second output of a heteroscedastic model) the predictive variance is
  the law of total variance, ``mean_s v_s`` (aleatoric) ``+ mean_s (f_s - mean)^2`` (epistemic:
  the spread of the S sampled means about their average).
"""
import numbers
from typing import NamedTuple

import torch
from torch.func import functional_call, vmap

from .posteriors import MeanFieldPosterior
from .variational import VariationalModel

__all__ = [
    "sample_predictions", "predictive_mean", "predictive_probs", "predictive_entropy",
    "expected_entropy", "mutual_information", "classification_predictive",
    "regression_predictive", "ClassificationPrediction", "RegressionPrediction",
]

#: vectorise automatically when n_samples x (number of posterior entries) is at most this
VECTORIZE_MAX_NUMBERS = 2 ** 24


# --------------------------------------------------------------------------- validation
def _check_var_model(var_model):
    if not isinstance(var_model, VariationalModel):
        raise TypeError("var_model must be a VariationalModel (from pyvarinf2.variationalize), "
                        f"got {type(var_model).__name__}")


def _check_n_samples(n_samples):
    if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) \
            or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    return int(n_samples)


def _check_chunk_size(chunk_size):
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) \
            or chunk_size < 1:
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")
    return int(chunk_size)


def _check_vectorize(vectorize):
    if vectorize is not None and not isinstance(vectorize, bool):
        raise ValueError(f"vectorize must be None (automatic), True or False, got {vectorize!r}")
    return vectorize


def _check_dim(dim):
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise ValueError(f"dim must be an integer (the class dimension), got {dim!r}")
    return int(dim)


def _stacked_dim(dim):
    """The class dimension of one sample's output, in a tensor with a leading sample dim."""
    return dim + 1 if dim >= 0 else dim


def _check_sample_probs(sample_probs, dim):
    if not torch.is_tensor(sample_probs):
        raise TypeError("sample_probs must be a tensor of per-sample class probabilities shaped "
                        f"(n_samples, ..., n_classes), got {type(sample_probs).__name__}")
    dim = _check_dim(dim)
    if sample_probs.dim() < 2:
        raise ValueError("sample_probs must have a leading sample dimension and a class "
                         f"dimension, got shape {tuple(sample_probs.shape)}")
    d = _stacked_dim(dim)
    if not -sample_probs.dim() <= d < sample_probs.dim() or d in (0, -sample_probs.dim()):
        raise ValueError(f"dim={dim} is not a class dimension of per-sample outputs shaped "
                         f"{tuple(sample_probs.shape[1:])}")
    if sample_probs.shape[0] == 0:
        raise ValueError("sample_probs has no samples (its leading dimension is 0)")
    if sample_probs.numel():
        p = sample_probs.detach()
        tol = max(1e-3, 4 * torch.finfo(p.dtype).eps * p.shape[d]) \
            if p.is_floating_point() else 1e-3
        if not bool(torch.isfinite(p).all()):
            raise ValueError("sample_probs must be finite, got NaN or inf")
        if bool((p < 0).any()) or float((p.sum(d, dtype=torch.float64) - 1).abs().max()) > tol:
            raise ValueError("sample_probs must be probabilities (entries >= 0, summing to 1 "
                             f"along dim={dim}): logits or log-probabilities? Apply softmax "
                             "(or exp) first")
    return d


# --------------------------------------------------------------------------- sampling
def _draw_stacked(var_model, n):
    """``{name: tensor of shape (n, *param.shape)}``: n independent posterior draws."""
    out = {}
    for _, post in var_model.named_posteriors():
        means = [var_model._mean_of(name) for name in post.names]
        if isinstance(post, MeanFieldPosterior):
            (mean,) = means
            eps = torch.randn((n,) + tuple(mean.shape), dtype=mean.dtype, device=mean.device)
            out[post.names[0]] = mean + post.stddev * eps
        else:
            draws = [post.sample(means) for _ in range(n)]
            for i, name in enumerate(post.names):
                out[name] = torch.stack([d[i] for d in draws])
    return out


def _combine(parts, join):
    """Join per-sample (or per-chunk) outputs leaf by leaf: tensors, or tuples/lists/dicts of
    them, nested (an LSTM returns ``(output, (h, c))``)."""
    first = parts[0]
    if torch.is_tensor(first):
        return join(parts)
    if isinstance(first, (tuple, list)):
        joined = [_combine([p[i] for p in parts], join) for i in range(len(first))]
        return type(first)(*joined) if hasattr(first, "_fields") else type(first)(joined)
    if isinstance(first, dict):
        return type(first)((k, _combine([p[k] for p in parts], join)) for k in first)
    raise TypeError("the model must return tensors (or tuples, lists or dicts of tensors) to be "
                    f"sampled, got {type(first).__name__}")


def _stack_outputs(outputs):
    return _combine(outputs, torch.stack)


def _cat_outputs(chunks):
    return _combine(chunks, torch.cat)


def _vectorized(var_model, n_samples, chunk_size, args, kwargs):
    model = var_model.model

    def one(params):
        return functional_call(model, params, args, kwargs, strict=False)

    step = chunk_size or n_samples
    chunks = []
    for start in range(0, n_samples, step):
        params = _draw_stacked(var_model, min(step, n_samples - start))
        chunks.append(vmap(one, randomness="different")(params))
    return chunks[0] if len(chunks) == 1 else _cat_outputs(chunks)


def _looped(var_model, n_samples, args, kwargs):
    outputs = []
    last = var_model.last_noise        # what a natural-gradient optimizer will read
    try:
        with var_model.sampling(True):
            for _ in range(n_samples):
                outputs.append(var_model(*args, **kwargs))
    finally:
        var_model.last_noise = last
    return _stack_outputs(outputs)


def _n_posterior_numbers(var_model):
    return sum(var_model._mean_of(n).numel() for n in var_model.posterior_parameters())


def sample_predictions(var_model, *args, n_samples=20, vectorize=None, chunk_size=None,
                       **kwargs):
    """The model's outputs under ``n_samples`` posterior weight samples, stacked on a new
    leading dimension (a tuple of such tensors if the model returns a tuple).

    Runs in evaluation mode (BatchNorm running statistics, no dropout) and restores the mode.

    Args:
        var_model: a :class:`~pyvarinf2.VariationalModel`.
        *args, **kwargs: the model's inputs.
        n_samples: number of weight samples S (>= 1).
        vectorize: ``True`` runs the S forwards as one ``torch.func.vmap`` over stacked weight
            samples, ``False`` loops over samples, ``None`` (default) vectorises when the
            stacked samples hold at most ``VECTORIZE_MAX_NUMBERS`` numbers and falls back to
            the loop if the model does not support ``vmap``.
        chunk_size: with vectorisation, how many samples go through one ``vmap`` call (bounds
            the memory; default all S).
    """
    _check_var_model(var_model)
    n_samples = _check_n_samples(n_samples)
    vectorize = _check_vectorize(vectorize)
    chunk_size = _check_chunk_size(chunk_size)
    modes = [(m, m.training) for m in var_model.modules()]   # restored module by module
    var_model.eval()
    try:
        if vectorize is False:
            return _looped(var_model, n_samples, args, kwargs)
        if vectorize is True:
            return _vectorized(var_model, n_samples, chunk_size, args, kwargs)
        numbers_needed = (chunk_size or n_samples) * _n_posterior_numbers(var_model)
        if numbers_needed <= VECTORIZE_MAX_NUMBERS:
            try:
                return _vectorized(var_model, n_samples, chunk_size, args, kwargs)
            except (RuntimeError, NotImplementedError, ValueError, TypeError):
                pass  # an operation without a vmap rule: loop instead (errors in the user's
                # inputs are raised again, by the loop)
        return _looped(var_model, n_samples, args, kwargs)
    finally:
        for m, mode in modes:
            m.training = mode


# --------------------------------------------------------------------------- classification
def predictive_probs(var_model, *args, n_samples=20, dim=-1, vectorize=None, chunk_size=None,
                     **kwargs):
    """MC predictive class probabilities ``mean_s softmax(f_s(x))`` over ``dim`` (the model
    returns logits or log-probabilities)."""
    dim = _check_dim(dim)
    logits = sample_predictions(var_model, *args, n_samples=n_samples, vectorize=vectorize,
                                chunk_size=chunk_size, **kwargs)
    return torch.softmax(_only_tensor(logits), dim=_stacked_dim(dim)).mean(0)


def _entropy(probs, dim):
    return torch.special.entr(probs).sum(dim)


def predictive_entropy(sample_probs, dim=-1):
    """Entropy (nats) of the MC predictive ``H[mean_s p_s]``: total uncertainty.

    ``sample_probs``: per-sample class probabilities shaped ``(S, ..., C)``; ``dim`` is the
    class dimension of one sample's output (``-1`` by default; a non-negative ``dim`` is counted
    without the leading sample dimension)."""
    d = _check_sample_probs(sample_probs, dim)
    mean = sample_probs.mean(0)
    return _entropy(mean, d - 1 if d > 0 else d)


def expected_entropy(sample_probs, dim=-1):
    """Mean over samples of the per-sample entropies ``mean_s H[p_s]``: the aleatoric part."""
    d = _check_sample_probs(sample_probs, dim)
    return _entropy(sample_probs, d).mean(0)


def mutual_information(sample_probs, dim=-1):
    """``H[mean_s p_s] - mean_s H[p_s]``: the mutual information between the label and the
    weights under the MC posterior (the epistemic part, >= 0)."""
    return (predictive_entropy(sample_probs, dim)
            - expected_entropy(sample_probs, dim)).clamp_min(0.0)


class ClassificationPrediction(NamedTuple):
    probs: torch.Tensor
    """MC predictive class probabilities."""
    predictive_entropy: torch.Tensor
    """Total uncertainty, nats."""
    expected_entropy: torch.Tensor
    """Aleatoric part, nats."""
    mutual_information: torch.Tensor
    """Epistemic part, nats."""
    sample_probs: torch.Tensor
    """Per-sample class probabilities, shape (S, ...)."""


def classification_predictive(var_model, *args, n_samples=20, dim=-1, vectorize=None,
                              chunk_size=None, **kwargs):
    """Predictive probabilities and their uncertainty decomposition in one pass of S samples.

    Returns a :class:`ClassificationPrediction` ``(probs, predictive_entropy, expected_entropy,
    mutual_information, sample_probs)``."""
    dim = _check_dim(dim)
    out = sample_predictions(var_model, *args, n_samples=n_samples, vectorize=vectorize,
                             chunk_size=chunk_size, **kwargs)
    sample_probs = torch.softmax(_only_tensor(out), dim=_stacked_dim(dim))
    total = predictive_entropy(sample_probs, dim)
    aleatoric = expected_entropy(sample_probs, dim)
    return ClassificationPrediction(sample_probs.mean(0), total, aleatoric,
                                    (total - aleatoric).clamp_min(0.0), sample_probs)


def _only_tensor(out):
    if not torch.is_tensor(out):
        raise TypeError("for classification the model must return one tensor of logits or "
                        f"log-probabilities, got a {type(out).__name__}")
    return out


# --------------------------------------------------------------------------- regression
class RegressionPrediction(NamedTuple):
    mean: torch.Tensor
    """MC predictive mean."""
    variance: torch.Tensor
    """Predictive variance: aleatoric + epistemic."""
    epistemic_variance: torch.Tensor
    """Variance of the per-sample means (the weights' uncertainty)."""
    aleatoric_variance: torch.Tensor
    """Mean observation-noise variance."""


def predictive_mean(var_model, *args, n_samples=20, vectorize=None, chunk_size=None, **kwargs):
    """MC predictive mean ``mean_s f_s(x)`` of a regression model (for a model returning
    ``(mean, variance)``, of its first output)."""
    out = sample_predictions(var_model, *args, n_samples=n_samples, vectorize=vectorize,
                             chunk_size=chunk_size, **kwargs)
    if not torch.is_tensor(out):
        out = out[0]
    return out.mean(0)


def regression_predictive(var_model, *args, n_samples=20, noise_variance=None, vectorize=None,
                          chunk_size=None, **kwargs):
    """Predictive mean and variance of a regression model.

    The model returns either the mean (then ``noise_variance`` is the known observation-noise
    variance: a number or a tensor broadcastable to the output; ``None`` means 0, the epistemic
    variance alone), or a pair ``(mean, variance)`` per sample (a heteroscedastic model; then
    ``noise_variance`` must be ``None``).

    Returns a :class:`RegressionPrediction` ``(mean, variance, epistemic_variance,
    aleatoric_variance)`` with ``variance = aleatoric_variance + epistemic_variance``.
    """
    if noise_variance is not None:
        if torch.is_tensor(noise_variance):
            if not bool((noise_variance >= 0).all()) or not bool(
                    torch.isfinite(noise_variance).all()):
                raise ValueError("noise_variance must be finite and >= 0 everywhere, got a "
                                 "tensor with negative or non-finite entries")
        elif isinstance(noise_variance, bool) or not isinstance(noise_variance, numbers.Real) \
                or not noise_variance >= 0 or noise_variance == float("inf"):
            raise ValueError(f"noise_variance must be None, a finite number >= 0 or a tensor, "
                             f"got {noise_variance!r}")
    out = sample_predictions(var_model, *args, n_samples=n_samples, vectorize=vectorize,
                             chunk_size=chunk_size, **kwargs)
    if torch.is_tensor(out):
        means = out
        noise = None if noise_variance is None else torch.as_tensor(
            noise_variance, dtype=means.dtype, device=means.device)
        aleatoric = (torch.zeros_like(means[0]) if noise is None
                     else noise.expand_as(means[0]).clone())
    else:
        if len(out) != 2:
            raise TypeError("a regression model must return the mean, or a pair (mean, "
                            f"variance); got a {type(out).__name__} of {len(out)} tensors")
        if noise_variance is not None:
            raise ValueError("noise_variance must be None when the model returns its own "
                             f"(mean, variance), got {noise_variance!r}")
        means, variances = out
        aleatoric = variances.mean(0)
    mean = means.mean(0)
    epistemic = ((means - mean) ** 2).mean(0)
    return RegressionPrediction(mean, aleatoric + epistemic, epistemic, aleatoric)
