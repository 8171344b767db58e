"""MNIST with the diagonal natural-gradient optimizers against Bayes-by-backprop and plain Adam.

    python benchmarks/mnist_diagonal.py [--epochs 10] [--train-subset 0] [--methods ...]
                                        [--kl-weight 1.0] [--threads 0] [--out mnist_diagonal.json]

A 784-400-400-10 ReLU MLP on the official MNIST files (``../shared/data/mnist`` or
``$PYVARINF2_DATA/mnist``), batch 128, the optimizers' documented defaults:

* plain_adam: ``torch.optim.Adam(lr=1e-3)`` on the cross-entropy (a point estimate);
* bbb: Bayes-by-backprop, ``variationalize`` + Adam(lr=1e-3) on NLL + prior_loss()/N;
* noisy_adam / vogn / ivon: ``pyvarinf2.optim.<X>(var_model, dataset_size=N)``.

Test metrics: accuracy, NLL (nats per example) and ECE (15 equal-width confidence bins) of the
MC predictive (mean of ``--test-samples`` softmax outputs; plain Adam: its one network), and the
accuracy of the posterior-mean network. Targets from the issue: accuracy >= 98.0%, ECE <= 1.5%,
NLL below plain Adam's. A run with ``--train-subset`` or few epochs is a *reduced* run and the
results file says so.
"""
import argparse
import gzip
import os
import struct
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import pyvarinf2  # noqa: E402
from common import mlp, write_results  # noqa: E402

METHODS = ("plain_adam", "bbb", "noisy_adam", "vogn", "ivon")


def data_root():
    env = os.environ.get("PYVARINF2_DATA")
    if env:
        return os.path.join(env, "mnist")
    return os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data", "mnist")


def read_idx(path):
    with gzip.open(path) as fh:
        data = fh.read()
    nd = data[3]
    shape = struct.unpack(">" + "I" * nd, data[4:4 + 4 * nd])
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=4 + 4 * nd).reshape(shape).copy())


def load_mnist(root):
    def images(name):
        return read_idx(os.path.join(root, name)).float().div_(255.0).reshape(-1, 784)

    def labels(name):
        return read_idx(os.path.join(root, name)).long()

    return (images("train-images-idx3-ubyte.gz"), labels("train-labels-idx1-ubyte.gz"),
            images("t10k-images-idx3-ubyte.gz"), labels("t10k-labels-idx1-ubyte.gz"))


def metrics(probs, labels, n_bins=15):
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    nll = -torch.log(probs.gather(1, labels[:, None]).squeeze(1).clamp_min(1e-12)).mean()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=probs.dtype)
    ece = torch.zeros((), dtype=torch.float64)
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.double().mean() * (conf[mask].double().mean() - correct[mask].mean()).abs()
    return {"accuracy": correct.mean().item(), "nll": nll.item(), "ece": ece.item()}


def evaluate(model, x, y, samples, chunk=2000):
    with torch.no_grad():
        if isinstance(model, pyvarinf2.VariationalModel):
            model.eval()
            mean_acc = (torch.cat([model(x[i:i + chunk]).argmax(1)
                                   for i in range(0, len(x), chunk)]) == y).float().mean().item()
            probs = torch.zeros(len(x), 10, dtype=torch.float64)
            with model.sampling(True):
                for _ in range(samples):
                    probs += torch.cat([F.softmax(model(x[i:i + chunk]), 1).double()
                                        for i in range(0, len(x), chunk)])
            probs /= samples
            out = metrics(probs, y)
            out["mean_network_accuracy"] = mean_acc
            model.train()
            return out
        model.eval()
        probs = torch.cat([F.softmax(model(x[i:i + chunk]), 1).double()
                           for i in range(0, len(x), chunk)])
        model.train()
        return metrics(probs, y)


def build(method, n_train, kl_weight):
    torch.manual_seed(0)
    net = mlp(width=400, depth=2)
    if method == "plain_adam":
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        return net, opt, lambda out, y: F.cross_entropy(out, y)
    vm = pyvarinf2.variationalize(net)
    if method == "bbb":
        opt = torch.optim.Adam(vm.parameters(), lr=1e-3)
        return vm, opt, lambda out, y: (F.cross_entropy(out, y)
                                        + kl_weight * vm.prior_loss() / n_train)
    cls = {"noisy_adam": "NoisyAdam", "vogn": "VOGN", "ivon": "IVON"}[method]
    opt = getattr(pyvarinf2.optim, cls)(vm, dataset_size=n_train, kl_weight=kl_weight)
    return vm, opt, lambda out, y: F.cross_entropy(out, y)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--train-subset", type=int, default=0, help="0: all 60k images")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--kl-weight", type=float, default=1.0)
    ap.add_argument("--test-samples", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="mnist_diagonal.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    x, y, xt, yt = load_mnist(data_root())
    if args.train_subset:
        x, y = x[:args.train_subset], y[:args.train_subset]
    n = len(x)
    results = {}
    for method in args.methods.split(","):
        model, opt, loss_fn = build(method, n, args.kl_weight)
        g = torch.Generator().manual_seed(1)
        t0 = time.time()
        train_s = 0.0
        history = []
        for epoch in range(args.epochs):
            perm = torch.randperm(n, generator=g)
            t_epoch = time.time()
            for i in range(0, n, args.batch_size):
                idx = perm[i:i + args.batch_size]
                opt.zero_grad()
                loss_fn(model(x[idx]), y[idx]).backward()
                opt.step()
            train_s += time.time() - t_epoch
            res = evaluate(model, xt, yt, args.test_samples)
            # seconds: wall time so far, including the test evaluations (test_samples MC
            # passes for the variational methods, one for plain Adam); train_seconds: the
            # training steps alone, the figure to compare across methods
            history.append(dict(res, epoch=epoch + 1, seconds=time.time() - t0,
                                train_seconds=train_s))
            print(f"{method:10s} epoch {epoch + 1:3d}  acc {res['accuracy']:.4f}  "
                  f"nll {res['nll']:.4f}  ece {res['ece']:.4f}  "
                  f"({time.time() - t0:.0f}s)", flush=True)
        results[method] = {"final": history[-1], "history": history}
    reduced = bool(args.train_subset) or args.epochs < 10
    plain_nll = results.get("plain_adam", {}).get("final", {}).get("nll")
    for method, r in results.items():
        f = r["final"]
        r["meets_targets"] = (f["accuracy"] >= 0.98 and f["ece"] <= 0.015
                              and (plain_nll is None or method == "plain_adam"
                                   or f["nll"] < plain_nll))
    path = write_results(args.out, {
        "benchmark": "MNIST 784-400-400-10 MLP: accuracy / NLL / ECE of the MC predictive",
        "reduced_run": reduced, "epochs": args.epochs, "train_size": n,
        "batch_size": args.batch_size, "kl_weight": args.kl_weight,
        "test_samples": args.test_samples, "threads": torch.get_num_threads(),
        "targets": {"accuracy": ">= 0.98", "ece": "<= 0.015", "nll": "< plain_adam"},
        "results": results})
    print("wrote", path)


if __name__ == "__main__":
    main()
