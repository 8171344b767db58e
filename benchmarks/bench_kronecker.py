"""Amortised step time of NoisyKFAC / NoisyEKFAC against NoisyAdam (and a plain Adam step).

    python benchmarks/bench_kronecker.py [--blocks 7] [--threads N] [--device cpu|cuda]

One process; for each network (the 784-400-400-10 MLP and the PyVarInf README CNN without
BatchNorm, batch 128, the same fixed batch every step) each contender runs *blocks* of
``T_inv = 100`` steps (``T_cov = 10``), so a block holds exactly one eigendecomposition and ten
factor updates: its mean step time is the amortised one. Blocks of the contenders are
interleaved (round robin) after one warm-up block each, and the median block is reported, so
machine noise falls evenly on all of them. Every step is the user's loop:
``zero_grad(); loss(var_model(x), y).backward(); step()`` (cross-entropy on the MLP's logits,
NLL on the CNN's log-probabilities). The ``_bf16`` contenders
are the same optimizers with ``matmul_dtype=torch.bfloat16`` (dense products of the mean step
and of the Kronecker samples in bfloat16); ``noisy_kfac_weight_noise`` is NoisyKFAC with
``var_model.activation_noise = False`` (every layer's noise formed as a weight matrix, as before
the route through the activations).

Writes benchmarks/results/kronecker_step.json with the machine.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pyvarinf2  # noqa: E402
from common import ReadmeCNN, batch_for, interleaved, mlp, write_results  # noqa: E402

BLOCK = 100  # = T_inv


def make_blocks(name, device):
    x, y = (t.to(device) for t in batch_for(name))
    # the README CNN returns log-probabilities, the MLP logits
    loss_fn = F.cross_entropy if name == "mlp" else F.nll_loss
    n = 60000
    sync = ((lambda: torch.cuda.synchronize(device)) if torch.device(device).type == "cuda"
            else (lambda: None))

    def net():
        torch.manual_seed(0)
        return (mlp() if name == "mlp" else ReadmeCNN(batchnorm=False)).to(device)

    def block_of(model, opt, var=True):
        def run():
            for _ in range(BLOCK):
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                opt.step()
            sync()
        return run

    plain = net()
    out = {"adam": block_of(plain, torch.optim.Adam(plain.parameters(), lr=1e-3))}
    vm = pyvarinf2.variationalize(net())
    out["noisy_adam"] = block_of(vm, pyvarinf2.optim.NoisyAdam(vm, lr=1e-3, dataset_size=n))
    for key, cls in (("noisy_kfac", pyvarinf2.optim.NoisyKFAC),
                     ("noisy_ekfac", pyvarinf2.optim.NoisyEKFAC)):
        for suffix, extra in (("", {}), ("_bf16", {"matmul_dtype": torch.bfloat16})):
            vm = pyvarinf2.variationalize(net())
            out[key + suffix] = block_of(vm, cls(vm, lr=1e-2, dataset_size=n, T_cov=10,
                                                 T_inv=100, **extra))
    # the noise through the weights everywhere (var_model.activation_noise = False): what the
    # route through the activations saves
    vm = pyvarinf2.variationalize(net())
    opt = pyvarinf2.optim.NoisyKFAC(vm, lr=1e-2, dataset_size=n, T_cov=10, T_inv=100)
    vm.activation_noise = False
    out["noisy_kfac_weight_noise"] = block_of(vm, opt)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="kronecker_step.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for name in ("mlp", "readme_cnn"):
        med = interleaved(make_blocks(name, args.device), n_steps=args.blocks, warmup=1)
        per_step = {k: v / BLOCK * 1e3 for k, v in med.items()}
        ratios = {f"{k}/noisy_adam": per_step[k] / per_step["noisy_adam"]
                  for k in ("noisy_kfac", "noisy_ekfac", "noisy_kfac_bf16",
                            "noisy_ekfac_bf16", "noisy_kfac_weight_noise", "adam")}
        # and against plain PyTorch training of the same network, the project's yardstick
        ratios.update({f"{k}/adam": per_step[k] / per_step["adam"]
                       for k in ("noisy_adam", "noisy_kfac", "noisy_ekfac", "noisy_kfac_bf16",
                                 "noisy_ekfac_bf16")})
        results[name] = {"ms_per_step": {k: round(v, 3) for k, v in per_step.items()},
                         "ratios": {k: round(v, 3) for k, v in ratios.items()}}
        print(name, results[name])
    path = write_results(args.out, {
        "what": "amortised step time (median of interleaved 100-step blocks, T_cov=10, "
                "T_inv=100, batch 128) / NoisyAdam step time (the issue's yardstick) and / "
                "plain Adam step time",
        "target": "noisy_kfac/noisy_adam <= 2.0 on both networks",
        "blocks": args.blocks, "device": args.device, "results": results})
    print("wrote", path)


if __name__ == "__main__":
    main()
