"""`python -m fp4 info`: the build and what this machine runs."""

import subprocess
import sys

from fp4 import _C
from fp4.cli.info import describe


def test_info_reports_the_build_and_the_hopper_gemm_per_device():
    info = describe()
    assert info["libfp4"] == _C.version()
    devices = _C.cuda_device_count()
    expected = ", ".join(f"cuda:{i} {'yes' if _C.gemm_4bit_uses_wgmma(i) else 'no'}" for i in range(devices))
    assert info["wgmma_gemm"] == (expected or "-")
    printed = subprocess.run([sys.executable, "-m", "fp4", "info"], capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    assert "wgmma_gemm: " + info["wgmma_gemm"] in printed.stdout
