"""Bayes-by-backprop training step vs a plain Adam step on the same network.

    python benchmarks/bench_bbb.py [--steps 60] [--device cpu|cuda]

One process, interleaved steps, median of ``--steps`` steps for each contender, each cycling
through the same 32 random batches of 128 (``common.batch_pool``):
* plain: ``nn.Module`` + ``torch.optim.Adam`` on the NLL (cross-entropy of the MLP's logits, NLL
  of the CNN's log-probabilities);
* bbb: ``variationalize(model)`` + Adam over (mean, log_std) on NLL + prior_loss()/N;
* bbb_local_reparameterization: the same with ``local_reparameterization=True`` (the Linear
  layers draw per-example pre-activations instead of a shared weight sample).
Writes benchmarks/results/bbb_step.json with the machine.
"""
import argparse
import copy
import statistics
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pyvarinf2  # noqa: E402
from common import ReadmeCNN, batch_pool, interleaved, mlp, write_results  # noqa: E402


def make_steps(name, device):
    model = (mlp() if name == "mlp" else ReadmeCNN()).to(device)
    pool = batch_pool(name, device=device)
    # the README CNN returns log-probabilities, the MLP logits
    loss_fn = F.cross_entropy if name == "mlp" else F.nll_loss

    def batches():        # each contender cycles through the same batches
        while True:
            yield from pool

    plain = copy.deepcopy(model)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    var_model = pyvarinf2.variationalize(copy.deepcopy(model)).to(device)
    bbb_opt = torch.optim.Adam(var_model.parameters(), lr=1e-3)
    n = 60000
    sync = ((lambda: torch.cuda.synchronize(device)) if torch.device(device).type == "cuda"
            else (lambda: None))

    def plain_step(it=batches()):
        x, y = next(it)
        plain_opt.zero_grad(set_to_none=True)
        loss_fn(plain(x), y).backward()
        plain_opt.step()
        sync()

    def bbb_step(var_model=var_model, bbb_opt=bbb_opt, it=batches()):
        x, y = next(it)
        bbb_opt.zero_grad(set_to_none=True)
        loss = loss_fn(var_model(x), y) + var_model.prior_loss() / n
        loss.backward()
        bbb_opt.step()
        sync()

    lrt_model = pyvarinf2.variationalize(copy.deepcopy(model),
                                         local_reparameterization=True).to(device)
    lrt_opt = torch.optim.Adam(lrt_model.parameters(), lr=1e-3)

    def bbb_lrt_step(it=batches()):
        bbb_step(lrt_model, lrt_opt, it)

    return {"plain_adam": plain_step, "bbb": bbb_step,
            "bbb_local_reparameterization": bbb_lrt_step}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5,
                    help="fresh model pairs per network; the ratio varies by ~±15%% between "
                         "them on a 2-core CPU, so the median and the range are reported")
    ap.add_argument("--out", default="bbb_step.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    results = {}
    for name in ("mlp", "readme_cnn"):
        runs = []
        for _ in range(args.repeats):
            med = interleaved(make_steps(name, args.device), n_steps=args.steps)
            runs.append({"plain_adam_ms": 1e3 * med["plain_adam"], "bbb_ms": 1e3 * med["bbb"],
                         "ratio": med["bbb"] / med["plain_adam"],
                         "bbb_lrt_ms": 1e3 * med["bbb_local_reparameterization"],
                         "lrt_ratio": med["bbb_local_reparameterization"] / med["plain_adam"]})
        ratios = sorted(r["ratio"] for r in runs)
        results[name] = {"ratio_median": statistics.median(ratios),
                         "ratio_min": ratios[0], "ratio_max": ratios[-1],
                         "plain_adam_ms_median": statistics.median(r["plain_adam_ms"] for r in runs),
                         "bbb_ms_median": statistics.median(r["bbb_ms"] for r in runs),
                         "local_reparameterization_ratio_median":
                             statistics.median(r["lrt_ratio"] for r in runs),
                         "local_reparameterization_ratio_range":
                             [min(r["lrt_ratio"] for r in runs), max(r["lrt_ratio"] for r in runs)],
                         "repeats": runs}
        print(f"{name:11s} plain Adam {results[name]['plain_adam_ms_median']:7.2f} ms   "
              f"BBB {results[name]['bbb_ms_median']:7.2f} ms   ratio median "
              f"{results[name]['ratio_median']:.2f}x (range {ratios[0]:.2f}-{ratios[-1]:.2f}, "
              f"{args.repeats} repeats); with local reparameterisation "
              f"{results[name]['local_reparameterization_ratio_median']:.2f}x")
    path = write_results(args.out, {"benchmark": "bbb training step / plain Adam step",
                                    "batch_size": 128, "steps": args.steps,
                                    "device": args.device, "results": results,
                                    "targets": {"cpu": 2.0, "gpu": 1.3},
                                    "peers_same_mlp_per_issue": {"pyvarinf_0.2": 4.1,
                                                                 "bayesian_torch": 4.3,
                                                                 "bayesian_torch_flipout": 5.2}})
    print("wrote", path)


if __name__ == "__main__":
    main()
