"""results/mnist.csv: every method on the full MNIST with the 784-400-400-10 MLP.

    python benchmarks/mnist_table.py [--epochs 20] [--methods map,bbb,...] [--workers 2]

For each method: ``pyvarinf2 train --config configs/classification/<method>_mnist.json
--hidden 400,400`` (its defaults otherwise), then ``pyvarinf2 evaluate`` (test accuracy, NLL,
ECE, Brier, OOD AUROC on Fashion-MNIST from predictive entropy). Runs go to runs/mnist_table/
and are resumable (a finished method is not rerun). Epochs-to-97% comes from the per-epoch test
accuracy in each run's metrics.csv. Writes results/mnist.csv and results/mnist.md with the
exact command, the machine and the wall time.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import machine  # noqa: E402

METHODS = ["map", "bbb", "noisy_adam", "noisy_kfac", "noisy_ekfac", "vogn", "ivon"]


def run_method(method, args):
    run_dir = os.path.join(ROOT, "runs", "mnist_table", method)
    eval_json = os.path.join(run_dir, "evaluation", "evaluation.json")
    if os.path.exists(eval_json) and not args.force:
        with open(eval_json) as fh:
            return method, json.load(fh), None
    exe = [sys.executable, "-m", "pyvarinf2"]
    t0 = time.time()
    train = exe + ["train", "--config", os.path.join(ROOT, "configs", "classification",
                                                      f"{method}_mnist.json"),
                   "--hidden", "400,400", "--epochs", str(args.epochs), "--threads", "1",
                   "--no-progress", "-o", run_dir]
    train += ["--resume"] if os.path.exists(os.path.join(run_dir, "checkpoint.pt")) else []
    if args.data_dir:
        train += ["--data-dir", args.data_dir]
    log = open(os.path.join(ROOT, "runs", "mnist_table", f"{method}.log"), "a")
    subprocess.run(train, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.time() - t0
    evaluate = exe + ["evaluate", run_dir, "-o", os.path.join(run_dir, "evaluation")]
    if args.data_dir:
        evaluate += ["--data-dir", args.data_dir]
    subprocess.run(evaluate, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    with open(eval_json) as fh:
        result = json.load(fh)
    result["train_wall_s"] = wall
    with open(eval_json, "w") as fh:
        json.dump(result, fh, indent=2)
    return method, result, None


def epochs_to(method, threshold=0.97):
    path = os.path.join(ROOT, "runs", "mnist_table", method, "metrics.csv")
    with open(path) as fh:
        for row in csv.DictReader(fh):
            for key in ("test_accuracy", "accuracy"):
                if key in row and row[key] not in ("", None) and float(row[key]) >= threshold:
                    return int(row["epoch"])
    return None


def final_objective(method):
    """(train NLL at the sampled weights, KL/N, their sum) of the last epoch in metrics.csv;
    for map the middle term is -log p(θ)/N and the sum is not an ELBO."""
    path = os.path.join(ROOT, "runs", "mnist_table", method, "metrics.csv")
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    last = rows[-1]
    nll, kl = float(last["train_nll"]), float(last["prior_term"])
    return nll, kl, (None if method == "map" else nll + kl)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    if args.data_dir is None and not os.environ.get("PYVARINF2_DATA"):
        shared = os.path.join(os.path.dirname(ROOT), "shared", "data")
        if os.path.isdir(shared):
            args.data_dir = shared
    methods = args.methods.split(",")
    os.makedirs(os.path.join(ROOT, "runs", "mnist_table"), exist_ok=True)
    t0 = time.time()
    with ThreadPoolExecutor(args.workers) as pool:
        results = list(pool.map(lambda m: run_method(m, args), methods))
    wall = time.time() - t0
    cols = ["method", "accuracy", "nll", "ece", "ood_auroc", "brier", "epochs",
            "epochs_to_97", "train_wall_s", "train_nll", "kl_per_example", "neg_elbo"]
    os.makedirs(os.path.join(ROOT, "results"), exist_ok=True)
    rows = []
    for method, res, _ in results:
        rows.append({"method": method, "accuracy": res["accuracy"], "nll": res["nll"],
                     "ece": res["ece"], "ood_auroc": res.get("ood_auroc"),
                     "brier": res.get("brier"), "epochs": res["epochs"],
                     "epochs_to_97": epochs_to(method), "train_wall_s": res.get("train_wall_s")})
        rows[-1]["train_nll"], rows[-1]["kl_per_example"], rows[-1]["neg_elbo"] = \
            final_objective(method)
    with open(os.path.join(ROOT, "results", "mnist.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    mach = machine()
    cmd = "python benchmarks/mnist_table.py " + " ".join(argv or sys.argv[1:])
    with open(os.path.join(ROOT, "results", "mnist.md"), "w") as fh:
        fh.write("# MNIST, 784-400-400-10 MLP, full 60k training set, 10k test\n\n")
        fh.write(f"Produced by `{cmd.strip()}` (each method: `pyvarinf2 train --config "
                 "configs/classification/<method>_mnist.json --hidden 400,400`, then `pyvarinf2 "
                 "evaluate`; OOD = Fashion-MNIST test set, AUROC of predictive entropy).\n\n")
        total = sum(r["train_wall_s"] or 0.0 for r in rows)
        fh.write(f"Machine: {mach['cpu']}, {mach['cores']} cores, no GPU, torch {mach['torch']}; "
                 f"{args.workers} runs in parallel, 1 thread each, while other work shared the "
                 f"machine. Training wall time per run in the last column (sum "
                 f"{total / 60:.1f} min; evaluation adds about a minute per run); this "
                 f"invocation took {wall / 60:.1f} min (finished runs are reused, not re-run).\n\n")
        fh.write("| method | accuracy | NLL | ECE | OOD AUROC | Brier | epochs | epochs to 97% "
                 "| train wall (s) |\n|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            def f(v, p=4):
                return "—" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))
            fh.write(f"| {r['method']} | {f(r['accuracy'])} | {f(r['nll'])} | {f(r['ece'])} | "
                     f"{f(r['ood_auroc'])} | {f(r['brier'])} | {r['epochs']} | "
                     f"{f(r['epochs_to_97'])} | {f(r['train_wall_s'], 0)} |\n")
        fh.write("\n## The variational objective at the end of training\n\n"
                 "Last epoch of each run's metrics.csv, per training example: the NLL at the "
                 "sampled weights (averaged over the epoch), KL(q || p)/N, and their sum, the "
                 "negative ELBO that every variational method here minimises (λ = 1, prior "
                 "N(0, 1)); lower is a better fit of the objective. For map the middle column is "
                 "-log p(θ)/N and there is no ELBO.\n\n"
                 "| method | train NLL | KL / N | negative ELBO |\n|---|---|---|---|\n")
        for r in rows:
            fh.write(f"| {r['method']} | {f(r['train_nll'])} | {f(r['kl_per_example'])} | "
                     f"{f(r['neg_elbo'])} |\n")
        fh.write("\nThe accuracy ranking is not the ELBO ranking. IVON keeps its posterior at "
                 "its initial, narrow scale (hess_init = 1 with β2 = 0.99999 decays by 11% over "
                 "these 12,000 steps), close to a point estimate with a large KL; Bayes-by-"
                 "backprop, started at σ = 10⁻³, is still shrinking its KL when training ends; "
                 "noisy Adam / VOGN reach the lowest negative ELBO and pay for it with more "
                 "weight noise and a lower accuracy. Reaching 98% with noisy Adam / VOGN at "
                 "λ = 1 is open (issue #3): with the true Fisher (fisher='true'), hess_init, "
                 "extrinsic damping and a cosine learning-rate schedule the best 10-epoch run "
                 "reached 97.4%; at a constant lr ≥ 3e-3 both Fisher variants diverged near "
                 "epoch 9 (the last layer's mean overflowed). The trust region kl_clip=1e-3 "
                 "kept a constant-lr 1e-2 empirical-Fisher run finite for 12 epochs, at "
                 "94.4–95.4%.\n")
    print(open(os.path.join(ROOT, "results", "mnist.md")).read())


if __name__ == "__main__":
    main()
