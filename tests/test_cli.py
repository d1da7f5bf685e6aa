"""`python -m fp4`: info (the build and what this machine runs), and the commands' argument checks."""

import subprocess
import sys

import pytest

from fp4 import _C
from fp4.__main__ import main
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


@pytest.mark.parametrize("arguments, message", [
    (["--shapes", "12x"], "--shapes: expected comma-separated OUTxIN shapes of positive sizes (e.g. 4096x14336), got '12x'"),
    (["--shapes", "0x64"], "got '0x64'"),
    (["--shapes", "64x64,"], "--shapes: expected comma-separated OUTxIN shapes, got '64x64,'"),
    (["--batches", "0"], "--batches: expected comma-separated positive integers, got '0'"),
    (["--batches", "1,-4"], "got '1,-4'"),
    (["--dtypes", "float16,float64"], "--dtypes: expected activation dtypes from float16, bfloat16, float32, got float64"),
    (["--formats", "nf5"], "--formats: expected formats from fp4, nf4, got nf5"),
    (["--repeats", "0"], "--repeats: expected a positive integer, got '0'"),
    (["--sustain", "0"], "--sustain: expected a positive number of seconds, got '0'"),
    (["--sustain", "-2"], "--sustain: expected a positive number of seconds, got '-2'"),
    (["--sustain", "4s"], "--sustain: expected a positive number of seconds, got '4s'"),
    (["--sustain", "nan"], "--sustain: expected a positive number of seconds, got 'nan'"),
    (["--device", "tpu"], "--device: expected cpu or cuda[:N], got 'tpu'"),
    (["--device", "cuda:99"], "'cuda:99': this machine has"),
    (["--json", "/no/such/folder/out.json"], "--json: '/no/such/folder/out.json': no folder '/no/such/folder'"),
    (["--plot-only", "/no/such.json"], "--plot-only: '/no/such.json': no such file"),
])
def test_bench_arguments_are_checked_before_any_work(arguments, message, capsys):
    """Each bad value stops the command at once, naming its option and what it expected (a missing
    output folder before the run, not after it)."""
    with pytest.raises(SystemExit) as stopped:
        main(["bench", *arguments])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_arguments_parse_into_what_the_run_uses(monkeypatch):
    taken = {}
    monkeypatch.setattr("fp4.cli.bench.run", lambda args: taken.update(vars(args)) or 0)
    assert main(["bench", "--shapes", "64x128, 32X256", "--batches", "1,16", "--dtypes", "bfloat16",
                 "--device", "cpu"]) == 0
    assert taken["shapes"] == [(64, 128), (32, 256)] and taken["batches"] == [1, 16]
    assert taken["dtypes"] == ["bfloat16"] and taken["formats"] == ["fp4", "nf4"] and str(taken["device"]) == "cpu"
    assert taken["sustain"] is None  # (methods timed in turns unless asked)
    assert main(["bench", "--sustain", "2.5", "--device", "cpu"]) == 0
    assert taken["sustain"] == 2.5
