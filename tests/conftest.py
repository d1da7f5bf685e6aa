import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*kernels-community.*")

HAS_CUDA = torch.cuda.is_available()

# CPU always; CUDA when present (those cases carry the `gpu` mark and are skipped elsewhere).
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")])]


def pytest_configure(config):
    # Fresh random data every run (printed, so a failure can be replayed with FP4_TEST_SEED).
    seed = int(os.environ.get("FP4_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    config._fp4_seed = seed


def pytest_report_header(config):
    return f"fp4 test seed: {config._fp4_seed} (replay with FP4_TEST_SEED={config._fp4_seed}); CUDA: {HAS_CUDA}"


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(request.config._fp4_seed + hash(request.node.nodeid) % 100000)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def bnb_functional():
    """bitsandbytes.functional, or skip the test when bitsandbytes is not installed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("bitsandbytes.functional")
