"""Interchange: fp4 writes the same bytes, absmax and nested state as bitsandbytes on the same
device, and dequantizes to the same values."""

import pytest
import torch

import fp4.functional as F
from conftest import bnb_functional

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Odd sizes, sizes that are not a multiple of the blocksize (blocks straddle rows; a partial last
# block), a single element, and a large multi-block tensor.
SHAPES = [(1,), (7, 3), (333,), (64, 100), (3, 1000), (128, 4096 + 64)]


def _data(shape, dtype, device):
    # Scaled normal data with a few large outliers, as real weights have.
    x = torch.randn(shape, device=device) * 0.05
    x.view(-1)[:: max(1, x.numel() // 7)] *= 20
    return x.to(dtype)


def _assert_same_state(ours, theirs):
    assert torch.equal(ours.absmax, theirs.absmax), "absmax differs"
    assert ours.blocksize == theirs.blocksize and ours.quant_type == theirs.quant_type
    assert ours.dtype == theirs.dtype and tuple(ours.shape) == tuple(theirs.shape)
    assert torch.equal(ours.code.cpu(), theirs.code.cpu()), "codebook differs"
    assert ours.nested == (theirs.state2 is not None)
    if ours.nested:
        assert torch.equal(ours.offset, theirs.offset), "nested offset differs"
        assert torch.equal(ours.state2.absmax, theirs.state2.absmax), "nested absmax differs"
        assert torch.equal(ours.state2.code, theirs.state2.code), "nested code differs"
        assert ours.state2.blocksize == theirs.state2.blocksize


@pytest.mark.parametrize("quant_type", ["fp4", "nf4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_quantize_matches_bitsandbytes(device, quant_type, blocksize, dtype, nested):
    B = bnb_functional()
    for shape in SHAPES:
        A = _data(shape, dtype, device)
        packed, state = F.quantize_4bit(A, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
        bnb_packed, bnb_state = B.quantize_4bit(A, blocksize=blocksize, compress_statistics=nested,
                                                quant_type=quant_type)
        assert packed.shape == bnb_packed.shape and packed.dtype == bnb_packed.dtype, shape
        mismatch = (packed != bnb_packed).sum().item()
        assert mismatch == 0, f"{shape}: {mismatch} of {packed.numel()} packed bytes differ"
        _assert_same_state(state, bnb_state)

        ours = F.dequantize_4bit(packed, state)
        assert ours.dtype == dtype and ours.shape == A.shape
        assert torch.equal(ours, format_reference(B, bnb_packed, bnb_state)), f"{shape}: values differ from the format"
        if not _bnb_cpu_misreads(device, shape, blocksize):
            theirs = B.dequantize_4bit(bnb_packed, bnb_state).reshape(ours.shape)
            if _bnb_cpu_avx512_rounds_differently(device, dtype, quant_type):
                # values agree to the last bit of fp16 (one rounding step), not always exactly
                torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=0)
            else:
                assert torch.equal(ours, theirs), f"{shape}: dequantized values differ"


def _bnb_cpu_misreads(device, shape, blocksize):
    """bitsandbytes 0.50's native CPU dequantize_4bit restarts the block count at every row, so when
    a block straddles two rows (last dim not a multiple of blocksize, more than one row) it applies
    the wrong absmax: its values then disagree with its own quantize_4bit and with its CUDA path.
    fp4 follows the format (and bitsandbytes' CUDA and pure-torch paths) there."""
    return device.type == "cpu" and len(shape) > 1 and shape[0] > 1 and shape[-1] % blocksize != 0


def _bnb_cpu_avx512_rounds_differently(device, dtype, quant_type):
    """On AVX-512 CPUs bitsandbytes 0.50 dequantizes to float16 with a vector kernel whose
    rounding differs by one fp16 step from its own reference formula (code * absmax in fp32, then
    round to nearest even) for some elements; fp4 keeps the reference rounding (the format check
    above is exact)."""
    return device.type == "cpu" and dtype == torch.float16 and torch.backends.cpu.get_cpu_capability() == "AVX512"


def format_reference(B, packed, state):
    """The format's definition, evaluated with bitsandbytes' own pieces: code[q] * absmax[block]
    in fp32 (nested absmax expanded by bitsandbytes' dequantize_blockwise + offset), then rounded."""
    absmax = state.absmax
    if state.state2 is not None:
        absmax = B.dequantize_blockwise(state.absmax, state.state2) + state.offset
    codes = packed.view(torch.uint8).reshape(-1)
    q = torch.stack([codes >> 4, codes & 15], dim=1).reshape(-1)[: state.shape.numel()].long()
    scale = absmax.float().repeat_interleave(state.blocksize)[: q.numel()]
    return (state.code[q] * scale).to(state.dtype).reshape(state.shape)


@pytest.mark.parametrize("quant_type", ["fp4", "nf4"])
def test_dequantize_reads_bitsandbytes_state(device, quant_type):
    """A QuantState made by bitsandbytes dequantizes through fp4 to bitsandbytes' values."""
    B = bnb_functional()
    A = torch.randn(300, 257, device=device, dtype=torch.float16)
    packed, bnb_state = B.quantize_4bit(A, blocksize=128, compress_statistics=True, quant_type=quant_type)
    assert torch.equal(F.dequantize_4bit(packed, bnb_state), B.dequantize_4bit(packed, bnb_state))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_cpu_dequantize_vector_and_scalar_paths_agree(monkeypatch, dtype, blocksize, nested):
    """On AVX-512 CPUs a block's table is rounded 16 values at a time and its codes looked up 32 at
    a time: the same bits as the scalar path (FP4_CPU_ISA=generic) for whole blocks, a last block
    cut short (odd length too), and fp16 subnormals."""
    A = _data((5, blocksize * 3 + 17), dtype, "cpu")
    if dtype == torch.float16:
        A.view(-1)[:blocksize] *= 1e-4  # (a block of subnormal fp16 values)
    packed, state = F.quantize_4bit(A, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    vector = F.dequantize_4bit(packed, state)
    monkeypatch.setenv("FP4_CPU_ISA", "generic")
    scalar = F.dequantize_4bit(packed, state)
    assert torch.equal(vector.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       scalar.view(torch.int16 if dtype != torch.float32 else torch.int32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_cpu_quantize_vector_and_scalar_paths_agree(monkeypatch, dtype, blocksize):
    """Whole blocks quantize 16 values at a time on AVX-512 CPUs (the scalar path's fp32 operations):
    the same bytes and absmax as the scalar path (FP4_CPU_ISA=generic) for whole and partial blocks,
    and a non-finite value is still reported with its block after vector-quantized ones."""
    A = _data((5, blocksize * 3 + 16), dtype, "cpu")
    vector = F.quantize_4bit(A, blocksize=blocksize, quant_type="nf4")
    monkeypatch.setenv("FP4_CPU_ISA", "generic")
    scalar = F.quantize_4bit(A, blocksize=blocksize, quant_type="nf4")
    assert torch.equal(vector[0], scalar[0]) and torch.equal(vector[1].absmax, scalar[1].absmax)
    monkeypatch.delenv("FP4_CPU_ISA")
    A.view(-1)[blocksize * 7 + 3] = float("nan")
    with pytest.raises(ValueError, match=f"block 7 .*NaN or Inf"):
        F.quantize_4bit(A, blocksize=blocksize, quant_type="nf4")


def test_ties_follow_the_device_rule(device):
    """Values exactly on a midpoint between two codes: bitsandbytes' CPU path sends them to the lower
    code, its CUDA path uses its own thresholds; fp4 follows whichever device it runs on."""
    B = bnb_functional()
    for quant_type in ("fp4", "nf4"):
        code = F.get_4bit_type(quant_type)
        sorted_code = code.sort().values
        mids = (sorted_code[:-1] + sorted_code[1:]) / 2
        A = torch.cat([mids, torch.tensor([1.0]), -mids, torch.tensor([-1.0])]).repeat(2).to(device)
        ours, _ = F.quantize_4bit(A, blocksize=32, quant_type=quant_type)
        theirs, _ = B.quantize_4bit(A, blocksize=32, quant_type=quant_type)
        assert torch.equal(ours, theirs)


def test_quant_storage_relabels_bytes(device):
    B = bnb_functional()
    A = torch.randn(64, 64, device=device)
    ours, _ = F.quantize_4bit(A, quant_storage=torch.bfloat16)
    theirs, _ = B.quantize_4bit(A, quant_storage=torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))


def test_codebooks_match_bitsandbytes():
    B = bnb_functional()
    for quant_type in ("fp4", "nf4"):
        assert torch.equal(F.get_4bit_type(quant_type), B.get_4bit_type(quant_type, device="cpu"))
    from fp4._torch import dynamic_code

    assert torch.equal(dynamic_code("cpu"), B.create_dynamic_map())
