"""The installed CMake package works for an out-of-tree C/C++ project: configure tests/consumer
against fp4.cmake_dir(), build it (a C++ program and the C API test in C), and run both via ctest."""

import os
import shutil
import subprocess

import pytest

import fp4

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_consumer_project_builds_and_runs(tmp_path):
    build = tmp_path / "build"
    env = dict(os.environ)
    configure = ["cmake", "-S", os.path.join(HERE, "consumer"), "-B", str(build), f"-Dfp4_DIR={fp4.cmake_dir()}",
                 "-DCMAKE_BUILD_TYPE=Release"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    for cmd in (configure, ["cmake", "--build", str(build)], ["ctest", "--output-on-failure", "--test-dir", str(build)]):
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    assert "found fp4 " + fp4.__version__ in subprocess.run(configure, capture_output=True, text=True).stdout


def test_cmake_dir_holds_the_package():
    assert os.path.isfile(os.path.join(fp4.cmake_dir(), "fp4Config.cmake"))
    assert os.path.isfile(os.path.join(fp4.include_dir(), "fp4", "fp4.h"))
