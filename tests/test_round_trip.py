"""dequantize(quantize(x)) stays within the format's bound, and within bitsandbytes' own error."""

import numpy as np
import pytest
import torch

import fp4.functional as F
from conftest import bnb_functional
from fp4 import _C


def _half_widest_gap(quant_type):
    code = F.get_4bit_type(quant_type).sort().values
    return (code[1:] - code[:-1]).max().item() / 2


@pytest.mark.parametrize("quant_type", ["fp4", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_error_within_format_bound(device, quant_type, dtype):
    A = torch.randn(257, 1000, device=device, dtype=dtype)
    packed, state = F.quantize_4bit(A, blocksize=64, quant_type=quant_type)
    out = F.dequantize_4bit(packed, state)
    scale = state.absmax.repeat_interleave(64)[: A.numel()].reshape(A.shape)
    # Nearest code: at most half the widest gap times the block's absmax (plus output rounding).
    rounding = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    err = (out.double() - A.double()).abs()
    assert (err <= scale.double() * (_half_widest_gap(quant_type) + rounding)).all()


@pytest.mark.parametrize("quant_type", ["fp4", "nf4"])
@pytest.mark.parametrize("nested", [False, True])
def test_error_matches_bitsandbytes(device, quant_type, nested):
    B = bnb_functional()
    A = torch.randn(512, 768, device=device)
    ours = F.dequantize_4bit(*F.quantize_4bit(A, compress_statistics=nested, quant_type=quant_type))
    theirs = B.dequantize_4bit(*B.quantize_4bit(A, compress_statistics=nested, quant_type=quant_type))
    err_ours = (ours - A).abs().mean().item()
    err_theirs = (theirs - A).abs().mean().item()
    assert err_ours == pytest.approx(err_theirs, rel=1e-6)
    # bitsandbytes' own test bound for 4-bit round trips on normal data
    assert err_ours < (0.11 if quant_type == "fp4" else 0.09)


def test_nested_scales_close_to_plain(device):
    A = torch.randn(1000, 1000, device=device)
    _, plain = F.quantize_4bit(A, compress_statistics=False)
    _, nested = F.quantize_4bit(A, compress_statistics=True)
    expanded = F.expand_absmax(nested)
    assert expanded.shape == plain.absmax.shape
    spread = (plain.absmax - plain.absmax.mean()).abs().max()
    assert ((expanded - plain.absmax).abs() <= 0.01 * spread).all()


def test_numpy_arrays_through_dlpack():
    """The binding takes NumPy arrays directly (DLPack), with the same bytes as torch gets."""
    x = np.random.randn(3000).astype(np.float32)
    packed = np.full(1500, 0xAA, np.uint8)
    absmax = np.full(47, np.nan, np.float32)
    _C.quantize_4bit(x, packed, absmax, "nf4", 64)
    t_packed, t_state = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4")
    assert np.array_equal(packed, t_packed.numpy().reshape(-1))
    assert np.array_equal(absmax, t_state.absmax.numpy())
    out = np.full(3000, np.nan, np.float32)
    _C.dequantize_4bit(packed, absmax, out, "nf4", 64)
    assert np.array_equal(out, F.dequantize_4bit(t_packed, t_state).numpy())


def test_numpy_float16_through_dlpack():
    x = np.random.randn(640).astype(np.float16)
    packed, absmax = np.empty(320, np.uint8), np.empty(10, np.float32)
    _C.quantize_4bit(x, packed, absmax, "fp4", 64)
    out = np.empty(640, np.float16)
    _C.dequantize_4bit(packed, absmax, out, "fp4", 64)
    assert np.isfinite(out).all() and np.abs(out.astype(np.float32) - x).max() <= absmax.max() / 6 + 1e-3


def test_outputs_are_fully_written(device):
    """Poisoned outputs: every element must be overwritten."""
    A = torch.randn(4099, device=device)
    packed, state = F.quantize_4bit(A, blocksize=128)
    out = torch.full_like(A, float("nan"))
    F.dequantize_4bit(packed, state, out=out)
    assert torch.isfinite(out).all()


def test_non_contiguous_input_and_output(device):
    A = torch.randn(64, 256, device=device).t()
    packed, state = F.quantize_4bit(A)
    ref_packed, _ = F.quantize_4bit(A.contiguous())
    assert torch.equal(packed, ref_packed)
    out = torch.empty(64, 256, device=device).t()
    F.dequantize_4bit(packed, state, out=out)
    assert torch.equal(out, F.dequantize_4bit(packed, state))
