"""The CMake configure step: torch-style TORCH_CUDA_ARCH_LIST parsing, the sm_80 minimum, CCCL."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or NVCC is None, reason="needs cmake and nvcc")


def _configure(tmp_path, arch_list):
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=arch_list, CUDACXX=NVCC)
    return subprocess.run(["cmake", "-S", ROOT, "-B", str(tmp_path / "build"), "-DFP4_CUDA=ON", "-DFP4_PYTHON=OFF",
                           "-DBUILD_TESTING=OFF"], capture_output=True, text=True, env=env)


def test_torch_arch_list_syntax(tmp_path):
    result = _configure(tmp_path, "8.0;8.6 9.0a 9.0+PTX")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CUDA architectures 80-real 86-real 90a-real 90-real 90-virtual (from TORCH_CUDA_ARCH_LIST" in result.stdout
    assert "CCCL/CUB include dir" in result.stdout


def test_arch_below_8_0_is_a_configure_error(tmp_path):
    result = _configure(tmp_path, "7.5;8.0")
    assert result.returncode != 0
    assert "compute capability 7.5 is below 8.0" in result.stdout + result.stderr
