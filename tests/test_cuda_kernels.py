"""Every CUDA kernel behind the 4-bit linear op, forced one at a time, against the
dequantize-then-matmul reference: random shapes, batches, formats, nested statistics and dtypes."""

import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import fp4
import fp4.ops as ops
from fp4 import _C
from conftest import HAS_CUDA

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]


def _layer(out_features, in_features, dtype, quant_type="nf4", double_quant=False, blocksize=64, bias=True):
    linear = nn.Linear(in_features, out_features, bias=bias, device="cuda", dtype=dtype)
    return fp4.FP4Linear.from_linear(linear, quant_type, blocksize, double_quant)


def _check(layer, x, kernel):
    args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
    y = torch.full((x.shape[0], layer.out_features), float("nan"), device="cuda", dtype=x.dtype)  # poisoned
    ops.linear_4bit_prepared(x, args, layer.bias, out=y, kernel=kernel)
    reference = x.float() @ layer.dequantize().to(x.dtype).float().t()
    if layer.bias is not None:
        reference += layer.bias.float()
    # fp32 accumulation in a different order, one rounding of the result to the activation dtype
    scale = reference.abs().max().item() + 1e-6
    limit = (4e-3 if x.dtype == torch.float16 else 2e-2) * scale
    assert torch.isfinite(y).all()
    assert (y.float() - reference).abs().max().item() <= limit


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 3, 8, 9, 16, 17, 31, 64, 65, 130])
@pytest.mark.parametrize("quant_type,double_quant,blocksize", [("nf4", False, 64), ("fp4", True, 64),
                                                               ("nf4", True, 32), ("fp4", False, 256)])
def test_tensor_core_gemm_matches_reference(dtype, batch, quant_type, double_quant, blocksize):
    layer = _layer(400, 640, dtype, quant_type, double_quant, blocksize)  # 400: a partial 256-feature block
    _check(layer, torch.randn(batch, 640, device="cuda", dtype=dtype), "gemm")


WGMMA = HAS_CUDA and ops.gemm_uses_wgmma(0)


def test_wgmma_is_reported_exactly_where_it_can_run():
    """sm_90 devices with sm_90a code in the library, nothing else."""
    built = "90a" in _C.cuda_archs().replace("-real", "").split()
    assert WGMMA == (built and torch.cuda.get_device_capability(0) == (9, 0))


# Batch 17-64 runs on either Hopper kernel (FP4_CUDA_WS_SMALL: "1" the warp-specialized one, "0"
# the register-operand one); larger batches on the warp-specialized one only.
_WGMMA_BATCHES = [(batch, kernel) for batch in (17, 32, 40, 64) for kernel in ("1", "0")] + [
    (batch, "") for batch in (65, 128, 130, 257, 300)]


@pytest.mark.skipif(not WGMMA, reason="needs an sm_90 GPU and a library built for sm_90a")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch,small_kernel", _WGMMA_BATCHES,
                         ids=[f"{b}-{ {'1': 'ws', '0': 'register', '': 'default'}[s]}" for b, s in _WGMMA_BATCHES])
@pytest.mark.parametrize("quant_type,double_quant,blocksize", [("nf4", False, 64), ("fp4", True, 64),
                                                               ("nf4", True, 128), ("fp4", False, 1024)])
def test_wgmma_gemm_matches_reference(monkeypatch, dtype, batch, small_kernel, quant_type, double_quant, blocksize):
    """The Hopper kernels (batch > 16, in_features % 256 == 0): both batch tiles of the register-
    operand kernel (32 / 64), all four of the warp-specialized one (32 / 64 rows with two 64-column
    slices per stage: 17-64; 128 rows: 65, 128; 256 rows: 130, a 257th row alone in its tile, 300),
    partial feature tiles (400 = 3 x 128 + 16), k split across blocks."""
    monkeypatch.setenv("FP4_CUDA_WS_SMALL", small_kernel)
    layer = _layer(400, 1280, dtype, quant_type, double_quant, blocksize)
    _check(layer, torch.randn(batch, 1280, device="cuda", dtype=dtype), "gemm")


@pytest.mark.skipif(not WGMMA, reason="needs an sm_90 GPU and a library built for sm_90a")
def test_wgmma_gemm_long_rows_and_many_tiles():
    # (4096, 1024) at batch 600: 96 tiles, most of a wave, so k is not split (before, into 192 blocks);
    # (272, 1152) at batch 100: k % 256 != 0, so the 128-row batch tile takes one atom per stage;
    # (128, 4352) at batch 300: k split in 4 ranges of 18 stages, so three begin inside a scale group;
    # (200, 8192) at batch 48: the scales' TMA boxes of a half-empty feature tile, k split across blocks
    for out_features, in_features, batch, bias in ((128, 14336, 33, True), (4224, 512, 200, False),
                                                   (200, 8192, 48, False),
                                                   (256, 8192, 1030, True), (384, 4096, 20, False),
                                                   (4096, 1024, 600, True), (272, 1152, 100, True),
                                                   (128, 4352, 300, False)):
        layer = _layer(out_features, in_features, torch.bfloat16, bias=bias)
        _check(layer, torch.randn(batch, in_features, device="cuda", dtype=torch.bfloat16), "gemm")


@pytest.mark.skipif(not WGMMA, reason="needs an sm_90 GPU and a library built for sm_90a")
@pytest.mark.parametrize("batch", [100, 300])
def test_warp_specialized_gemm_gives_identical_bits_on_every_call(batch):
    """The batch > 64 kernel hands stages between warpgroups through mbarriers and named barriers; a
    race there would show as calls that differ (k is split at most in two here, and two fp32 partial
    sums add up the same in either order)."""
    layer = _layer(8192, 4096, torch.bfloat16, bias=False)
    args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
    x = torch.randn(batch, 4096, device="cuda", dtype=torch.bfloat16)
    first = ops.linear_4bit_prepared(x, args, kernel="gemm").clone()
    for _ in range(50):
        assert torch.equal(ops.linear_4bit_prepared(x, args, kernel="gemm"), first)
    _check(layer, x, "gemm")


@pytest.mark.skipif(not WGMMA, reason="needs an sm_90 GPU and a library built for sm_90a")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [20, 50, 100, 300])
def test_warp_specialized_gemm_stores_y_in_pieces_with_the_same_bits(monkeypatch, dtype, batch):
    """Whole tiles' sums reach y through each consumer warp's staging rows in 16-byte pieces where n %
    8 == 0 and y is 16-byte aligned; FP4_CUDA_WS_PIECES=0 stores them element by element. Both round
    the same sums once, so the bits agree: every batch tile (32, 64, 128, 256 rows), a partial last
    tile of features (400 = 3 x 128 + 16) and of batch rows, with the bias. An unaligned y and n % 8 !=
    0 take the element stores. (FP4_CUDA_WS_SHARE=0: these few tiles would otherwise split k.)"""
    monkeypatch.setenv("FP4_CUDA_WS_SHARE", "0")
    layer = _layer(400, 1280, dtype)
    args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
    x = torch.randn(batch, 1280, device="cuda", dtype=dtype)
    pieces = ops.linear_4bit_prepared(x, args, layer.bias, kernel="gemm")
    monkeypatch.setenv("FP4_CUDA_WS_PIECES", "0")
    elements = ops.linear_4bit_prepared(x, args, layer.bias, kernel="gemm")
    assert torch.equal(pieces, elements)
    monkeypatch.delenv("FP4_CUDA_WS_PIECES")
    _check(layer, x, "gemm")
    unaligned = torch.full((batch * 400 + 1,), float("nan"), device="cuda", dtype=dtype)[1:].view(batch, 400)
    ops.linear_4bit_prepared(x, args, layer.bias, out=unaligned, kernel="gemm")
    assert torch.equal(unaligned, pieces)
    _check(_layer(404, 1280, dtype), x, "gemm")


@pytest.mark.skipif(not WGMMA, reason="needs an sm_90 GPU and a library built for sm_90a")
@pytest.mark.parametrize("share", ["0", ""], ids=["whole", "default"])
@pytest.mark.parametrize("batch", [100, 300])
def test_warp_specialized_walkers_take_tiles_in_turn(monkeypatch, share, batch):
    """Past one wave the whole tiles are taken by at most one block per SM, each walking tiles b, b +
    walkers, ... (the producers fetch the next tile's stages while the consumers store the last);
    FP4_CUDA_WS_WALK=0 gives every tile a block of its own. A tile's sums are the same either way: the
    same bits, and right (2-3 tiles per walker; the last feature tile holds 8 rows; by default the
    last wave is shared too)."""
    monkeypatch.setenv("FP4_CUDA_WS_SHARE", share)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    batch_tiles = -(-batch // (256 if batch > 128 else 128))
    out_features = 128 * (-(-2 * sms // batch_tiles) + 3) - 120
    layer = _layer(out_features, 512, torch.bfloat16)
    args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
    x = torch.randn(batch, 512, device="cuda", dtype=torch.bfloat16)
    walking = ops.linear_4bit_prepared(x, args, layer.bias, kernel="gemm")
    monkeypatch.setenv("FP4_CUDA_WS_WALK", "0")
    assert torch.equal(ops.linear_4bit_prepared(x, args, layer.bias, kernel="gemm"), walking)
    monkeypatch.delenv("FP4_CUDA_WS_WALK")
    _check(layer, x, "gemm")


@pytest.mark.skipif(not WGMMA, reason="needs an sm_90 GPU and a library built for sm_90a")
@pytest.mark.parametrize("out_features,in_features,batch", [(512, 4096, 20), (1000, 8192, 64), (384, 2048, 100),
                                                            (200, 4096, 300)])
def test_warp_specialized_gemm_splits_k_in_clusters(monkeypatch, out_features, in_features, batch):
    """A single wave that splits k 2-8 ways runs in clusters of that many blocks, which add up each
    other's sums in shared memory: the workspace stays untouched (FP4_CUDA_WS_CLUSTER=0 sums through
    it), every call gives the same bits, and they are right. Batch tiles of 32, 64, 128 and 256 rows
    split 4, 8, 2 and 4 ways; partial last tiles of features and of batch rows; bias."""
    from fp4._torch import dlpack_of, stream_of
    layer = _layer(out_features, in_features, torch.bfloat16)
    args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
    x = torch.randn(batch, in_features, device="cuda", dtype=torch.bfloat16)

    def call():
        y = torch.full((batch, out_features), float("nan"), device="cuda", dtype=x.dtype)
        workspace = torch.full((_C.gemm_4bit_workspace_size(batch, out_features) // 4,), float("nan"), device="cuda")
        _C.gemm_prepared(dlpack_of(x), args.prepared, dlpack_of(layer.bias), dlpack_of(y), dlpack_of(workspace),
                         stream_of(x))
        return y, workspace

    clustered, workspace = call()
    assert torch.isnan(workspace).all()
    for _ in range(20):
        assert torch.equal(call()[0], clustered)
    monkeypatch.setenv("FP4_CUDA_WS_CLUSTER", "0")
    through_workspace, workspace = call()
    assert not torch.isnan(workspace).all()
    scale = clustered.float().abs().max().item()
    assert (through_workspace.float() - clustered.float()).abs().max().item() <= 1e-2 * scale
    monkeypatch.delenv("FP4_CUDA_WS_CLUSTER")
    _check(layer, x, "gemm")


# (out_features, in_features, settings): whole tiles stored in 16-byte pieces and (n odd) element by
# element; k split 2, 4 and 8 ways in clusters; 4 ways with 7 of the 8 clusters fitting, the rest
# beside them; 4 ways through the workspace (its vector atomics add in any order: no same-bits check).
_BATCH16_SHAPES = [(9000, 1024, {}), (9001, 1024, {}), (1001, 2048, {}), (1000, 4096, {}), (256, 4096, {}),
                   (1024, 4096, {"FP4_CUDA_WS_CLUSTERS_FIT": "7", "FP4_CUDA_WS_REST": "1"}),
                   (1024, 4096, {"FP4_CUDA_WS_CLUSTER": "0"})]


@pytest.mark.skipif(not WGMMA, reason="needs an sm_90 GPU and a library built for sm_90a")
@pytest.mark.parametrize("dtype,quant_type,double_quant", [(torch.bfloat16, "nf4", False),
                                                            (torch.float16, "fp4", True)],
                         ids=["bf16-nf4", "fp16-fp4-nested"])
@pytest.mark.parametrize("batch", [1, 9, 16])
@pytest.mark.parametrize("out_features,in_features,settings", _BATCH16_SHAPES,
                         ids=[f"{n}x{k}-{'-'.join(s) or 'default'}" for n, k, s in _BATCH16_SHAPES])
def test_warp_specialized_gemm_batch_16_tile_matches_reference(monkeypatch, out_features, in_features, settings, batch,
                                                               dtype, quant_type, double_quant):
    """The warp-specialized kernel's 16-row batch tile (FP4_CUDA_WS_BATCH16=1 takes it at any batch
    <= 16) is right against the dequantize reference, whether its tiles are whole or split in
    clusters, beside them or through the workspace, and but for the last gives the same bits on every
    call."""
    monkeypatch.setenv("FP4_CUDA_WS_BATCH16", "1")
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    layer = _layer(out_features, in_features, dtype, quant_type, double_quant)
    x = torch.randn(batch, in_features, device="cuda", dtype=dtype)
    _check(layer, x, "gemm")
    args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
    first = ops.linear_4bit_prepared(x, args, layer.bias, kernel="gemm")
    if "FP4_CUDA_WS_CLUSTER" not in settings:
        for _ in range(3):
            assert torch.equal(ops.linear_4bit_prepared(x, args, layer.bias, kernel="gemm"), first)


@pytest.mark.skipif(not WGMMA or torch.cuda.get_device_properties(0).multi_processor_count != 132,
                    reason="the rule's cases are measured on an H100 SXM (132 SMs)")
def test_batch_9_16_kernel_by_the_measured_rule(monkeypatch):
    """Batch 9-16 runs the warp-specialized kernel where the rule measured it faster ((14336, 4096),
    whose 112 feature tiles fill most SMs; (3584, 4096) and (4096, 4096), split 4 ways, a block's
    share 8 stages), the stream kernel elsewhere ((11008, 4096); (4096, 8192), 16 stages a block;
    (1024, 4096), below 2^23 weights) and at batch <= 8; FP4_CUDA_WS_BATCH16=0 / 1 forces either.
    (Apart from the matching tests: the profiler sees no kernels under compute-sanitizer.)"""
    def kernel_of(out_features, batch, in_features=4096):
        layer = _layer(out_features, in_features, torch.bfloat16)
        args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
        x = torch.randn(batch, in_features, device="cuda", dtype=torch.bfloat16)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            ops.linear_4bit_prepared(x, args, layer.bias, kernel="gemm")
            torch.cuda.synchronize()
        names = " ".join(event.key for event in profile.key_averages())
        ws, stream = "gemm_wgmma_ws_kernel" in names, "gemm_stream" in names
        assert ws != stream, names
        return "ws" if ws else "stream"

    assert [kernel_of(14336, b) for b in (8, 9, 16)] == ["stream", "ws", "ws"]
    assert kernel_of(11008, 16) == "stream"
    assert [kernel_of(n, 12) for n in (3584, 4096)] == ["ws", "ws"]
    assert kernel_of(4096, 12, in_features=8192) == "stream"
    assert kernel_of(1024, 12) == "stream"  # (below 2^23 weights)
    monkeypatch.setenv("FP4_CUDA_WS_BATCH16", "1")
    assert kernel_of(11008, 16) == "ws"
    monkeypatch.setenv("FP4_CUDA_WS_BATCH16", "0")
    assert kernel_of(14336, 16) == "stream"


# (out_features, in_features, batch, clusters that fit or None for the GPU's own count, dtype, nested):
# 8 tiles split 4 ways with 7 clusters (the rest: 1 tile on 7 blocks); 2 x 2 tiles of 256 batch rows
# split 4 ways with 3 (the rest: a partial tile of features and of batch rows); the (4096,
# 14336), whose 32 clusters of 4 the H100 does not hold at once.
_CLUSTERS_AND_REST = [(1024, 4096, 64, 7, torch.bfloat16, False), (1024, 4096, 40, 7, torch.float16, True),
                      (200, 4096, 300, 3, torch.bfloat16, False), (4096, 14336, 64, None, torch.bfloat16, False)]


@pytest.mark.skipif(not WGMMA, reason="needs an sm_90 GPU and a library built for sm_90a")
@pytest.mark.parametrize("out_features,in_features,batch,fit,dtype,nested", _CLUSTERS_AND_REST)
def test_warp_specialized_gemm_runs_the_rest_beside_the_clusters(monkeypatch, out_features, in_features, batch, fit,
                                                                 dtype, nested):
    """Where not all of a single wave's clusters fit at once, those that do run beside a kernel for
    the other tiles, which finishes them itself: the last of a tile's blocks adds their slots in
    block order. Every output lands (y poisoned), every call gives the same bits (counters zeroed by
    each call's clusters: calls in a row and CUDA-graph replays), and they are right, close to the
    workspace path's (FP4_CUDA_WS_REST=0). (FP4_CUDA_WS_REST=1: the split also where a block's work
    is below the measured gain, as at batch 33-64 on k = 4096.)"""
    from fp4._torch import dlpack_of, stream_of
    monkeypatch.setenv("FP4_CUDA_WS_REST", "1")
    if fit is not None:
        monkeypatch.setenv("FP4_CUDA_WS_CLUSTERS_FIT", str(fit))
    layer = _layer(out_features, in_features, dtype, double_quant=nested)
    args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
    x = torch.randn(batch, in_features, device="cuda", dtype=dtype)
    workspace = torch.full((_C.gemm_4bit_workspace_size(batch, out_features) // 4,), float("nan"), device="cuda")

    def call(y):
        _C.gemm_prepared(dlpack_of(x), args.prepared, dlpack_of(layer.bias), dlpack_of(y), dlpack_of(workspace),
                         stream_of(x))
        return y

    def poisoned():
        return torch.full((batch, out_features), float("nan"), device="cuda", dtype=dtype)

    first = call(poisoned())
    assert torch.isfinite(first).all()
    for _ in range(5):
        assert torch.equal(call(poisoned()), first)
    ys = [poisoned(), poisoned()]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for y in ys:
            call(y)
    for _ in range(3):
        for y in ys:
            y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(y, first) for y in ys)
    monkeypatch.setenv("FP4_CUDA_WS_REST", "0")
    through_workspace = call(poisoned())
    scale = first.float().abs().max().item()
    assert (through_workspace.float() - first.float()).abs().max().item() <= 1e-2 * scale
    monkeypatch.setenv("FP4_CUDA_WS_REST", "1")
    _check(layer, x, "gemm")


@pytest.mark.skipif(not WGMMA, reason="needs an sm_90 GPU and a library built for sm_90a")
def test_warp_specialized_gemm_rest_kernel_where_clusters_do_not_fit(monkeypatch):
    """The split runs two warp-specialized kernels and neither the zeroing nor the finish kernel,
    where a cluster block's work (k / 4 splits x batch tile) is above 2^16 or FP4_CUDA_WS_REST=1; at
    or below it, with
    FP4_CUDA_WS_REST=0, or where the clusters all fit, one kernel (and the workspace's two where they
    do not). (Test above: kept apart, the profiler sees no kernels under compute-sanitizer.)"""
    layer = _layer(1024, 4096, torch.bfloat16)
    args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)  # (k / 4 x 64 = 2^16)
    wide_x = torch.randn(100, 4096, device="cuda", dtype=torch.bfloat16)  # (k / 4 x 128)

    def launches(x=x):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            ops.linear_4bit_prepared(x, args, layer.bias, kernel="gemm")
            torch.cuda.synchronize()
        counts = {}
        for event in profile.key_averages():
            for name in ("gemm_wgmma_ws_kernel", "zero_sums", "finish_shared_tiles"):
                if name in event.key:
                    counts[name] = counts.get(name, 0) + event.count
        return counts

    through_workspace = {"gemm_wgmma_ws_kernel": 1, "zero_sums": 1, "finish_shared_tiles": 1}
    assert launches() == {"gemm_wgmma_ws_kernel": 1}  # (all 8 clusters fit)
    monkeypatch.setenv("FP4_CUDA_WS_CLUSTERS_FIT", "7")
    assert launches(wide_x) == {"gemm_wgmma_ws_kernel": 2}
    assert launches() == through_workspace
    monkeypatch.setenv("FP4_CUDA_WS_REST", "1")
    assert launches() == {"gemm_wgmma_ws_kernel": 2}
    monkeypatch.setenv("FP4_CUDA_WS_REST", "0")
    assert launches(wide_x) == through_workspace


def test_first_gemm_of_a_process_inside_a_cuda_graph_capture():
    """The first GEMM call of a process decides whether the Hopper kernel runs (on sm_90 with a
    probe launch); made inside a CUDA-graph capture it must neither break the capture nor compute
    anything wrong."""
    code = textwrap.dedent("""
        import torch, fp4
        torch.manual_seed(0)
        linear = torch.nn.Linear(512, 384, device="cuda", dtype=torch.float16)
        layer = fp4.FP4Linear.from_linear(linear, "nf4")
        x = torch.randn(64, 512, device="cuda", dtype=torch.float16)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            y = layer(x)
        graph.replay()
        torch.cuda.synchronize()
        reference = x.float() @ layer.dequantize().float().t() + linear.bias.float()
        error = (y.float() - reference).abs().max().item()
        assert error <= 4e-3 * reference.abs().max().item(), error
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.skipif(not WGMMA, reason="needs an sm_90 GPU and a library built for sm_90a")
def test_wgmma_nested_codes_it_cannot_read_whole_go_elsewhere():
    """Nested codes ride the pipeline as aligned 4-byte words; 125 blocks (not a multiple of 4)
    take the tiled kernel instead, and the dispatch says so."""
    layer = _layer(100, 1280, torch.float16, "nf4", True, 1024)
    args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
    assert args.nested["nested_codes"].numel() == 125 and not ops.wgmma_supports(args)
    x = torch.randn(96, 1280, device="cuda", dtype=torch.float16)
    assert ops.choose_kernel(x, args, 96) == "dequantize_matmul"
    _check(layer, x, "gemm")


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes_every_kernel(seed):
    g = torch.Generator().manual_seed(seed)
    out_features = int(torch.randint(1, 40, (1,), generator=g)) * 16
    in_features = int(torch.randint(1, 40, (1,), generator=g)) * 128
    batch = int(torch.randint(1, 100, (1,), generator=g))
    dtype = (torch.float16, torch.bfloat16)[seed % 2]
    layer = _layer(out_features, in_features, dtype, ("fp4", "nf4")[seed % 2], bool(seed % 3))
    x = torch.randn(batch, in_features, device="cuda", dtype=dtype)
    for kernel in ops.KERNELS:  # (the GEMV past its batch: one launch per GEMV_KERNEL_MAX_BATCH rows)
        _check(layer, x, kernel)


def test_gemm_large_k_and_split_k():
    """Long rows (many k chunks split across blocks) and a batch spanning two 64-row tiles."""
    layer = _layer(256, 8192, torch.float16)
    for batch in (2, 96):
        _check(layer, torch.randn(batch, 8192, device="cuda", dtype=torch.float16), "gemm")


@pytest.mark.parametrize("in_features", [1152, 1280])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("batch", [3, 12])
def test_gemm_stream_ranges_cross_tiles(monkeypatch, batch, double_quant, in_features):
    """Batch <= 16 walks (feature tile, k) ranges per block: 33 tiles x 5 stages over fewer blocks,
    so ranges start and end inside tiles and flush partial sums. k = 1152 ends each row with a
    one-chunk stage (scales loaded to registers); k = 1280 has whole stages, whose scales travel
    through the shared-memory ring."""
    monkeypatch.setenv("FP4_CUDA_WS_BATCH16", "0")  # (the stream kernel at batch 12 too)
    layer = _layer(8208, in_features, torch.float16, "nf4", double_quant)  # 8208 = 32 tiles + 16 rows
    _check(layer, torch.randn(batch, in_features, device="cuda", dtype=torch.float16), "gemm")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("batch", [1, 5, 9, 16])
@pytest.mark.parametrize("fed,ring", [("1", ""), ("1", "0"), ("0", "")], ids=["fed", "fed-full-ring", "stream"])
def test_gemm_stream_forms_match_reference(monkeypatch, fed, ring, batch, double_quant, dtype):
    """Both forms of the stream kernel at blocksize 64 (scales through the ring): the producer-fed
    one (sm_90a, by default wherever it can run) and the original (every other device), forced by
    FP4_CUDA_STREAM_FED=1 / 0: 8208 features end in a partial tile (192 rows fed, 256 not; at batch
    <= 8 the fed form copies no scales for its rows past 8208), and 1280 columns are 5 whole stages,
    so block ranges start and end inside tiles; the fed form copies the activations into its ring at
    every batch, the original at 9-16. The fed form runs these few units per block on a ring one stage
    short; FP4_CUDA_FED_SHORT=0 forces the full ring of larger weights."""
    if fed == "1" and not WGMMA:
        pytest.skip("the fed form needs an sm_90 GPU and a library built for sm_90a")
    monkeypatch.setenv("FP4_CUDA_STREAM_FED", fed)
    monkeypatch.setenv("FP4_CUDA_FED_SHORT", ring)
    monkeypatch.setenv("FP4_CUDA_WS_BATCH16", "0")  # (the stream kernel at batch 9-16 too)
    layer = _layer(8208, 1280, dtype, "nf4", double_quant)
    _check(layer, torch.randn(batch, 1280, device="cuda", dtype=dtype), "gemm")


@pytest.mark.parametrize("batch", [1, 12])
@pytest.mark.parametrize("fed,ring", [("0", ""), ("1", ""), ("1", "0")], ids=["stream", "fed", "fed-full-ring"])
def test_stream_kernels_store_whole_tiles_and_add_up_split_ones(monkeypatch, fed, ring, batch):
    """With short rows a block's range holds whole tiles (stored straight to y) between split ones
    (stored to the block's slots and added up by the finish kernel): (51216, 512) is 201 tiles of 256
    rows x 2 stages over <= 132 blocks, the last tile 16 rows; the fed form's 192-row tiles split
    differently. The sums are added in a fixed order: every call gives the same bits, and so does
    launching without programmatic dependent launch (FP4_CUDA_PDL=0)."""
    if fed == "1" and not WGMMA:
        pytest.skip("the fed form needs an sm_90 GPU and a library built for sm_90a")
    monkeypatch.setenv("FP4_CUDA_STREAM_FED", fed)
    monkeypatch.setenv("FP4_CUDA_FED_SHORT", ring)
    layer = _layer(51216, 512, torch.bfloat16, "nf4")
    x = torch.randn(batch, 512, device="cuda", dtype=torch.bfloat16)
    _check(layer, x, "gemm")
    args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
    first = ops.linear_4bit_prepared(x, args, layer.bias, kernel="gemm").clone()
    for _ in range(5):
        assert torch.equal(ops.linear_4bit_prepared(x, args, layer.bias, kernel="gemm"), first)
    monkeypatch.setenv("FP4_CUDA_PDL", "0")
    assert torch.equal(ops.linear_4bit_prepared(x, args, layer.bias, kernel="gemm"), first)


def _whole_tiles_first_shapes(tiles_per_block):
    """(out_features, whether a finish kernel runs) for the fed kernel's 192-row tiles at batch <= 8:
    exactly SMs x tiles_per_block tiles (nothing left to share; also with the last tile 100 rows
    short, summed whole by the last block), and SMs x (tiles_per_block + 1) + 1 (each block takes
    tiles_per_block whole and the SMs + 1 tiles after them are shared)."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    evenly = sms * tiles_per_block * 192
    return ((evenly, False), (evenly - 100, False), ((sms * (tiles_per_block + 1) + 1) * 192, True))


@pytest.mark.skipif(not WGMMA, reason="needs an sm_90 GPU and a library built for sm_90a")
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("tiles_per_block", [1, 2])
@pytest.mark.parametrize("ring", ["", "0"], ids=["short-ring", "full-ring"])
def test_fed_stream_gives_each_block_whole_tiles_first(monkeypatch, ring, tiles_per_block, double_quant):
    """At batch <= 8 the fed kernel gives each block whole tiles of its own first (stored straight to
    y) and shares only the tiles after them (their sums added up by the finish kernel): right
    against the reference, and the same bits on every call; on either ring (FP4_CUDA_FED_SHORT)."""
    monkeypatch.setenv("FP4_CUDA_FED_SHORT", ring)
    for out_features, _ in _whole_tiles_first_shapes(tiles_per_block):
        layer = _layer(out_features, 1024, torch.bfloat16, "nf4", double_quant)
        x = torch.randn(5, 1024, device="cuda", dtype=torch.bfloat16)
        _check(layer, x, "gemm")
        args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
        first = ops.linear_4bit_prepared(x, args, layer.bias, kernel="gemm").clone()
        assert torch.equal(ops.linear_4bit_prepared(x, args, layer.bias, kernel="gemm"), first)


@pytest.mark.skipif(not WGMMA, reason="needs an sm_90 GPU and a library built for sm_90a")
def test_fed_stream_finish_where_chosen():
    """The finish kernel runs only where tiles are shared: not where every block's tiles are whole
    (kept apart from the test above: the profiler sees no kernels under compute-sanitizer)."""
    for out_features, finishes in _whole_tiles_first_shapes(1):
        layer = _layer(out_features, 1024, torch.bfloat16, "nf4")
        x = torch.randn(5, 1024, device="cuda", dtype=torch.bfloat16)
        args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
        names = _cuda_kernel_names(lambda: ops.linear_4bit_prepared(x, args, layer.bias, kernel="gemm"))
        assert "gemm_stream_fed_kernel" in names and ("finish_stream_kernel" in names) == finishes, names


@pytest.mark.skipif(not WGMMA, reason="needs an sm_90 GPU and a library built for sm_90a")
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("short_rows", [0, 100])
def test_fed_stream_finish_in_half_size_blocks(short_rows, double_quant):
    """Where the finish kernel's grid needs one to two blocks per SM beside the fed kernel at batch
    <= 8, its blocks are half as wide and each thread sums two tile rows: every row right (y starts
    poisoned), the last tile's rows past n skipped, the same bits on every call."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    tiles, batch = sms * 3 // 4, 2  # (fewer tiles than SMs: all shared; 1.5 finish blocks per SM)
    layer = _layer(tiles * 192 - short_rows, 1024, torch.bfloat16, "nf4", double_quant)
    x = torch.randn(batch, 1024, device="cuda", dtype=torch.bfloat16)
    _check(layer, x, "gemm")
    args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
    first = ops.linear_4bit_prepared(x, args, layer.bias, kernel="gemm").clone()
    assert torch.equal(ops.linear_4bit_prepared(x, args, layer.bias, kernel="gemm"), first)


@pytest.mark.parametrize("batch", [1, 4, 12])
def test_chained_layers_in_a_cuda_graph_wait_for_their_inputs(monkeypatch, batch):
    """Kernels launch as programmatic dependents of the kernel before them (sm_90+) and may start
    before it ends; each must wait for it before reading activations or writing. Here every layer
    reads the output of the one before (sometimes through a torch op, which does not take part),
    replayed as one CUDA graph: the result must equal eager calls launched without dependent launch,
    bit for bit (every kernel here adds in a fixed order)."""
    torch.manual_seed(0)
    layers = [_layer(1024, 1024, torch.float16, "nf4", i % 2 == 1) for i in range(6)]
    layers.append(_layer(4096, 1024, torch.float16))  # the GEMV at batch 1, the stream kernel above
    layers.append(_layer(1024, 4096, torch.float16))

    def run(h):
        for i, layer in enumerate(layers):
            h = layer(h) * 0.125
            if i == 3:
                h = torch.relu(h)
        return h

    x = torch.randn(batch, 1024, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        monkeypatch.setenv("FP4_CUDA_PDL", "0")
        expected = run(x)
        monkeypatch.setenv("FP4_CUDA_PDL", "1")
        run(x)  # warm-up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = run(x)
        for _ in range(3):
            y.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert torch.isfinite(y).all() and torch.equal(y, expected)


def _cuda_kernel_names(run):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        run()
        torch.cuda.synchronize()
    return " ".join(event.key for event in profile.key_averages())


@pytest.mark.skipif(not WGMMA, reason="needs an sm_90 GPU and a library built for sm_90a")
def test_fed_stream_switch_picks_the_kernel(monkeypatch):
    """FP4_CUDA_STREAM_FED=1 / 0 really switch between the two stream kernels (so the tests above
    run what they name); by default blocksize 64 takes the fed one, other blocksizes the original."""
    x = torch.randn(4, 1280, device="cuda", dtype=torch.float16)
    for blocksize, setting, fed in ((64, "1", True), (64, "0", False), (64, "", True), (128, "", False)):
        monkeypatch.setenv("FP4_CUDA_STREAM_FED", setting)
        layer = _layer(528, 1280, torch.float16, blocksize=blocksize)
        args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
        names = _cuda_kernel_names(lambda: ops.linear_4bit_prepared(x, args, kernel="gemm"))
        assert "gemm_stream" in names
        assert ("gemm_stream_fed_kernel" in names) == fed, (blocksize, setting, names)


@pytest.mark.skipif(not WGMMA, reason="needs an sm_90 GPU and a library built for sm_90a")
def test_fed_stream_ring_by_units_per_block(monkeypatch):
    """The fed kernel runs ranges of few units per block (<= 32 at batch <= 8, <= 16 at 9-16) on a
    ring one stage short, longer ones on the full ring (its last template argument);
    FP4_CUDA_FED_SHORT=1 / 0 forces either."""
    monkeypatch.setenv("FP4_CUDA_WS_BATCH16", "0")  # (batch 12 on `few` would take the warp-specialized kernel)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    few = _layer(1536, 8192, torch.bfloat16, bias=False)  # 8 tiles x 32 stages: < 2 units per block
    many = _layer(192 * (-(-17 * sms // 32)), 8192, torch.bfloat16, bias=False)  # 17-18 units per block

    def short_ring(layer, batch):
        args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
        x = torch.randn(batch, 8192, device="cuda", dtype=torch.bfloat16)
        names = _cuda_kernel_names(lambda: ops.linear_4bit_prepared(x, args, kernel="gemm"))
        kernel_args = re.search(r"gemm_stream_fed_kernel<([^>]*)>", names).group(1)
        return kernel_args.replace(" ", "").split(",")[-1] == "true"

    assert short_ring(few, 2) and short_ring(few, 12) and short_ring(many, 2) and not short_ring(many, 12)
    monkeypatch.setenv("FP4_CUDA_FED_SHORT", "0")
    assert not short_ring(few, 2)
    monkeypatch.setenv("FP4_CUDA_FED_SHORT", "1")
    assert short_ring(many, 12)


@pytest.mark.skipif(not WGMMA, reason="needs an sm_90 GPU and a library built for sm_90a")
def test_batch_17_to_64_kernel_choice(monkeypatch):
    """Batch 17-64 takes the warp-specialized kernel wherever it can run (k % 256 == 0), else the
    register-operand kernel; FP4_CUDA_WS_SMALL=0 forces the latter."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    wide = 128 * (sms + 4)  # more 128-feature tiles than SMs: two waves
    for out_features, in_features, setting, warp_specialized in (
            (400, 1280, "", True),
            (wide, 256, "", True),
            (400, 1280, "0", False),
            (400, 1152, "1", False)):  # k % 256 != 0
        monkeypatch.setenv("FP4_CUDA_WS_SMALL", setting)
        layer = _layer(out_features, in_features, torch.bfloat16)
        x = torch.randn(40, in_features, device="cuda", dtype=torch.bfloat16)
        args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
        names = _cuda_kernel_names(lambda: ops.linear_4bit_prepared(x, args, kernel="gemm"))
        assert ("gemm_wgmma_ws_kernel" in names) == warp_specialized, (out_features, in_features, setting, names)
        assert ("gemm_wgmma_kernel" in names) != warp_specialized, (out_features, in_features, setting, names)
        _check(layer, x, "gemm")


# (batch, waves, extra feature tiles, in_features, format, nested, blocksize): feature tiles =
# waves x SMs / batch tiles + extra (waves 0: 4 feature tiles). The batch tiles of 256 rows (one
# 64-column slice per stage, scales in groups of four slices, so shared runs of stage pairs begin
# inside a group), 256 rows with nested statistics and a last feature tile of 16 rows, 64 and 128
# rows (two slices per stage), a single wave, and three waves but for 4 tiles (too little idle to
# pay for sharing).
_SHARED_WAVES = [(1024, 1, 4, 4096, "nf4", False, 64), (300, 1, 4, 1280, "fp4", True, 64),
                 (64, 1, 8, 512, "nf4", False, 64), (100, 1, 3, 768, "nf4", False, 128),
                 (130, 0, 4, 1280, "fp4", False, 64), (1024, 3, -1, 1024, "nf4", False, 64)]


def _shares_by_default(batch_rows, batch_tiles, feature_tiles, in_features, sms):
    """ws_work's rule (gemm_wgmma_ws.cu): past one wave, share the last one where idle tiles x k >=
    5 x (shared tiles + shared blocks) x batch tile rows."""
    tiles = batch_tiles * feature_tiles
    if tiles <= sms or tiles % sms == 0:
        return False
    stage_k = 64 if batch_rows == 256 else 128
    first = tiles // sms * sms // batch_tiles * batch_tiles
    idle = -(-tiles // sms) * sms - tiles
    slots = tiles - first + min(sms, (tiles - first) * (in_features // stage_k) // 2)
    return idle * in_features >= 5 * slots * batch_rows


def _shared_wave_case(batch, waves, extra_tiles, in_features, quant_type, double_quant, blocksize):
    """The layer, activations and tiling of a _SHARED_WAVES case."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    batch_rows = 256 if batch > 128 else 128 if batch > 64 else 64
    batch_tiles = -(-batch // batch_rows)
    feature_tiles = waves * sms // batch_tiles + extra_tiles if waves else 4
    out_features = 128 * feature_tiles - (112 if double_quant else 0)  # (nested: a last tile of 16 rows)
    layer = _layer(out_features, in_features, torch.bfloat16, quant_type, double_quant, blocksize)
    x = torch.randn(batch, in_features, device="cuda", dtype=torch.bfloat16)
    default = _shares_by_default(batch_rows, batch_tiles, feature_tiles, in_features, sms)
    return layer, x, default


@pytest.mark.skipif(not WGMMA, reason="needs an sm_90 GPU and a library built for sm_90a")
@pytest.mark.parametrize("share", ["", "1", "0"], ids=["default", "shared", "whole"])
@pytest.mark.parametrize("case", _SHARED_WAVES, ids=lambda c: f"b{c[0]}-w{c[1]}{c[2]:+d}-k{c[3]}")
def test_warp_specialized_gemm_shares_the_last_wave(monkeypatch, share, case):
    """A few more tiles than SMs would leave most SMs idle in a second wave: where that pays (and
    forced by FP4_CUDA_WS_SHARE=1) whole feature tiles of that wave are shared by all SMs in runs of
    stage pairs that cross tiles, their sums stored in workspace slots and added up by
    finish_shared_tiles; =0 keeps whole tiles; =1 shares a single partial wave too (sums added
    atomically). Every output lands (y poisoned first). (No profiler here: the sanitizers run it.)"""
    monkeypatch.setenv("FP4_CUDA_WS_SHARE", share)
    layer, x, _ = _shared_wave_case(*case)
    _check(layer, x, "gemm")


@pytest.mark.skipif(not WGMMA, reason="needs an sm_90 GPU and a library built for sm_90a")
@pytest.mark.parametrize("share", ["", "1", "0"], ids=["default", "shared", "whole"])
def test_last_wave_sharing_choice(monkeypatch, share):
    """The cases above run what they name: finish_shared_tiles runs where FP4_CUDA_WS_SHARE=1, or
    unset where ws_work's rule (_shares_by_default) says sharing pays, which it does for the cases
    of one wave and a few tiles and not for three waves but for 4 tiles."""
    monkeypatch.setenv("FP4_CUDA_WS_SHARE", share)
    for case in _SHARED_WAVES:
        layer, x, default = _shared_wave_case(*case)
        waves, extra_tiles = case[1], case[2]
        if waves == 1:
            assert default, case
        if (waves, extra_tiles) == (3, -1):
            assert not default, case
        args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
        names = _cuda_kernel_names(lambda: ops.linear_4bit_prepared(x, args, layer.bias, kernel="gemm"))
        assert "gemm_wgmma_ws_kernel" in names, (case, names)
        assert ("finish_shared_tiles" in names) == (share == "1" or (share == "" and default)), (case, names)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("batch", [1, 5, 9, 16])
def test_small_batches_without_room_for_the_stream_kernel(monkeypatch, batch, double_quant):
    """Devices whose blocks cannot hold the stream kernel's ~200 KB of shared memory (sm_80, 86, 89)
    give batch <= 16 to the tiled kernel; FP4_CUDA_STREAM=0 takes that path on any device."""
    monkeypatch.setenv("FP4_CUDA_STREAM", "0")
    layer = _layer(400, 640, torch.bfloat16, "nf4", double_quant)
    _check(layer, torch.randn(batch, 640, device="cuda", dtype=torch.bfloat16), "gemm")


def _nested_args(layer, nested_blocksize):
    """The layer's fp32 block scales re-quantized to 8-bit codes in groups of nested_blocksize,
    and the fp32 scales those codes decode to (bitsandbytes' order: code * group absmax + mean)."""
    args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
    absmax = args.scales
    offset = absmax.mean()
    centered = absmax - offset
    groups = -(-absmax.numel() // nested_blocksize)
    padded = torch.zeros(groups * nested_blocksize, device="cuda")
    padded[: absmax.numel()] = centered.abs()
    group_absmax = padded.view(groups, nested_blocksize).amax(1).clamp_min(1e-12)
    nested_code = fp4.FP4Linear.from_linear(nn.Linear(64, 64), "nf4", 64, True).quant_state.state2.code.cuda()
    group_of = torch.arange(absmax.numel(), device="cuda") // nested_blocksize
    normalized = centered / group_absmax[group_of]
    codes = (normalized[:, None] - nested_code[None, :]).abs().argmin(1).to(torch.uint8)
    decoded = nested_code[codes.long()] * group_absmax[group_of] + offset
    nested = ops.KernelArgs(args.codes, codes, "nf4", 64, (layer.out_features, layer.in_features),
                            nested_absmax=group_absmax, nested_code=nested_code,
                            nested_offset=offset.reshape(1), nested_blocksize=nested_blocksize)
    return nested, decoded


@pytest.mark.parametrize("nested_blocksize", [256, 100, 6, 7])
def test_gemm_stream_nested_group_sizes(nested_blocksize):
    """Nested groups of any size, also ones that are not powers of two (division instead of a
    shift) and ones a stage's 4 blocks can straddle (6, 7: scales loaded to registers)."""
    layer = _layer(528, 1280, torch.float16, "nf4", False)
    args, scales = _nested_args(layer, nested_blocksize)
    weight = torch.empty(528, 1280, device="cuda")
    fp4.functional.dequantize_4bit(layer.weight, absmax=scales, out=weight, blocksize=64, quant_type="nf4")
    for batch in (1, 5, 16):
        x = torch.randn(batch, 1280, device="cuda", dtype=torch.float16)
        y = ops.linear_4bit_prepared(x, args, layer.bias, kernel="gemm")
        reference = x.float() @ weight.to(torch.float16).float().t() + layer.bias.float()
        assert (y.float() - reference).abs().max().item() <= 4e-3 * reference.abs().max().item()


def test_gemm_unaligned_absmax_takes_the_unpaired_path():
    """Blocksize 64 loads a row's scales several at once where aligned (the stream kernels two as an
    8-byte pair at batch 2, the warp-specialized one four as a 16-byte copy at 40 and 100); an
    absmax view off that alignment must still give the right answer."""
    layer = _layer(384, 512, torch.bfloat16)
    args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
    storage = torch.empty(args.scales.numel() + 1, device="cuda", dtype=torch.float32)
    storage[1:] = args.scales
    shifted = ops.KernelArgs(args.codes, storage[1:], "nf4", 64, (384, 512))
    assert shifted.scales.data_ptr() % 8 == 4
    for batch in (2, 40, 100):
        x = torch.randn(batch, 512, device="cuda", dtype=torch.bfloat16)
        y = ops.linear_4bit_prepared(x, shifted, kernel="gemm")
        reference = x.float() @ layer.dequantize().float().t()
        assert (y.float() - reference).abs().max().item() <= 2e-2 * reference.abs().max().item()


def test_gemm_rejects_what_it_cannot_serve():
    layer = _layer(64, 192, torch.float16)  # in_features % 128 != 0
    args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
    x = torch.randn(16, 192, device="cuda", dtype=torch.float16)
    y = torch.empty(16, 64, device="cuda", dtype=torch.float16)
    ws = torch.empty(_C.gemm_4bit_workspace_size(16, 64), dtype=torch.uint8, device="cuda")
    with pytest.raises(Exception, match="in_features % 128"):
        _C.gemm_4bit(x, args.codes, args.scales, None, y, ws, "nf4", 64, 0)
    assert not ops.gemm_supports(x, args)
    layer = _layer(64, 128, torch.float16)
    args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
    x = torch.randn(16, 128, device="cuda", dtype=torch.float16)
    with pytest.raises(Exception, match="workspace_bytes"):
        _C.gemm_4bit(x, args.codes, args.scales, None, y, ws[:10], "nf4", 64, 0)
    with pytest.raises(Exception, match="float16 or bfloat16"):
        _C.gemm_4bit(x.float(), args.codes, args.scales, None, y.float(), ws, "nf4", 64, 0)
    # The layer itself still serves these through the other kernels.
    assert torch.isfinite(layer(x.float())).all()


@pytest.mark.parametrize("out_features,in_features,quant_type,double_quant,blocksize", [
    (1003, 2048, "nf4", False, 64),    # a whole row per round trip; the last warp's second row past n
    (517, 4096, "fp4", True, 128),     # several round trips per row, nested statistics
    (300, 6144, "nf4", False, 4096),
    (777, 1000, "nf4", True, 64),      # blocks straddle rows; a tail of single loads
], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 2, 5, 8])
def test_gemv_two_rows_per_warp(monkeypatch, out_features, in_features, quant_type, double_quant, blocksize, batch,
                                dtype):
    """The GEMV with two weight rows per warp against one load of the activations (fp32's default;
    bf16 forced by FP4_CUDA_GEMV_ROWS=2). Every row lands (y poisoned first), none past n is written
    (memcheck)."""
    monkeypatch.setenv("FP4_CUDA_GEMV_ROWS", "2")
    layer = _layer(out_features, in_features, dtype, quant_type, double_quant, blocksize)
    x = torch.randn(batch, in_features, device="cuda", dtype=dtype)
    args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
    _check(layer, x, "gemv")
    reference = x.double() @ layer.dequantize().to(dtype).double().t() + layer.bias.double()
    y = ops.linear_4bit_prepared(x, args, layer.bias, kernel="gemv").double()
    assert ((y - reference).norm() / reference.norm()).item() < (1e-5 if dtype == torch.float32 else 4e-3)


def test_gemv_rows_per_warp_by_dtype_batch_and_switch(monkeypatch):
    """fp32 takes two rows per warp at every batch, the half-precision dtypes one; FP4_CUDA_GEMV_ROWS
    overrides it (so the test above runs what it names). (The profiler is apart: it cannot run under
    compute-sanitizer.)"""
    for dtype, batch, setting, rows in ((torch.float32, 1, "", 2), (torch.float32, 2, "", 2), (torch.float32, 7, "", 2),
                                        (torch.bfloat16, 1, "", 1), (torch.float16, 2, "", 1),
                                        (torch.float32, 1, "1", 1), (torch.bfloat16, 2, "2", 2),
                                        (torch.float32, 5, "2", 2), (torch.bfloat16, 8, "1", 1)):
        monkeypatch.setenv("FP4_CUDA_GEMV_ROWS", setting)
        layer = _layer(96, 512, dtype)
        args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
        x = torch.randn(batch, 512, device="cuda", dtype=dtype)
        names = _cuda_kernel_names(lambda: ops.linear_4bit_prepared(x, args, kernel="gemv"))
        assert "gemv_kernel<" in names and f", {batch}, {rows}>" in names, (dtype, batch, setting, names)


@pytest.mark.parametrize("out_features,in_features,quant_type,double_quant,blocksize", [
    (1003, 4096, "nf4", False, 64),   # a whole row per round trip
    (517, 6144, "fp4", True, 128),    # several round trips per row, nested statistics
    (300, 8192, "nf4", False, 4096),
    (777, 1000, "nf4", True, 64),     # blocks straddle rows; a tail of single loads
    (9001, 256, "fp4", False, 32),    # more rows than resident warps: each warp walks several
], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gemv_pair_table(monkeypatch, out_features, in_features, quant_type, double_quant, blocksize, dtype):
    """The batch-1 GEMV that looks a byte's two codes up at once in a pair table (fp16 / bf16 weights of
    >= 2^24 values by default; forced here by FP4_CUDA_GEMV_PAIRS=1). Every row lands (y poisoned
    first), none past n is written (memcheck), and the sums match an fp64 reference."""
    monkeypatch.setenv("FP4_CUDA_GEMV_PAIRS", "1")
    layer = _layer(out_features, in_features, dtype, quant_type, double_quant, blocksize)
    x = torch.randn(1, in_features, device="cuda", dtype=dtype)
    _check(layer, x, "gemv")
    args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
    reference = x.double() @ layer.dequantize().to(dtype).double().t() + layer.bias.double()
    y = ops.linear_4bit_prepared(x, args, layer.bias, kernel="gemv").double()
    assert ((y - reference).norm() / reference.norm()).item() < 4e-3


def test_gemv_pair_table_where_chosen(monkeypatch):
    """Batch 1 in fp16 / bf16 on weights of >= 2^24 values takes the pair-table GEMV; smaller weights,
    fp32, batch 2 and FP4_CUDA_GEMV_PAIRS=0 or FP4_CUDA_GEMV_ROWS take the row kernel, and
    FP4_CUDA_GEMV_PAIRS=1 the pair table on any weight (so the test above runs what it names)."""
    for out_features, in_features, dtype, batch, pairs, rows, expected in (
            (4096, 4096, torch.bfloat16, 1, "", "", "gemv_pair_kernel"),
            (4096, 4096, torch.float16, 1, "", "", "gemv_pair_kernel"),
            (2048, 4096, torch.bfloat16, 1, "", "", "gemv_kernel<"),
            (4096, 4096, torch.float32, 1, "", "", "gemv_kernel<"),
            (4096, 4096, torch.bfloat16, 2, "", "", "gemv_kernel<"),
            (4096, 4096, torch.bfloat16, 1, "0", "", "gemv_kernel<"),
            (4096, 4096, torch.bfloat16, 1, "", "1", "gemv_kernel<"),
            (96, 512, torch.float16, 1, "1", "", "gemv_pair_kernel")):
        monkeypatch.setenv("FP4_CUDA_GEMV_PAIRS", pairs)
        monkeypatch.setenv("FP4_CUDA_GEMV_ROWS", rows)
        layer = _layer(out_features, in_features, dtype)
        args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
        x = torch.randn(batch, in_features, device="cuda", dtype=dtype)
        names = _cuda_kernel_names(lambda: ops.linear_4bit_prepared(x, args, kernel="gemv"))
        assert expected in names and not ("gemv_kernel<" in names and "gemv_pair_kernel" in names), (
            out_features, in_features, dtype, batch, pairs, rows, names)


@pytest.mark.parametrize("batch", [9, 13, 16])
def test_float32_gemv_past_one_launch(batch):
    """fp32 activations have no GEMM: batches past one GEMV launch run it once per
    GEMV_KERNEL_MAX_BATCH rows, each launch's rows landing in their own place of y (poisoned first)."""
    layer = _layer(384, 1024, torch.float32, double_quant=True)
    x = torch.randn(batch, 1024, device="cuda")
    assert ops.choose_kernel(x, ops.KernelArgs.of_state(layer.weight, layer.quant_state), batch) == "gemv"
    _check(layer, x, "gemv")
    reference = x.double() @ layer.dequantize().double().t() + layer.bias.double()
    assert ((layer(x).double() - reference).norm() / reference.norm()).item() < 1e-5


def test_dispatch_thresholds():
    layer = _layer(128, 256, torch.float16)
    args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
    x = torch.randn(1, 256, device="cuda", dtype=torch.float16)
    assert ops.choose_kernel(x, args, 1) == "gemv"
    assert ops.choose_kernel(x, args, ops.CUDA_GEMV_MAX_BATCH + 1) == "gemm"
    # Past 64 rows only the Hopper kernel beats dequantize + cuBLAS (in_features % 256 == 0).
    assert ops.choose_kernel(x, args, ops.CUDA_GEMM_MAX_BATCH + 1) == ("gemm" if WGMMA else "dequantize_matmul")
    assert ops.choose_kernel(x, args, ops.CUDA_WGMMA_MAX_BATCH) == ("gemm" if WGMMA else "dequantize_matmul")
    assert ops.choose_kernel(x, args, ops.CUDA_WGMMA_MAX_BATCH + 1) == "dequantize_matmul"
    odd = ops.KernelArgs(args.codes, args.scales, "nf4", 64, (128, 384))
    assert ops.choose_kernel(x, odd, ops.CUDA_GEMM_MAX_BATCH + 1) == "dequantize_matmul"
    assert ops.choose_kernel(x.float(), args, 5) == "gemv"  # float32: no tensor-core path
    assert ops.choose_kernel(x.float(), args, ops.GEMV_CHUNKED_MAX_BATCH) == "gemv"  # (one launch per 8 rows)
    assert ops.choose_kernel(x.float(), args, ops.GEMV_CHUNKED_MAX_BATCH + 1) == "dequantize_matmul"
    # Large weights take the GEMM from batch 1 (its fixed cost is small next to the weight read).
    def kernel_for(shape, m):
        return ops.choose_kernel(x, ops.KernelArgs(args.codes, args.scales, "nf4", 64, shape), m)
    for m, limit in ops.CUDA_GEMV_MAX_WEIGHTS.items():
        assert kernel_for((limit // 256, 256), m) == "gemv"
        assert kernel_for((limit // 128, 256), m) == "gemm"
    # Rows long next to their count (a warp per row being too few for the GEMV) leave it sooner: 1024
    # rows of 4 x 1024 values or more, against 2048 / 1280 rows just under 4x as long (weights past
    # the long-row limit, within the general one).
    ratio = ops.CUDA_GEMV_LONG_ROWS
    for m, limit in ops.CUDA_GEMV_LONG_ROWS_MAX_WEIGHTS.items():
        assert limit < ops.CUDA_GEMV_MAX_WEIGHTS[m] and limit // 1024 >= ratio * 1024
        assert kernel_for((1024, limit // 1024), m) == "gemv", m
        assert kernel_for((1024, 2 * limit // 1024), m) == "gemm", m
        rows = {1: 2048, 2: 1280}[m]
        shape = (rows, ratio * rows - 128)
        assert limit < shape[0] * shape[1] <= ops.CUDA_GEMV_MAX_WEIGHTS[m], shape
        assert kernel_for(shape, m) == "gemv", m
