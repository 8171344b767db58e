import os
import pathlib
import subprocess

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent


def _origin_checkout():
    """The local repository this checkout was cloned from, if any (``git clone . /tmp/x``)."""
    try:
        url = subprocess.run(["git", "-C", str(HERE), "config", "--get", "remote.origin.url"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    path = pathlib.Path(url) if url and "://" not in url and ":" not in url[:3] else None
    return path if path is not None and path.is_dir() else None


def data_root():
    """Real data: $PYVARINF2_DATA, else ../shared/data beside the checkout, else beside the
    local repository it was cloned from (a fresh clone in /tmp finds the same data)."""
    env = os.environ.get("PYVARINF2_DATA")
    if env:
        return pathlib.Path(env)
    beside = HERE.parent.parent / "shared" / "data"
    if (beside / "mnist").is_dir():
        return beside
    origin = _origin_checkout()
    if origin is not None and (origin.resolve().parent / "shared" / "data" / "mnist").is_dir():
        return origin.resolve().parent / "shared" / "data"
    return beside


@pytest.fixture
def data_dir():
    root = data_root()
    if not (root / "mnist").is_dir():
        pytest.fail(f"real data not found at {root}; set PYVARINF2_DATA to the shared data folder")
    return root


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    # One intra-op thread: the tests' tensors are small, OpenMP hand-offs cost more than they
    # save, and results do not depend on the machine's core count.
    torch.set_num_threads(1)
    config.addinivalue_line("markers", "slow: long runs kept out of CI (run with -m slow)")


@pytest.fixture
def one_thread():
    """Training loops on the shared CI machine: one intra-op thread avoids OpenMP spin-waiting
    against other processes (measured 5 ms vs 30-180 ms per README step on 2 busy cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _Branch(torch.nn.Module):
    """Two alternative first layers and a head: a forward uses one branch (``use_b``), so the
    other branch's parameters get no gradient (or a zero one with set_to_none=False)."""

    def __init__(self, d_in=5, hidden=8, d_out=3):
        super().__init__()
        self.a = torch.nn.Linear(d_in, hidden)
        self.b = torch.nn.Linear(d_in, hidden)
        self.head = torch.nn.Linear(hidden, d_out)

    def forward(self, x, use_b=False):
        return self.head(torch.tanh(self.b(x) if use_b else self.a(x)))


@pytest.fixture
def branch_model():
    """The class of a model with an unused branch per forward (see ``_Branch``)."""
    return _Branch
