"""FP4Linear: accuracy against a dequantize-then-fp64 reference, parity with bitsandbytes' layer,
module behaviour, and bad input."""

import pytest
import torch
from torch import nn

import fp4
import fp4.functional as F
from conftest import bnb_functional

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}  # relative Frobenius error


def _reference(layer, x):
    w = layer.dequantize().double()
    y = x.double() @ w.t()
    return y + layer.bias.double() if layer.bias is not None else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 2, 5, 8, 9, 33])
@pytest.mark.parametrize("quant_type,double_quant", [("fp4", False), ("nf4", True)])
def test_forward_matches_fp64_reference(device, dtype, batch, quant_type, double_quant):
    linear = nn.Linear(1024, 333, device=device, dtype=dtype)
    layer = fp4.FP4Linear.from_linear(linear, quant_type=quant_type, double_quant=double_quant)
    x = torch.randn(batch, 1024, device=device, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (batch, 333) and torch.isfinite(y).all()
    ref = _reference(layer, x)
    assert ((y.double() - ref).norm() / ref.norm()).item() < TOL[dtype]


@pytest.mark.parametrize("in_features", [64 * 3 + 32, 100, 7])
def test_odd_shapes(device, in_features):
    """in_features not a multiple of 32 (or of the blocksize, or even odd): blocks straddle rows."""
    linear = nn.Linear(in_features, 37, device=device)
    layer = fp4.FP4Linear.from_linear(linear, blocksize=32)
    x = torch.randn(3, in_features, device=device)
    ref = _reference(layer, x)
    assert ((layer(x).double() - ref).norm() / ref.norm()).item() < 1e-5


def test_leading_dims_and_empty_batch(device):
    layer = fp4.FP4Linear.from_linear(nn.Linear(256, 64, device=device))
    x = torch.randn(2, 3, 256, device=device)
    assert layer(x).shape == (2, 3, 64)
    assert torch.allclose(layer(x)[1, 2], layer(x[1, 2:3])[0])
    assert layer(torch.randn(0, 256, device=device)).shape == (0, 64)


def test_deepcopy_and_pickle_after_a_forward(device):
    """A layer that has run (and holds libfp4's prepared arrays) can be deep-copied and pickled; each
    copy computes over its own buffers."""
    import copy
    import io

    layer = fp4.FP4Linear.from_linear(nn.Linear(128, 64, device=device), quant_type="nf4")
    x = torch.randn(3, 128, device=device)
    expected = layer(x)
    twin = copy.deepcopy(layer)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(twin(x), expected) and torch.equal(loaded(x), expected)
    twin.bias.data.zero_()
    assert torch.equal(layer(x), expected) and not torch.equal(twin(x), expected)


def test_no_output_features(device):
    """A layer with no output features gives an empty result, as nn.Linear does, and no gradient
    (eager, autograd, compiled)."""
    layer = fp4.FP4Linear.from_linear(nn.Linear(64, 0, device=device), quant_type="nf4")
    x = torch.randn(2, 3, 64, device=device, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 3, 0)
    y.sum().backward()
    assert x.grad.shape == x.shape and not x.grad.any()
    assert torch.compile(layer, fullgraph=True)(torch.randn(4, 64, device=device)).shape == (4, 0)


@pytest.mark.parametrize("batch", [1, 3])
def test_forward_hands_libfp4_capsules(device, batch, monkeypatch):
    """The eager forward passes x, bias, y (and the GEMM's workspace) to libfp4 as DLPack capsules
    from torch's C to_dlpack: a torch.Tensor would make nanobind call Tensor.__dlpack__, ~2 us of
    Python per tensor and call. So does the torch op, which prepares the weight's arrays on every
    call. 2-d and 3-d inputs, the op, the same bits."""
    dtype = torch.float16 if device == "cuda" else torch.float32  # (batch 3 in fp16 takes the CUDA GEMM)
    layer = fp4.FP4Linear.from_linear(nn.Linear(256, 64, device=device, dtype=dtype), double_quant=True)
    x = torch.randn(batch, 256, device=device, dtype=dtype)
    with torch.inference_mode():
        expected = layer(x)  # (also prepares the weight, whose arrays go through __dlpack__ once)

    calls = []
    exporter = torch.Tensor.__dlpack__

    def counted(self, *args, **kwargs):
        calls.append(tuple(self.shape))
        return exporter(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "__dlpack__", counted)
    with torch.inference_mode():
        assert torch.equal(layer(x), expected)
        assert torch.equal(layer(x.reshape(1, batch, 256)), expected.reshape(1, batch, 64))
        assert torch.equal(torch.ops.fp4.linear_4bit(x, layer.weight, layer.absmax, layer.bias, layer.quant_type,
                                                     layer.blocksize, layer.out_features, layer.nested_absmax,
                                                     layer.nested_code, layer.nested_offset, layer.nested_blocksize),
                           expected)
    assert calls == []


def test_matches_bitsandbytes_layer_math(device):
    """Same weights as bitsandbytes quantizes them: output equals x @ bnb_dequantize(W).T + b."""
    B = bnb_functional()
    linear = nn.Linear(512, 128, device=device, dtype=torch.float16)
    layer = fp4.FP4Linear.from_linear(linear, quant_type="nf4")
    bnb_packed, bnb_state = B.quantize_4bit(linear.weight.detach(), blocksize=64, quant_type="nf4")
    assert torch.equal(layer.weight, bnb_packed)
    x = torch.randn(4, 512, device=device, dtype=torch.float16)
    bnb_out = (x.double() @ B.dequantize_4bit(bnb_packed, bnb_state).double().t() + linear.bias.double())
    assert ((layer(x).double() - bnb_out).norm() / bnb_out.norm()).item() < 2e-3


def test_from_bnb_reuses_bytes(device):
    bnb = pytest.importorskip("bitsandbytes")
    linear = nn.Linear(256, 64)
    bnb_layer = fp4.swap_linear_with_bnb_linear(linear, dtype=torch.float32, quant_type="nf4").to(device)
    if getattr(bnb_layer.weight, "quant_state", None) is None:
        pytest.skip("bitsandbytes did not quantize on this device")
    layer = fp4.FP4Linear.from_bnb(bnb_layer)
    assert layer.weight.data_ptr() == bnb_layer.weight.data_ptr()  # no copy, no requantization
    x = torch.randn(3, 256, device=device)
    expected = bnb_layer(x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
    assert isinstance(fp4.TorchFP4Linear(bnb_layer), fp4.FP4Linear)


def test_memory_is_packed_bytes_plus_absmax():
    layer = fp4.FP4Linear.from_linear(nn.Linear(4096, 1024, bias=False), blocksize=64)
    held = {name: b.numel() * b.element_size() for name, b in layer.named_buffers()}
    assert held["weight"] == 4096 * 1024 // 2 and held["absmax"] == 4096 * 1024 // 64 * 4
    assert sum(held.values()) == held["weight"] + held["absmax"] + 16 * 4  # + the 16-entry codebook


def test_to_dtype_keeps_quantization_state():
    layer = fp4.FP4Linear.from_linear(nn.Linear(128, 32))
    before = layer.dequantize()
    layer.to(torch.float16)
    assert layer.absmax.dtype == torch.float32 and layer.weight.dtype == torch.uint8
    assert torch.equal(layer.dequantize(), before)
    assert layer(torch.randn(2, 128, dtype=torch.float16)).dtype == torch.float16


def test_extra_repr_and_dequantize():
    layer = fp4.FP4Linear.from_linear(nn.Linear(128, 32), quant_type="nf4", blocksize=128)
    assert "in_features=128, out_features=32" in repr(layer) and "nf4" in repr(layer) and "blocksize=128" in repr(layer)
    assert layer.dequantize().shape == (32, 128)


def test_rejects_wrong_in_features():
    layer = fp4.FP4Linear.from_linear(nn.Linear(128, 32))
    with pytest.raises(ValueError, match="x: expected last dimension 128"):
        layer(torch.randn(2, 127))


def test_rejects_wrong_dtype():
    layer = fp4.FP4Linear.from_linear(nn.Linear(128, 32))
    with pytest.raises(TypeError, match="x: expected float32, float16 or bfloat16"):
        layer(torch.randn(2, 128, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_rejects_wrong_device():
    layer = fp4.FP4Linear.from_linear(nn.Linear(128, 32))
    with pytest.raises(ValueError, match="x: expected a tensor on cpu"):
        layer(torch.randn(2, 128, device="cuda"))


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="linear: expected an nn.Linear"):
        fp4.FP4Linear.from_linear(nn.Conv1d(3, 3, 1))


def test_c_linear_rejects_mismatched_bias():
    from fp4 import _C
    import numpy as np

    x = np.random.randn(2, 64).astype(np.float32)
    packed, absmax = np.zeros(16 * 64 // 2, np.uint8), np.ones(16, np.float32)
    with pytest.raises(ValueError, match="bias: expected 16 elements"):
        _C.linear_4bit(x, packed, absmax, np.zeros(3, np.float32), np.empty((2, 16), np.float32), "fp4", 64)


@pytest.mark.parametrize("m", [1, 3, 6, 8])
def test_c_linear_every_gemv_batch(device, m):
    """The C API's fused kernel at each batch it serves (Python routes larger CUDA batches to
    dequantize + GEMM, so call it directly), against the fp64 reference."""
    from fp4 import _C
    from fp4.functional import _nested_args, _scales_of

    layer = fp4.FP4Linear.from_linear(nn.Linear(512, 96, device=device, dtype=torch.float16), "nf4", double_quant=True)
    x = torch.randn(m, 512, device=device, dtype=torch.float16)
    y = torch.full((m, 96), float("nan"), device=device, dtype=torch.float16)
    state = layer.quant_state
    stream = torch.cuda.current_stream().cuda_stream if device.type == "cuda" else 0
    _C.linear_4bit(x, layer.weight.reshape(-1), _scales_of(state), layer.bias, y, "nf4", 64, stream,
                   **_nested_args(state))
    ref = _reference(layer, x)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 2e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_to_device_moves_the_quantized_weight():
    layer = fp4.FP4Linear.from_linear(nn.Linear(256, 64), quant_type="nf4", double_quant=True)
    x = torch.randn(3, 256)
    expected = layer(x)
    layer.to("cuda")
    assert all(b.device.type == "cuda" for b in layer.buffers())
    # nested statistics: 8-bit codes and their fp32 scales, dtypes untouched by the move
    assert layer.absmax.dtype == torch.uint8 and layer.nested_absmax.dtype == torch.float32
    torch.testing.assert_close(layer(x.cuda()).cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("blocksize,double_quant,in_features", [(64, False, 8192), (32, True, 8192), (4096, True, 8192),
                                                                (64, True, 512)])
def test_cpu_amx_and_vector_tiles_agree(monkeypatch, dtype, blocksize, double_quant, in_features):
    """Batches from 4 (bf16), 8 (fp16) or 16 (fp32) on run on AMX tiles where the CPU has them: 16
    weight rows x 32 columns decoded to bf16 per tile (fp16 / fp32 split into 2 / 3 exact bf16
    parts), batches in 16-row tiles, 6 / 5 / 4 of them per pass (100 rows: several passes, the last
    tile partial; with 8192 columns x is past 1 MB and each pass runs over all features on its own,
    with 512 all passes run per feature tile, its decoded weights reused), 37 features (a partial
    tile). Against fp64, and against the vector kernel (FP4_CPU_ISA=avx512) within the dtype's output
    rounding."""
    torch.manual_seed(0)
    layer = fp4.FP4Linear.from_linear(nn.Linear(in_features, 37).to(dtype), quant_type="nf4", blocksize=blocksize,
                                      double_quant=double_quant)
    for batch in (1, 4, 8, 17, 100):
        x = torch.randn(batch, in_features, dtype=dtype)
        ref = _reference(layer, x)
        y = layer(x)
        monkeypatch.setenv("FP4_CPU_ISA", "avx512")
        y_vector = layer(x)
        monkeypatch.delenv("FP4_CPU_ISA")
        assert ((y.double() - ref).norm() / ref.norm()).item() < TOL[dtype]
        assert ((y.double() - y_vector.double()).norm() / ref.norm()).item() < {torch.bfloat16: 1e-2}.get(dtype, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_amx_writes_nan_as_the_vector_kernel(monkeypatch, dtype):
    """The AMX kernel rounds its sums to fp16 / bf16 16 at a time (cpu/avx512_store.hpp), the vector
    kernel one at a time: a NaN in an input row gives that row the same NaN in both (bf16: 0x7fc0,
    as torch writes it), and the rows around it stay finite and agree."""
    torch.manual_seed(0)
    layer = fp4.FP4Linear.from_linear(nn.Linear(512, 37).to(dtype), quant_type="nf4")
    x = torch.randn(20, 512, dtype=dtype)  # (20 rows: AMX tiles where the CPU has them)
    x[3, 100] = float("nan")
    if dtype == torch.bfloat16:
        x.view(torch.int16)[3, 100] = -64  # (0xffc0, a negative NaN: written as 0x7fc0 all the same)
    y = layer(x)
    monkeypatch.setenv("FP4_CPU_ISA", "avx512")
    y_vector = layer(x)
    assert torch.isnan(y[3]).all() and torch.isfinite(y[torch.arange(20) != 3]).all()
    if dtype == torch.bfloat16:
        assert (y[3].view(torch.int16) == 0x7FC0).all() and torch.equal(y[3].view(torch.int16), y_vector[3].view(torch.int16))
    torch.testing.assert_close(y[4:], y_vector[4:], rtol=TOL[dtype] * 10, atol=TOL[dtype])


@pytest.mark.parametrize("isa,tile_rows", [("avx512", 15), ("avx2", 11)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("blocksize,double_quant,in_features", [(64, False, 8192), (32, True, 1024), (4096, True, 4096)])
def test_cpu_outer_product_kernel_without_amx(monkeypatch, isa, tile_rows, dtype, blocksize, double_quant,
                                              in_features):
    """Without AMX (FP4_CPU_ISA), batches from 16 (AVX2: 12): weight panels of 48 (16) rows decoded
    once per block of input rows, 8 (6) input rows per pass (cpu/linear_outer.cpp). 101 features (a
    panel cut short after whole ones), 32 / 50 / 100 rows (a pass cut short; with 8192 columns
    several blocks of rows), bias. Against fp64, and against the vector tile kernel on the first
    rows alone (a batch below)."""
    if isa not in fp4._C.cpu_kernels() and not (isa == "avx2" and "avx512" in fp4._C.cpu_kernels()):
        pytest.skip(f"needs {isa}")
    torch.manual_seed(0)
    layer = fp4.FP4Linear.from_linear(nn.Linear(in_features, 101).to(dtype), quant_type="nf4", blocksize=blocksize,
                                      double_quant=double_quant)
    monkeypatch.setenv("FP4_CPU_ISA", isa)
    for batch in (32, 50, 100):
        x = torch.randn(batch, in_features, dtype=dtype)
        ref = _reference(layer, x)
        y = layer(x)
        assert ((y.double() - ref).norm() / ref.norm()).item() < TOL[dtype]
        tiles = layer(x[:tile_rows])  # (below the outer kernel's batch: the tile kernel)
        torch.testing.assert_close(y[:tile_rows].float(), tiles.float(), rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)


def test_cpu_kernels_report_what_runs(monkeypatch):
    """fp4_cpu_kernels names the CPU path: AMX tiles wherever the CPU lists AMX-BF16 (Linux flags),
    and FP4_CPU_ISA lowers it."""
    from fp4 import _C
    assert _C.cpu_kernels() in ("avx512 amx-bf16", "avx512", "avx2", "generic")
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        flags = set()
    if {"amx_bf16", "amx_tile", "avx512bw", "avx512vbmi"} <= flags:
        assert _C.cpu_kernels() == "avx512 amx-bf16"
    for isa, expected in (("avx512", "avx512"), ("generic", "generic")):
        monkeypatch.setenv("FP4_CPU_ISA", isa)
        assert _C.cpu_kernels() == expected or (isa == "avx512" and _C.cpu_kernels() in ("avx2", "generic"))


@pytest.mark.parametrize("isa", ["native", "avx2"])
@pytest.mark.parametrize("nested_blocksize", [100, 7])
@pytest.mark.parametrize("blocksize,in_features", [(32, 2048), (4096, 8192)])
def test_cpu_tile_kernel_scales_and_shapes(monkeypatch, isa, nested_blocksize, blocksize, in_features):
    """The CPU tile kernel (rows that start on a block boundary: several weight rows x input rows per
    pass, block scales gathered a run at a time) with nested groups that straddle those runs (100,
    7 blocks), rows of 64 blocks and of two, features and batches that leave partial tiles; against
    fp64 of the same dequantized weight."""
    from fp4 import ops
    if isa != "native":
        monkeypatch.setenv("FP4_CPU_ISA", isa)
    torch.manual_seed(0)
    layer = fp4.FP4Linear.from_linear(nn.Linear(in_features, 23), quant_type="nf4", blocksize=blocksize)
    args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
    # Re-quantize the fp32 block scales to 8-bit codes in groups of nested_blocksize (the
    # bitsandbytes order: code * group absmax + mean) and dequantize with what they decode to.
    absmax = args.scales
    offset = absmax.mean()
    groups = -(-absmax.numel() // nested_blocksize)
    group_of = torch.arange(absmax.numel()) // nested_blocksize
    padded = torch.zeros(groups * nested_blocksize)
    padded[: absmax.numel()] = (absmax - offset).abs()
    group_absmax = padded.view(groups, nested_blocksize).amax(1).clamp_min(1e-12)
    nested_code = layer.quant_state.state2.code if layer.quant_state.state2 is not None else \
        fp4.FP4Linear.from_linear(nn.Linear(64, 64), "nf4", 64, True).quant_state.state2.code
    codes = ((absmax - offset) / group_absmax[group_of])[:, None].sub(nested_code[None, :]).abs().argmin(1)
    decoded = nested_code[codes] * group_absmax[group_of] + offset
    nested = ops.KernelArgs(args.codes, codes.to(torch.uint8), "nf4", blocksize, (23, in_features),
                            nested_absmax=group_absmax, nested_code=nested_code, nested_offset=offset.reshape(1),
                            nested_blocksize=nested_blocksize)
    weight = torch.empty(23, in_features)
    F.dequantize_4bit(layer.weight, absmax=decoded, out=weight, blocksize=blocksize, quant_type="nf4")
    for batch in (1, 3, 6):
        x = torch.randn(batch, in_features)
        y = ops.linear_4bit_prepared(x, nested, layer.bias)
        ref = x.double() @ weight.double().t() + layer.bias.double()
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("isa", ["native", "avx512", "avx2", "generic"])
@pytest.mark.parametrize("in_features", [1024, 200, 7])
def test_cpu_kernels_agree_on_every_isa(monkeypatch, isa, in_features):
    """Each CPU code path (AVX-512 / AVX2 / scalar, forced lower with FP4_CPU_ISA) against fp64."""
    if isa != "native":
        monkeypatch.setenv("FP4_CPU_ISA", isa)
    layer = fp4.FP4Linear.from_linear(nn.Linear(in_features, 50), quant_type="nf4", double_quant=True, blocksize=32)
    x = torch.randn(11, in_features)
    ref = _reference(layer, x)
    assert ((layer(x).double() - ref).norm() / ref.norm()).item() < 1e-5
