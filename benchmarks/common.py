"""Shared pieces of the benchmarks: the two reference networks, interleaved timing, results."""
import json
import os
import platform
import random
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_START = time.perf_counter()      # the wall time written with the results counts from here


def mlp(width=400, depth=2, n_in=784, n_out=10):
    layers, d = [], n_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, n_out))
    return nn.Sequential(*layers)


class ReadmeCNN(nn.Module):
    """The PyVarInf README network (MNIST, 1x28x28)."""

    def __init__(self, batchnorm=True):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)
        self.bn1 = nn.BatchNorm2d(10) if batchnorm else nn.Identity()
        self.bn2 = nn.BatchNorm2d(20) if batchnorm else nn.Identity()

    def forward(self, x):
        x = self.bn1(F.relu(F.max_pool2d(self.conv1(x), 2)))
        x = self.bn2(F.relu(F.max_pool2d(self.conv2(x), 2)))
        x = x.view(-1, 320)
        x = F.relu(self.fc1(x))
        return F.log_softmax(self.fc2(x), dim=1)


def batch_for(name, batch_size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name == "mlp":
        x = torch.randn(batch_size, 784, generator=g)
    else:
        x = torch.randn(batch_size, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (batch_size,), generator=g)
    return x, y


def batch_pool(name, n_batches=32, batch_size=128, device="cpu"):
    """``n_batches`` random batches (inputs and labels) to cycle through: a benchmark that
    trains on one fixed batch memorises its random labels within tens of steps, and a
    true-Fisher optimizer (whose curvature then vanishes) can diverge on it."""
    return [tuple(t.to(device) for t in batch_for(name, batch_size, seed=i))
            for i in range(n_batches)]


def interleaved(step_fns, n_steps=60, warmup=10, seed=0):
    """Time each callable ``n_steps`` times, round-robin, after ``warmup`` rounds.

    Returns {name: median seconds}. Interleaving spreads machine noise evenly over the
    contenders, so their ratios are fair even on a busy machine. Each round runs the contenders
    in a fresh random order (``seed``): in a fixed order the contender that follows the plain
    step paid 0.03-0.05x of a plain step more than in other positions (caches and the
    allocator's state left by its predecessor), which is as large as some of the differences
    measured."""
    order = list(step_fns)
    rng = random.Random(seed)
    for _ in range(warmup):
        for fn in step_fns.values():
            fn()
    times = {k: [] for k in step_fns}
    for _ in range(n_steps):
        rng.shuffle(order)
        for k in order:
            fn = step_fns[k]
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_results(name, payload):
    """Write ``payload`` to benchmarks/results/``name`` with the machine, the date, the exact
    command line and the wall time of the run so far."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, name)
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO_DIR)
    payload = dict(payload, machine=machine(),
                   command=" ".join(["python", script] + sys.argv[1:]),
                   wall_s=round(time.perf_counter() - _START, 1),
                   date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2)
    return path
