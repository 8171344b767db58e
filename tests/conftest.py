import os
import pathlib

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent


def data_root():
    """Real data: $PYVARINF2_DATA, else ../shared/data beside the checkout."""
    env = os.environ.get("PYVARINF2_DATA")
    if env:
        return pathlib.Path(env)
    return HERE.parent.parent / "shared" / "data"


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
