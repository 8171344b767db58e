"""Write a UCI regression results table (CSV + Markdown) from a ``pyvarinf2 regression-table``
output directory, including splits that are finished when the run is still going or was stopped.

    python benchmarks/uci_table.py --run-dir runs/uci_full_yacht --datasets yacht \
        --methods noisy_kfac,noisy_adam,bbb --out results/uci_regression_full_yacht \
        --command "pyvarinf2 regression-table ..." [--epochs N] [--splits N]

The Markdown table puts each method's mean ± standard error over its finished splits beside
the MC-dropout results shipped with the data (mean ± standard error over the same splits'
files) and the noisy K-FAC numbers of Zhang et al. (2018) quoted in REFERENCE.md; every row says
how many splits it averages.
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


def mc_dropout(data_dir, dataset):
    """(rmse mean, rmse se, ll mean, ll se, n) over the MC-dropout result files of ``dataset``."""
    root = pathlib.Path(data_dir) / "uci" / dataset / "results"
    out = []
    for key in ("test_rmse", "test_ll"):
        files = sorted(root.glob(f"{key}_*.txt"))
        if not files:
            return None
        vals = np.loadtxt(files[0], ndmin=1)
        out += [float(vals.mean()), float(vals.std(ddof=1) / math.sqrt(len(vals)))]
    return (*out, len(vals))


def fmt(mean, se, digits=3):
    if mean != mean:
        return "–"
    s = f"{mean:.{digits}g}"
    return s if se != se else f"{s} ± {se:.2g}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--datasets", required=True)
    ap.add_argument("--methods", required=True)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--splits", type=int, default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", required=True, help="path without suffix: writes .csv and .md")
    ap.add_argument("--command", required=True, help="the command that produced the run")
    ap.add_argument("--wall", default="", help="wall time of the run, as text")
    args = ap.parse_args(argv)
    datasets, methods = args.datasets.split(","), args.methods.split(",")
    jobs = ex.plan_regression_table(datasets, methods, epochs=args.epochs,
                                    n_splits=args.splits, data_dir=args.data_dir,
                                    out_dir=args.run_dir)
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
             "(original units); `n` = finished / planned splits.", "",
             "| dataset | method | n | RMSE | test LL | MC dropout RMSE | MC dropout LL | "
             "noisy K-FAC, Zhang et al. 2018 (RMSE / LL) |",
             "|---|---|---|---|---|---|---|---|"]
    for d in datasets:
        mc = mc_dropout(data_dir, d)
        paper = PAPER_NOISY_KFAC.get(d)
        for meth in methods:
            r = by.get((d, meth))
            if r is None:
                continue
            lines.append(
                f"| {d} | {meth} | {r['n_splits']}/{planned[(d, meth)]} | "
                f"{fmt(r['rmse_mean'], r['rmse_se'])} | {fmt(r['ll_mean'], r['ll_se'])} | "
                + (f"{fmt(mc[0], mc[1])} | {fmt(mc[2], mc[3])} | " if mc else "– | – | ")
                + (f"{paper[0]} / {paper[1]} |" if paper else "– |"))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("wrote", out.with_suffix(".csv"), "and", out.with_suffix(".md"))


if __name__ == "__main__":
    main()
