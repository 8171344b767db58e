"""PNG plots for evaluations: reliability diagram, predictive-entropy histograms, training
curves, regression predictions.

Figures are built with :class:`matplotlib.figure.Figure` and written by the Agg canvas
directly, so nothing here touches ``pyplot`` or the global backend (safe on a machine without a
display and inside a notebook). Every function returns the path it wrote.
"""
import math
import pathlib

import numpy as np

from . import metrics

__all__ = ["reliability_diagram", "entropy_histograms", "training_curves",
           "regression_predictions"]


def _figure(nrows=1, ncols=1, size=(5.0, 4.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, path):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def reliability_diagram(probs, labels, path, n_bins=15, title=None):
    """Accuracy vs confidence per equal-width bin, with the diagonal and the ECE."""
    conf, acc, counts = metrics.calibration_bins(probs, labels, n_bins)
    ece = metrics.expected_calibration_error(probs, labels, n_bins)
    fig, axes = _figure(2, 1, size=(5.0, 6.0))
    ax, axc = axes[0, 0], axes[1, 0]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    centers = 0.5 * (edges[1:] + edges[:-1])
    width = 1.0 / n_bins
    ok = counts > 0
    ax.bar(centers[ok], acc[ok], width=width, edgecolor="black", color="tab:blue",
           label="accuracy")
    ax.bar(centers[ok], (conf - acc)[ok], bottom=acc[ok], width=width, edgecolor="tab:red",
           color="tab:red", alpha=0.3, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title + ' — ' if title else ''}ECE = {100 * ece:.2f}%")
    ax.legend(loc="upper left", fontsize=8)
    axc.bar(centers, counts, width=width, edgecolor="black", color="gray")
    axc.set_xlim(0, 1)
    axc.set_yscale("log" if counts.max() > 0 else "linear")
    axc.set_xlabel("confidence")
    axc.set_ylabel("examples")
    return _save(fig, path)


def entropy_histograms(entropy_in, entropy_out, path, labels=("in-distribution",
                                                              "out-of-distribution"),
                       n_classes=None, bins=40):
    """Histograms of predictive entropy in and (optionally) out of distribution, with the
    OOD AUROC in the title."""
    fig, axes = _figure()
    ax = axes[0, 0]
    e_in = np.asarray(entropy_in, dtype=np.float64)
    top = math.log(n_classes) if n_classes else float(e_in.max(initial=1.0))
    if entropy_out is not None:
        e_out = np.asarray(entropy_out, dtype=np.float64)
        top = max(top, float(e_out.max(initial=0.0)))
    edges = np.linspace(0.0, top if top > 0 else 1.0, bins + 1)
    ax.hist(e_in, bins=edges, density=True, alpha=0.6, label=labels[0] or "in-distribution")
    title = "predictive entropy"
    if entropy_out is not None:
        ax.hist(e_out, bins=edges, density=True, alpha=0.6,
                label=labels[1] or "out-of-distribution")
        title += f" — OOD AUROC = {metrics.ood_auroc(e_in, e_out):.3f}"
    ax.set_xlabel("entropy (nats)")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def training_curves(history, path, title=None):
    """One panel per logged quantity (loss, NLL, test metrics) against the epoch."""
    keys = [k for k in ("train_loss", "train_nll", "test_rmse", "test_ll", "test_accuracy",
                        "test_nll", "test_ece", "noise_std") if any(k in r for r in history)]
    if not keys:
        keys = ["train_nll"]
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = _figure(nrows, ncols, size=(4.0 * ncols, 3.0 * nrows))
    for i, key in enumerate(keys):
        ax = axes[i // ncols, i % ncols]
        pts = [(r["epoch"], r[key]) for r in history
               if key in r and isinstance(r[key], (int, float)) and math.isfinite(r[key])]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, marker="." if len(pts) < 30 else None)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    for j in range(len(keys), nrows * ncols):
        axes[j // ncols, j % ncols].set_visible(False)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def regression_predictions(targets, means, stds, path, title=None):
    """Predicted vs true test targets with ±2 predictive standard deviations."""
    y, m, s = (np.asarray(a, dtype=np.float64) for a in (targets, means, stds))
    fig, axes = _figure()
    ax = axes[0, 0]
    ax.errorbar(y, m, yerr=2 * s, fmt="o", ms=3, alpha=0.7, elinewidth=0.8)
    lo, hi = float(min(y.min(), m.min())), float(max(y.max(), m.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.set_title(title or "test predictions (±2 sd)")
    return _save(fig, path)
