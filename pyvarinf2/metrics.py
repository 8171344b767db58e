"""Evaluation metrics for predictive distributions.

Inputs may be torch tensors or array-likes; everything is computed in float64 numpy and
returned as a Python float. Classification metrics take *probabilities* (for a Bayesian model,
the Monte-Carlo average of the per-sample softmax), shape ``(n, k)``, and integer labels ``(n,)``.

* :func:`accuracy` — fraction of argmax predictions equal to the label.
* :func:`nll` — mean of ``-log p(y_i)`` (natural log, nats).
* :func:`expected_calibration_error` — ECE with equal-width confidence bins (15 by default):
  ``sum_b |B_b|/n · |acc(B_b) − conf(B_b)|``, confidence = max probability, bin ``b`` holding
  confidences in ``((b−1)/M, b/M]`` (confidence 0 goes to the first bin).
* :func:`brier_score` — ``mean_i sum_k (p_ik − 1[y_i = k])²`` (the multi-class Brier score of
  Brier 1950, in [0, 2]; *not* divided by the number of classes).
* :func:`rmse` — root mean squared error of point predictions.
* :func:`gaussian_log_likelihood` — mean test log-likelihood of a Gaussian mixture predictive:
  ``mean_i log (1/S) sum_s N(y_i; μ_si, σ_si²)`` (a logmeanexp over samples).
* :func:`ood_auroc` — area under the ROC curve for telling out-of-distribution inputs (positives)
  from in-distribution ones by a score (higher = more likely OOD, e.g. predictive entropy):
  rank-based, ties counted one half, so it equals Mann-Whitney ``U / (n_in · n_out)``.
"""
import math
import numbers

import numpy as np
import torch

__all__ = ["accuracy", "nll", "expected_calibration_error", "ece", "calibration_bins",
           "brier_score", "rmse", "gaussian_log_likelihood", "ood_auroc", "predictive_entropy",
           "classification_metrics"]


def _np(x, dtype=np.float64):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point():     # bfloat16 has no numpy dtype
            x = x.to(torch.float64)
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def _eps(x):
    """Machine epsilon of ``x``'s floating dtype (torch or numpy), float32's otherwise."""
    dtype = getattr(x, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    try:
        return float(np.finfo(dtype).eps)
    except (TypeError, ValueError):
        return float(np.finfo(np.float32).eps)


def _check_probabilities(p, name="probs", eps=0.0):
    """Finite, non-negative rows summing to 1 (last axis) up to the rounding of the input's
    dtype (``eps``): not logits or log-probabilities."""
    if not np.isfinite(p).all():
        raise ValueError(f"{name} must be finite, got NaN or inf")
    tol = max(1e-3, 4 * eps * (p.shape[-1] if p.ndim else 1))
    if p.size and (p.min() < 0 or np.abs(p.sum(-1) - 1.0).max() > tol):
        raise ValueError(f"{name} must be probabilities (entries >= 0, each row summing to 1), "
                         f"got entries in [{p.min():.3g}, {p.max():.3g}] and row sums up to "
                         f"{np.abs(p.sum(-1) - 1.0).max() + 1:.3g}: logits or "
                         "log-probabilities? Apply softmax (or exp) first")


def _labels(labels):
    if isinstance(labels, torch.Tensor):
        t = labels.detach().cpu()
        raw = (t.double() if t.is_floating_point() else t).numpy()
    else:
        raw = np.asarray(labels)
    if raw.dtype == np.bool_:
        raise ValueError("labels must be class indices, got booleans")
    if np.issubdtype(raw.dtype, np.floating) and not np.array_equal(raw, np.round(raw)):
        raise ValueError("labels must be integer class indices, got non-integer values "
                         f"such as {raw[raw != np.round(raw)].ravel()[0]!r}")
    return np.asarray(raw, dtype=np.int64)


def _probs_labels(probs, labels):
    p = _np(probs)
    y = _labels(labels)
    if p.ndim != 2:
        raise ValueError(f"probs must have shape (n, n_classes), got {p.shape}")
    if y.shape != (p.shape[0],):
        raise ValueError(f"labels must have shape ({p.shape[0]},), got {y.shape}")
    if p.shape[0] == 0:
        raise ValueError("no examples (n = 0)")
    _check_probabilities(p, eps=_eps(probs))
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"labels must lie in 0..{p.shape[1] - 1}, got range "
                         f"{y.min()}..{y.max()}")
    return p, y


def accuracy(probs, labels):
    """Fraction of examples whose most probable class is the label."""
    p, y = _probs_labels(probs, labels)
    return float((p.argmax(1) == y).mean())


def nll(probs, labels, eps=1e-12):
    """Mean negative log-likelihood ``-log p(y)``; probabilities are floored at ``eps``."""
    p, y = _probs_labels(probs, labels)
    return float(-np.log(np.maximum(p[np.arange(len(y)), y], eps)).mean())


def calibration_bins(probs, labels, n_bins=15):
    """Per-bin ``(confidence, accuracy, count)`` arrays for equal-width confidence bins;
    empty bins have confidence and accuracy NaN."""
    if not isinstance(n_bins, numbers.Integral) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    p, y = _probs_labels(probs, labels)
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(np.float64)
    # bin b (0-based) holds conf in (edge_b, edge_{b+1}] with edges = linspace(0, 1, M + 1);
    # conf = 0 goes to bin 0
    inner_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    idx = np.searchsorted(inner_edges, conf, side="left")
    counts = np.bincount(idx, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(counts > 0, conf_sum / np.maximum(counts, 1), np.nan)
        mean_acc = np.where(counts > 0, acc_sum / np.maximum(counts, 1), np.nan)
    return mean_conf, mean_acc, counts.astype(np.int64)


def expected_calibration_error(probs, labels, n_bins=15):
    """ECE = ``sum_b |B_b|/n · |acc(B_b) − conf(B_b)|`` over ``n_bins`` equal-width bins."""
    conf, acc, counts = calibration_bins(probs, labels, n_bins)
    nonempty = counts > 0
    return float((counts[nonempty] * np.abs(acc[nonempty] - conf[nonempty])).sum()
                 / counts.sum())


ece = expected_calibration_error


def brier_score(probs, labels):
    """Multi-class Brier score ``mean_i sum_k (p_ik − onehot_ik)²``."""
    p, y = _probs_labels(probs, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(((p - onehot) ** 2).sum(1).mean())


def rmse(predictions, targets):
    """Root mean squared error."""
    a, b = _np(predictions).ravel(), _np(targets).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"predictions and targets must have the same non-zero size, got "
                         f"{a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("predictions and targets must be finite, got NaN or inf")
    return float(np.sqrt(((a - b) ** 2).mean()))


def gaussian_log_likelihood(targets, means, stds):
    """Mean over examples of ``log (1/S) sum_s N(y; means[s], stds[s]²)``.

    ``means`` has shape ``(S, n)`` (S predictive samples) or ``(n,)`` (one Gaussian);
    ``stds`` the same shape, or anything that broadcasts against it (``(S, 1)``, a scalar). A
    1-D ``stds`` of length n is per example; one std per sample must be passed as ``(S, 1)``
    (a 1-D ``(S,)`` would be read per example whenever S equals n)."""
    y = _np(targets).ravel()
    if y.size == 0:
        raise ValueError("no examples (targets is empty)")
    mu = _np(means)
    if mu.ndim == 1:
        mu = mu[None, :]
    if mu.ndim != 2 or mu.shape[1] != y.size:
        raise ValueError(f"means must have shape (S, {y.size}) or ({y.size},), got {mu.shape}")
    sd = _np(stds)
    if sd.ndim == 1 and sd.size == y.size:
        sd = sd[None, :]
    try:
        sd = np.broadcast_to(sd, mu.shape)
    except ValueError:
        raise ValueError(f"stds of shape {_np(stds).shape} do not broadcast to means "
                         f"{mu.shape}") from None
    if not (np.isfinite(y).all() and np.isfinite(mu).all() and np.isfinite(sd).all()):
        raise ValueError("targets, means and stds must be finite, got NaN or inf")
    if not (sd > 0).all():
        raise ValueError("stds must be > 0")
    logp = -0.5 * ((y[None, :] - mu) / sd) ** 2 - np.log(sd) - 0.5 * math.log(2 * math.pi)
    top = logp.max(0)
    lme = top + np.log(np.exp(logp - top[None, :]).mean(0))
    return float(lme.mean())


def ood_auroc(scores_in, scores_out):
    """AUROC of separating ``scores_out`` (positives) from ``scores_in`` (negatives), higher
    score = more OOD. Rank-based with average ranks for ties: ``U_out / (n_in · n_out)``."""
    from scipy.stats import rankdata
    s_in, s_out = _np(scores_in).ravel(), _np(scores_out).ravel()
    if s_in.size == 0 or s_out.size == 0:
        raise ValueError("both score sets must be non-empty")
    if not (np.isfinite(s_in).all() and np.isfinite(s_out).all()):
        raise ValueError("scores must be finite")
    ranks = rankdata(np.concatenate([s_in, s_out]))  # average ranks, 1-based
    n_in, n_out = s_in.size, s_out.size
    u_out = ranks[n_in:].sum() - n_out * (n_out + 1) / 2.0
    return float(u_out / (n_in * n_out))


def predictive_entropy(probs, eps=1e-12):
    """Entropy ``-sum_k p_k log p_k`` of each row (nats), as a numpy array."""
    p = _np(probs)
    _check_probabilities(p, eps=_eps(probs))
    return -(p * np.log(np.maximum(p, eps))).sum(-1)


def classification_metrics(probs, labels, n_bins=15):
    """``{'accuracy', 'nll', 'ece', 'brier'}`` for one set of predictive probabilities."""
    return {"accuracy": accuracy(probs, labels), "nll": nll(probs, labels),
            "ece": expected_calibration_error(probs, labels, n_bins),
            "brier": brier_score(probs, labels)}
