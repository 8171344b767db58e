"""Write a UCI regression results table (CSV + Markdown) from ``pyvarinf2 regression-table``
output directories, including splits that are finished when a run is still going or was stopped.

    python benchmarks/uci_table.py --run-dir runs/uci_full_yacht [--run-dir DIR ...] \
        --datasets yacht --methods noisy_kfac,noisy_adam,bbb --out results/uci_regression \
        --command "pyvarinf2 regression-table ..." [--epochs N] [--splits N]

With several ``--run-dir`` the first one holding a split's result (with the job's fingerprint)
supplies it. The Markdown table puts each method's mean ± standard error over its finished
splits beside the MC-dropout results shipped with the data (mean ± standard error over the same
splits' files), the noisy K-FAC numbers of Zhang et al. (2018) quoted in REFERENCE.md and the
log-likelihood ceiling of the protocol's noise model (:func:`ll_ceiling`); every row says how
many splits it averages.
"""
import argparse
import math
import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyvarinf2 import data as data_mod  # noqa: E402
from pyvarinf2 import experiments as ex  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine  # noqa: E402

# Zhang et al. 2018, noisy K-FAC (NNG-MVG), test RMSE / test log-likelihood, as quoted in
# REFERENCE.md (naval is not quoted there)
PAPER_NOISY_KFAC = {"bostonHousing": (2.74, -2.45), "concrete": (5.02, -3.04),
                    "energy": (0.49, -1.42), "kin8nm": (0.076, 1.15),
                    "power-plant": (3.89, -2.78), "protein-tertiary-structure": (4.10, -2.84),
                    "wine-quality-red": (0.64, -0.97), "yacht": (0.98, -2.32)}


def mc_dropout(data_dir, dataset, splits=None):
    """(rmse mean, rmse se, ll mean, ll se, n) over the MC-dropout result files of ``dataset``.

    The folder holds two RMSE files: ``test_rmse_*`` is *standard* dropout (weights scaled by
    the keep probability, one deterministic pass) and ``test_MC_rmse_*`` MC dropout (the mean
    of sampled passes), whose log-likelihood is ``test_ll_*``; the MC pair is read (their
    log says "errors" and "MC errors": boston 3.61 and 2.90). ``splits``: average over those
    split indices only (the splits a row of ours has finished), else over all."""
    root = pathlib.Path(data_dir) / "uci" / dataset / "results"
    out = []
    for key in ("test_MC_rmse", "test_ll"):
        files = sorted(root.glob(f"{key}_*.txt"))
        if not files:
            return None
        vals = np.loadtxt(files[0], ndmin=1)
        if splits is not None:
            vals = vals[sorted(splits)]
        se = float(vals.std(ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else float("nan")
        out += [float(vals.mean()), se]
    return (*out, len(vals))


def ll_ceiling(data_dir, dataset, alpha0=6.0, beta0=6.0):
    """Mean over the splits of an upper bound on the test log-likelihood per point (original
    units) of any model whose observation precision τ has the variational posterior
    q(τ) = Gamma(α, β) of the protocol, learned under a Gamma(α0, β0) prior.

    Given the network's posterior, the optimal q(τ) is the conjugate update
    α = α0 + N/2, β = β0 + E[SSE]/2 (tests/test_cli.py checks our noise model reaches it), so
    E_q[τ] ≤ (α0 + N/2) / β0 in standardised units. The predictive density of a point is a
    mixture over τ of N(y; f, 1/τ), at most E_q[sqrt(τ / 2π)] ≤ sqrt(E_q[τ] / 2π) (Jensen),
    so in original units log p(y) ≤ ½ log(E_q[τ] / 2π) − log std(y_train), whatever the
    network and its errors (which only lower it)."""
    vals = []
    for s in range(data_mod.uci_n_splits(dataset, data_dir)):
        d = data_mod.load_uci(dataset, s, data_dir)
        e_tau = (alpha0 + d.x_train.shape[0] / 2) / beta0
        vals.append(0.5 * math.log(e_tau / (2 * math.pi)) - math.log(d.y_std))
    return float(np.mean(vals))


def fmt(mean, se, digits=3):
    if mean != mean:
        return "–"
    s = f"{mean:.{digits}g}"
    return s if se != se else f"{s} ± {se:.2g}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, action="append",
                    help="a regression-table output directory; repeat to combine several")
    ap.add_argument("--datasets", required=True)
    ap.add_argument("--methods", required=True)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--splits", type=int, default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", required=True, help="path without suffix: writes .csv and .md")
    ap.add_argument("--command", required=True, help="the command that produced the run")
    ap.add_argument("--wall", default="", help="wall time of the run, as text")
    ap.add_argument("--ceilings", action="store_true",
                    help="append the log-likelihood ceiling of all nine datasets")
    args = ap.parse_args(argv)
    datasets, methods = args.datasets.split(","), args.methods.split(",")
    plans = [ex.plan_regression_table(datasets, methods, epochs=args.epochs,
                                      n_splits=args.splits, data_dir=args.data_dir,
                                      out_dir=run_dir) for run_dir in args.run_dir]
    jobs = []
    for alternatives in zip(*plans):   # the same jobs in the same order, one per run dir
        found = [j for j in alternatives if j["done"]]
        jobs.append(found[0] if found else alternatives[0])
    rows = ex.aggregate_results(jobs)
    planned = {}
    for job in jobs:
        planned[job["key"][:2]] = planned.get(job["key"][:2], 0) + 1
    out = pathlib.Path(args.out)
    ex.write_results_csv(rows, out.with_suffix(".csv"))
    data_dir = data_mod.resolve_data_dir(args.data_dir)
    by = {(r["dataset"], r["method"]): r for r in rows}
    m = machine()
    lines = [f"# UCI regression — {', '.join(datasets)}", "",
             f"Produced by `{args.command}`, then `python benchmarks/uci_table.py` on the finished "
             f"splits; {m.get('cpu')} ({m.get('cores')} cores), torch {m.get('torch')}"
             + (f", wall time {args.wall}" if args.wall else "") + ".", "",
             "Test RMSE / test log-likelihood, mean ± standard error over the finished splits "
             "(original units; standard error = sample std with ddof=1 over √n, for the "
             "MC-dropout columns too, whose own logs use ddof=0: theirs are √(n/(n−1)) smaller, "
             "×0.97 for 20 splits); `n` = finished / planned splits; the MC-dropout columns "
             "average the same splits as the row (all the planned splits when the row has "
             "none yet).", "",
             "| dataset | method | n | RMSE | test LL | MC dropout RMSE | MC dropout LL | "
             "noisy K-FAC, Zhang et al. 2018 (RMSE / LL) | LL ceiling, Gamma(6, 6) noise |",
             "|---|---|---|---|---|---|---|---|---|"]
    finished = {}
    for job in jobs:
        if job["done"]:
            finished.setdefault(job["key"][:2], []).append(job["key"][2])
    ceilings = {}
    for d in datasets:
        paper = PAPER_NOISY_KFAC.get(d)
        ceilings[d] = ll_ceiling(data_dir, d)
        for meth in methods:
            r = by.get((d, meth))
            if r is None:
                continue
            # MC dropout over the same splits as the row (a partial row's splits may be the
            # easy ones: boston's first three average 2.58 RMSE against 2.90 over all 20)
            mc = mc_dropout(data_dir, d, finished.get((d, meth)))
            lines.append(
                f"| {d} | {meth} | {r['n_splits']}/{planned[(d, meth)]} | "
                f"{fmt(r['rmse_mean'], r['rmse_se'])} | {fmt(r['ll_mean'], r['ll_se'])} | "
                + (f"{fmt(mc[0], mc[1])} | {fmt(mc[2], mc[3])} | " if mc else "– | – | ")
                + (f"{paper[0]} / {paper[1]} | " if paper else "– | ")
                + f"{ceilings[d]:.2f} |")
    if args.ceilings:
        lines += ["", "## The log-likelihood ceiling of the protocol, all nine datasets", "",
                  "Upper bound on the mean test log-likelihood of any model trained under the "
                  "protocol's Gamma(6, 6) prior on the noise precision (see `ll_ceiling` in "
                  "benchmarks/uci_table.py), beside the MC-dropout and paper numbers.", "",
                  "| dataset | N train | LL ceiling | MC dropout LL | noisy K-FAC, paper, LL | "
                  "MC dropout above the ceiling |", "|---|---|---|---|---|---|"]
        for d in data_mod.UCI_DATASETS:
            mc = mc_dropout(data_dir, d)
            paper = PAPER_NOISY_KFAC.get(d)
            c = ceilings.get(d)
            if c is None:
                c = ll_ceiling(data_dir, d)
            n_train = data_mod.load_uci(d, 0, data_dir).x_train.shape[0]
            lines.append(f"| {d} | {n_train} | {c:.2f} | "
                         + (f"{mc[2]:.2f} | " if mc else "– | ")
                         + (f"{paper[1]} | " if paper else "– | ")
                         + ("**yes**" if mc and mc[2] > c else "no") + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("wrote", out.with_suffix(".csv"), "and", out.with_suffix(".md"))


if __name__ == "__main__":
    main()
