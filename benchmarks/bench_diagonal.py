"""Step time of the diagonal natural-gradient optimizers against a plain Adam step.

    python benchmarks/bench_diagonal.py [--steps 60] [--repeats 1] [--device cpu|cuda] [--no-ivon-opt]

One process, interleaved steps (round-robin), median of ``--steps`` steps for each contender, on
the 784-400-400-10 MLP and the PyVarInf README CNN (with BatchNorm), batch 128 (each
contender cycles through the same 32 random batches, see ``common.batch_pool``):

* plain_adam: ``nn.Module`` + ``torch.optim.Adam`` on the cross-entropy;
* noisy_adam / vogn / ivon: ``variationalize(model)`` + ``pyvarinf2.optim.<X>``, the loop of the
  README (``zero_grad``, forward with one weight sample, ``backward``, ``step``);
* noisy_adam_true_fisher: NoisyAdam(fisher='true', extrinsic_damping=1e-3), the cost of the
  sampled-label pass;
* ivon_opt: the ``ivon-opt`` package's IVON (GPL; *not* a dependency) on a plain copy of the
  model, when it can be imported — install it outside the project, e.g.
  ``pip install --target /tmp/ivonpkg ivon-opt`` and pass ``--ivon-path /tmp/ivonpkg``.

Writes benchmarks/results/diagonal_step.json with the machine.
"""
import argparse
import copy
import itertools
import os
import statistics
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import pyvarinf2  # noqa: E402
from common import ReadmeCNN, batch_pool, interleaved, mlp, write_results  # noqa: E402

N_TRAIN = 60000


def _import_ivon(path):
    if path and os.path.isdir(path) and path not in sys.path:
        sys.path.append(path)
    try:
        import ivon  # noqa: F401  (the GPL package, only measured, never imported by pyvarinf2)
        return ivon
    except Exception:  # noqa: BLE001 - absent or broken: just skip the contender
        return None


def make_steps(name, device, ivon_pkg=None):
    torch.manual_seed(0)
    model = (mlp() if name == "mlp" else ReadmeCNN()).to(device)
    pool = batch_pool(name, device=device)

    def batches():        # each contender cycles through the same batches
        return itertools.cycle(pool)

    sync = ((lambda: torch.cuda.synchronize(device)) if torch.device(device).type == "cuda"
            else (lambda: None))
    loss_fn = F.cross_entropy if name == "mlp" else F.nll_loss

    plain = copy.deepcopy(model)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    plain_batches = batches()

    def plain_step():
        x, y = next(plain_batches)
        plain_opt.zero_grad(set_to_none=True)
        loss_fn(plain(x), y).backward()
        plain_opt.step()
        sync()

    steps = {"plain_adam": plain_step}
    for key, cls, kw in (("noisy_adam", "NoisyAdam", {}), ("vogn", "VOGN", {}),
                         ("ivon", "IVON", {}),
                         # on random labels the true Fisher stays far below the squared
                         # gradients and the undamped natural-gradient step diverges within
                         # ~10 steps for half the seeds; the damping only keeps it finite
                         ("noisy_adam_true_fisher", "NoisyAdam",
                          {"fisher": "true", "extrinsic_damping": 1e-3})):
        vm = pyvarinf2.variationalize(copy.deepcopy(model)).to(device)
        opt = getattr(pyvarinf2.optim, cls)(vm, dataset_size=N_TRAIN, **kw)

        def step(vm=vm, opt=opt, it=batches()):
            x, y = next(it)
            opt.zero_grad(set_to_none=True)
            loss_fn(vm(x), y).backward()
            opt.step()
            sync()

        steps[key] = step
    if ivon_pkg is not None:
        other = copy.deepcopy(model)
        iopt = ivon_pkg.IVON(other.parameters(), lr=0.1, ess=N_TRAIN)
        ivon_batches = batches()

        def ivon_opt_step():
            x, y = next(ivon_batches)
            for _ in range(1):
                with iopt.sampled_params(train=True):
                    iopt.zero_grad(set_to_none=True)
                    loss_fn(other(x), y).backward()
            iopt.step()
            sync()

        steps["ivon_opt"] = ivon_opt_step
    return steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ivon-path", default="/tmp/ivonpkg",
                    help="folder with the ivon-opt package (pip install --target ...)")
    ap.add_argument("--no-ivon-opt", action="store_true")
    ap.add_argument("--models", default="mlp,readme_cnn")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default); 1 avoids the pathological "
                         "slow-downs of OpenMP on a CPU shared with other processes")
    ap.add_argument("--repeats", type=int, default=1,
                    help="fresh contenders per network; the reported ratio of each contender "
                         "is the median over the repeats (with the range)")
    ap.add_argument("--out", default="diagonal_step.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ivon_pkg = None if args.no_ivon_opt else _import_ivon(args.ivon_path)
    results = {}
    for name in args.models.split(","):
        runs = [interleaved(make_steps(name, args.device, ivon_pkg), n_steps=args.steps)
                for _ in range(args.repeats)]
        keys = list(runs[0])
        ms = {k: statistics.median(r[k] for r in runs) for k in keys}
        ratios = {k: sorted(r[k] / r["plain_adam"] for r in runs)
                  for k in keys if k != "plain_adam"}
        results[name] = {k + "_ms": 1e3 * v for k, v in ms.items()}
        results[name].update({k + "_ratio": statistics.median(v) for k, v in ratios.items()})
        if args.repeats > 1:
            results[name].update({k + "_ratio_range": [v[0], v[-1]] for k, v in ratios.items()})
            results[name]["repeats"] = args.repeats
        print(f"{name:11s} plain Adam {1e3 * ms['plain_adam']:7.2f} ms   " + "   ".join(
            f"{k} {statistics.median(v):.2f}x" + (f" ({v[0]:.2f}-{v[-1]:.2f})"
                                                   if args.repeats > 1 else "")
            for k, v in ratios.items()))
    path = write_results(args.out, {
        "benchmark": "diagonal natural-gradient training step / plain Adam step "
                     "(median, interleaved, one process)",
        "batch_size": 128, "steps": args.steps, "device": args.device,
        "threads": torch.get_num_threads(),
        "ivon_opt": getattr(ivon_pkg, "__version__", "present") if ivon_pkg else "not installed",
        "targets_cpu": {"noisy_adam": 2.2, "ivon": 2.0, "vogn": 2.5, "ivon_opt_mlp": 4.7},
        "results": results})
    print("wrote", path)


if __name__ == "__main__":
    main()
