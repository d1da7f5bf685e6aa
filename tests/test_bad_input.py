"""Every argument check raises TypeError/ValueError naming the argument; nothing crashes."""

import numpy as np
import pytest
import torch

import fp4.functional as F
from fp4 import _C


def test_quantize_rejects_non_tensor():
    with pytest.raises(TypeError, match="A: expected a torch.Tensor"):
        F.quantize_4bit([1.0, 2.0])


def test_quantize_rejects_integer_dtype():
    with pytest.raises(TypeError, match="A: expected float32, float16 or bfloat16"):
        F.quantize_4bit(torch.ones(64, dtype=torch.int32))


def test_quantize_rejects_float64():
    with pytest.raises(TypeError, match="A: expected float32"):
        F.quantize_4bit(torch.ones(64, dtype=torch.float64))


@pytest.mark.parametrize("blocksize", [0, 16, 48, 8192, -64, 64.0, True])
def test_quantize_rejects_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize: expected one of"):
        F.quantize_4bit(torch.ones(64), blocksize=blocksize)


def test_quantize_rejects_bad_quant_type():
    with pytest.raises(ValueError, match="quant_type: expected 'fp4' or 'nf4'"):
        F.quantize_4bit(torch.ones(64), quant_type="int4")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantize_rejects_non_finite(device, bad):
    A = torch.randn(300, device=device)
    A[77] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        F.quantize_4bit(A)


def test_quantize_rejects_bad_quant_storage():
    with pytest.raises(TypeError, match="quant_storage: expected a torch.dtype"):
        F.quantize_4bit(torch.ones(64), quant_storage="uint8")


def test_nested_rejects_empty():
    with pytest.raises(ValueError, match="A: is empty"):
        F.quantize_4bit(torch.ones(0), compress_statistics=True)


def test_empty_tensor_round_trips():
    packed, state = F.quantize_4bit(torch.ones(0, 5))
    assert packed.numel() == 0 and state.absmax.numel() == 0
    assert F.dequantize_4bit(packed, state).shape == (0, 5)


def test_dequantize_needs_state_or_absmax_and_out():
    with pytest.raises(ValueError, match="quant_state: give a QuantState"):
        F.dequantize_4bit(torch.zeros(32, 1, dtype=torch.uint8))


def test_dequantize_rejects_wrong_out_shape():
    packed, state = F.quantize_4bit(torch.randn(64, 64))
    with pytest.raises(ValueError, match="out: expected shape"):
        F.dequantize_4bit(packed, state, out=torch.empty(64, 65))


def test_dequantize_rejects_truncated_codes():
    packed, state = F.quantize_4bit(torch.randn(64, 64))
    with pytest.raises(ValueError, match=r"A: expected 2048 bytes of codes .* got 2047 bytes \(2047 torch.uint8"):
        F.dequantize_4bit(packed[:-1], state)


def test_dequantize_counts_codes_in_bytes_whatever_their_storage():
    """Codes stored as another dtype (bitsandbytes' quant_storage) count by their bytes: a view
    holds them, a converted copy (4 bytes per code byte) is rejected, naming both counts."""
    weight = torch.randn(64, 64)
    packed, state = F.quantize_4bit(weight)
    assert torch.equal(F.dequantize_4bit(packed.reshape(-1).view(torch.float32), state), F.dequantize_4bit(packed, state))
    with pytest.raises(ValueError, match=r"A: expected 2048 bytes .* got 8192 bytes \(2048 torch.float32 elements\)"):
        F.dequantize_4bit(packed.float(), state)


def test_dequantize_rejects_short_absmax():
    packed, state = F.quantize_4bit(torch.randn(64, 64))
    state.absmax = state.absmax[:-1]
    with pytest.raises(ValueError, match="absmax: expected 64 elements"):
        F.dequantize_4bit(packed, state)


def test_dequantize_rejects_bad_state_dtype():
    packed, state = F.quantize_4bit(torch.randn(64, 64))
    state.dtype = torch.int8
    with pytest.raises(TypeError, match="quant_state.dtype"):
        F.dequantize_4bit(packed, state)


# ---- the nanobind layer itself (any DLPack array) ------------------------------------------------
def _np_args(n=128, blocksize=64):
    x = np.random.randn(n).astype(np.float32)
    return x, np.empty(n // 2, np.uint8), np.empty(n // blocksize, np.float32)


def test_binding_rejects_wrong_input_dtype():
    x, packed, absmax = _np_args()
    with pytest.raises(TypeError, match="input: expected float32, float16 or bfloat16, got float64"):
        _C.quantize_4bit(x.astype(np.float64), packed, absmax, "fp4", 64)


def test_binding_rejects_wrong_packed_dtype():
    x, packed, absmax = _np_args()
    with pytest.raises(TypeError, match="packed: expected uint8, got int8"):
        _C.quantize_4bit(x, packed.view(np.int8), absmax, "fp4", 64)


def test_binding_rejects_wrong_absmax_dtype():
    x, packed, absmax = _np_args()
    with pytest.raises(TypeError, match="absmax: expected float32"):
        _C.quantize_4bit(x, packed, np.zeros(2, np.float16), "fp4", 64)


def test_binding_rejects_non_contiguous():
    x = np.random.randn(256).astype(np.float32)[::2]
    _, packed, absmax = _np_args()
    with pytest.raises(ValueError, match="input: expected a C-contiguous array"):
        _C.quantize_4bit(x, packed, absmax, "fp4", 64)


def test_binding_takes_empty_arrays_whatever_their_strides():
    """An array with no elements is contiguous (NumPy gives shape (2, 0) strides (0, 4))."""
    empty = np.empty((2, 0), np.float32)
    _C.quantize_4bit(empty, np.empty(0, np.uint8), np.empty(0, np.float32), "fp4", 64)


def test_binding_rejects_size_mismatch():
    x, packed, absmax = _np_args()
    with pytest.raises(ValueError, match="packed: expected 64 elements"):
        _C.quantize_4bit(x, packed[:10], absmax, "fp4", 64)
    with pytest.raises(ValueError, match="absmax: expected 2 elements"):
        _C.quantize_4bit(x, packed, absmax[:1], "fp4", 64)


def test_binding_rejects_bad_blocksize():
    x, packed, absmax = _np_args()
    with pytest.raises(ValueError, match="blocksize: expected one of"):
        _C.quantize_4bit(x, packed, absmax, "fp4", 100)


def test_binding_rejects_bad_quant_type():
    x, packed, absmax = _np_args()
    with pytest.raises(ValueError, match="quant_type: expected 'fp4' or 'nf4'"):
        _C.quantize_4bit(x, packed, absmax, "fp8", 64)


def test_binding_rejects_partial_nested_arguments():
    packed = np.zeros(64, np.uint8)
    with pytest.raises(ValueError, match="give all three"):
        _C.dequantize_4bit(packed, np.ones(1, np.float32), np.empty(128, np.float32), "fp4", 64,
                           nested_codes=np.zeros(2, np.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_binding_rejects_mixed_devices():
    x = torch.randn(128, device="cuda")
    with pytest.raises(ValueError, match="packed: expected an array on cuda:0"):
        _C.quantize_4bit(x, torch.empty(64, dtype=torch.uint8), torch.empty(2, device="cuda"), "fp4", 64)


def test_set_num_threads_rejects_zero():
    with pytest.raises(ValueError, match="num_threads: expected >= 1"):
        _C.set_num_threads(0)


def test_forced_kernel_must_be_known():
    import fp4.ops as ops

    packed, state = F.quantize_4bit(torch.randn(32, 128))
    args = ops.KernelArgs.of_state(packed, state)
    with pytest.raises(ValueError, match="kernel: expected one of"):
        ops.linear_4bit_prepared(torch.randn(2, 128), args, kernel="tensor_core")


def test_wgmma_query_of_a_missing_device_says_no():
    assert not _C.gemm_4bit_uses_wgmma(-1)
    assert not _C.gemm_4bit_uses_wgmma(torch.cuda.device_count())  # one past the last (0 without CUDA)


# ---- the torch ops called directly ----------------------------------------------------------------
def test_ops_check_their_shape_and_bias_arguments():
    """A shape that does not fit the codes is an error in every op (the gradient op reads its
    weight a slab at a time, so it checks the whole first), and so are a negative out_features and a
    bias that is not floating point."""
    import fp4.library  # noqa: F401  (registers torch.ops.fp4)

    packed, state = F.quantize_4bit(torch.randn(128, 256), quant_type="nf4")
    x = torch.randn(3, 256)
    with pytest.raises(ValueError, match=r"packed: expected 12800 elements \(out_features \* in_features / 2\)"):
        torch.ops.fp4.linear_4bit_grad_input(torch.randn(3, 128), packed, state.absmax, "nf4", 64, 200)
    with pytest.raises(ValueError, match="packed: expected 16256 elements"):
        torch.ops.fp4.linear_4bit(x, packed, state.absmax, None, "nf4", 64, 127)
    with pytest.raises(ValueError, match="out_features, in_features: expected >= 0 and >= 1, got -1 and 256"):
        torch.ops.fp4.linear_4bit(x, packed, state.absmax, None, "nf4", 64, -1)
    with pytest.raises(TypeError, match="bias: expected float32, float16 or bfloat16, got torch.int32"):
        torch.ops.fp4.linear_4bit(x, packed, state.absmax, torch.ones(128, dtype=torch.int32), "nf4", 64, 128)
    dx = torch.ops.fp4.linear_4bit_grad_input(torch.ones(3, 128), packed, state.absmax, "nf4", 64, 256)
    assert torch.allclose(dx, torch.ones(3, 128) @ F.dequantize_4bit(packed, state), atol=1e-4)


def test_a_layer_from_codes_and_state_is_checked_when_built():
    """FP4Linear(packed=..., state=...) names the array that does not fit the state's shape when the
    layer is built, not at its first forward; integer scales are refused, not converted."""
    import fp4

    packed, state = F.quantize_4bit(torch.randn(64, 128), quant_type="nf4")
    fp4.FP4Linear(packed=packed.reshape(-1).view(torch.bfloat16), state=state)  # (codes in another storage dtype)
    with pytest.raises(ValueError, match=r"packed: expected 4096 bytes of codes for a \(64, 128\) weight, got 10"):
        fp4.FP4Linear(packed=packed[:10], state=state)
    with pytest.raises(ValueError, match=r"bias: expected 64 float values .* got shape \(3,\)"):
        fp4.FP4Linear(packed=packed, state=state, bias=torch.zeros(3))
    short = F.quantize_4bit(torch.randn(64, 128), quant_type="nf4")[1]
    short.absmax = short.absmax[:-1]
    with pytest.raises(ValueError, match="state.absmax: expected 128 values"):
        fp4.FP4Linear(packed=packed, state=short)
    state.absmax = state.absmax.int()
    with pytest.raises(TypeError, match="state.absmax: expected float32 scales, got torch.int32"):
        fp4.FP4Linear(packed=packed, state=state)
    with pytest.raises(TypeError, match="quant_state.absmax: expected float32 scales, got torch.int32"):
        F.dequantize_4bit(packed, state)
