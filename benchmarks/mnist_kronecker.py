"""MNIST with the Kronecker-factored optimizers (noisy K-FAC / EK-FAC) against NoisyAdam and
Bayes-by-backprop.

    python benchmarks/mnist_kronecker.py readme-cnn [--train-size 10000 --epochs 3]
    python benchmarks/mnist_kronecker.py mlp [--epochs 20 --methods kfac,ekfac,noisy_adam,bbb]

* ``readme-cnn``: the PyVarInf README CNN *without* BatchNorm, NoisyKFAC and NoisyEKFAC with
  their defaults (only ``lr=1e-2`` and ``dataset_size`` given), 3 epochs over the first 10k
  training images, batch 100; the target is >= 90% test accuracy.
* ``mlp``: the 784-400-400-10 ReLU MLP on the full 60k, batch 128; per epoch the test accuracy
  of the posterior mean and of the MC predictive (``--mc`` samples) and the ECE of the MC
  predictive; epochs-to-97% (posterior-mean accuracy). Targets: NoisyKFAC and NoisyEKFAC >= 98.0%
  with ECE <= 1.5%.

Methods: ``kfac`` / ``ekfac``: lr 1e-2 and the defaults; ``noisy_adam``: pyvarinf2's NoisyAdam,
lr 1e-3 (the seed's setting); ``bbb``: Bayes-by-backprop, torch Adam lr 1e-3 on the means and
scales with loss ``NLL + prior_loss()/N``. All use λ = 1 and the same prior (``--prior``):
``pyvarinf`` = the library default N(0, 1/fan_in) for weights and N(0, 1) for biases (the
README CNN task), ``he`` = N(0, 2/fan_in) for weights, N(0, 1) for biases (the MLP task's
default: the fan-in prior is so tight on a 784-400-400-10 MLP with 60k examples that the
posterior stays near it, ~94% after 3 epochs), ``unit`` = N(0, 1) everywhere (η = 1, the
papers' regression setting; on the MLP it makes the first noisy-K-FAC samples explode).
Results go to ``benchmarks/results/mnist_kronecker_<task>.json`` with the machine; a run with
fewer epochs or a training subset says so in its ``setup``.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pyvarinf2  # noqa: E402
from common import write_results  # noqa: E402
from pyvarinf2.data import load_image_dataset  # noqa: E402
from pyvarinf2.metrics import expected_calibration_error  # noqa: E402


class ReadmeCNN(nn.Module):
    """The PyVarInf README network, without BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = F.relu(self.fc1(x.view(-1, 320)))
        return F.log_softmax(self.fc2(x), dim=1)


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400),
                         nn.ReLU(), nn.Linear(400, 10))


def make_optimizer(method, var_model, n):
    if method == "kfac":
        return pyvarinf2.optim.NoisyKFAC(var_model, lr=1e-2, dataset_size=n)
    if method == "ekfac":
        return pyvarinf2.optim.NoisyEKFAC(var_model, lr=1e-2, dataset_size=n)
    if method == "noisy_adam":
        return pyvarinf2.optim.NoisyAdam(var_model, lr=1e-3, dataset_size=n)
    if method == "bbb":
        return torch.optim.Adam(var_model.parameters(), lr=1e-3)
    raise ValueError(f"unknown method {method!r}")


@torch.no_grad()
def evaluate(var_model, x, y, mc, batch=1000):
    var_model.eval()
    mean_correct = 0
    probs = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        mean_correct += int((var_model(xb).argmax(1) == y[i:i + batch]).sum())
        p = 0
        with var_model.sampling():
            for _ in range(mc):
                p = p + torch.softmax(var_model(xb), dim=1)
        probs.append(p / mc)
    probs = torch.cat(probs)
    var_model.train()
    return {"acc_mean": mean_correct / len(x),
            "acc_mc": float((probs.argmax(1) == y).float().mean()),
            "ece_mc": expected_calibration_error(probs.numpy(), y.numpy())}


def make_model(net_fn, prior):
    if prior == "unit":
        return pyvarinf2.variationalize(net_fn(), prior=pyvarinf2.GaussianPrior(std=1.0))
    var_model = pyvarinf2.variationalize(net_fn())
    if prior == "he":
        for name, p in var_model.model.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                var_model.set_prior(pyvarinf2.GaussianPrior(std=(2.0 / fan_in) ** 0.5),
                                    parameters=name)
    return var_model


def train(method, net_fn, data, epochs, batch_size, mc, seed, log, prior="pyvarinf"):
    torch.manual_seed(seed)
    x, y = data["x_train"], data["y_train"]
    n = len(x)
    var_model = make_model(net_fn, prior)
    opt = make_optimizer(method, var_model, n)
    history = []
    t_train = 0.0
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        perm = torch.randperm(n)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(var_model(x[idx]), y[idx])
            if method == "bbb":
                loss = loss + var_model.prior_loss() / n
            loss.backward()
            opt.step()
        t_train += time.perf_counter() - t0
        ev = evaluate(var_model, data["x_test"], data["y_test"], mc)
        ev.update(epoch=epoch, train_seconds=round(t_train, 1))
        history.append(ev)
        log(f"{method:10s} epoch {epoch:3d}  acc(mean) {ev['acc_mean']:.4f}  "
            f"acc(MC) {ev['acc_mc']:.4f}  ECE {ev['ece_mc']:.4f}  {t_train:.0f}s")
    to97 = next((h["epoch"] for h in history if h["acc_mean"] >= 0.97), None)
    return {"history": history, "final": history[-1], "epochs_to_97": to97}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=["readme-cnn", "mlp"])
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--train-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--methods", default=None)
    ap.add_argument("--mc", type=int, default=10)
    ap.add_argument("--prior", choices=["pyvarinf", "he", "unit"], default=None,
                    help="default: pyvarinf for readme-cnn, he for mlp")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--data-dir", default=os.environ.get("PYVARINF2_DATA") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared",
        "data"), help="folder holding mnist/ (default: $PYVARINF2_DATA, else ../shared/data)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_image_dataset("mnist", data_dir=args.data_dir)
    if args.task == "readme-cnn":
        epochs, size, bs = args.epochs or 3, args.train_size or 10000, args.batch_size or 100
        methods = (args.methods or "kfac,ekfac").split(",")
        net_fn = ReadmeCNN
        prior = args.prior or "pyvarinf"
    else:
        epochs, size, bs = args.epochs or 20, args.train_size or 60000, args.batch_size or 128
        methods = (args.methods or "kfac,ekfac,noisy_adam,bbb").split(",")
        net_fn = mlp
        prior = args.prior or "he"
    data = {"x_train": ds.x_train[:size], "y_train": ds.y_train[:size],
            "x_test": ds.x_test, "y_test": ds.y_test}
    results = {}
    for method in methods:
        results[method] = train(method, net_fn, data, epochs, bs, args.mc, args.seed, print,
                                prior=prior)
    setup = {"task": args.task, "epochs": epochs, "train_size": size, "batch_size": bs,
             "mc_samples": args.mc, "seed": args.seed, "threads": torch.get_num_threads(),
             "prior": prior, "kl_weight": 1.0,
             "reduced": (args.task == "mlp" and (size < 60000 or epochs < 20))}
    path = write_results(args.out or f"mnist_kronecker_{args.task.replace('-', '_')}.json",
                         {"setup": setup, "results": results})
    print("wrote", path)


if __name__ == "__main__":
    main()
