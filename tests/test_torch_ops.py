"""torch.ops.fp4.*: schemas and fake kernels (opcheck), torch.compile without graph breaks (dynamic
batch too), CUDA graphs, and the same outputs as eager."""

import pytest
import torch
from torch import nn

import fp4
import fp4.library  # noqa: F401

from conftest import HAS_CUDA


def _model(device, dtype=torch.float32, double_quant=True):
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 64, bias=False), nn.ReLU(),
                          nn.Linear(64, 32)).to(device, dtype)
    fp4.quantize_(model, fp4.FP4Config("nf4", 64, double_quant=double_quant), progress=False)
    return model


def _layer_args(layer):
    return (layer.weight, layer.absmax, layer.bias, layer.quant_type, layer.blocksize, layer.out_features,
            layer.nested_absmax, layer.nested_code, layer.nested_offset, layer.nested_blocksize)


@pytest.mark.parametrize("double_quant", [False, True])
def test_opcheck_linear_and_dequantize(device, double_quant):
    """torch.library.opcheck: schema (no hidden mutation/aliasing), fake kernel vs real, autograd
    registration, AOT dispatch with dynamic shapes."""
    layer = _model(device, double_quant=double_quant)[0]
    x = torch.randn(3, 128, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fp4.linear_4bit.default, (x,) + _layer_args(layer))
    grad = torch.randn(3, 256, device=device)
    args = _layer_args(layer)
    torch.library.opcheck(torch.ops.fp4.linear_4bit_grad_input.default,
                          (grad, args[0], args[1], args[3], args[4], 128) + args[6:])
    torch.library.opcheck(torch.ops.fp4.dequantize_4bit.default,
                          (args[0], args[1], args[3], args[4], [256, 128], torch.float16) + args[6:])


def test_fullgraph_compile_has_no_graph_break():
    model = _model("cpu")
    explanation = torch._dynamo.explain(model)(torch.randn(4, 128))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_compile_with_dynamic_batch_matches_eager(device):
    torch._dynamo.reset()
    model = _model(device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    from torch._dynamo.utils import counters

    counters.clear()
    with torch.no_grad():
        for batch in (3, 5, 9, 17, 33):
            x = torch.randn(batch, 128, device=device)
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    # One graph for the first shape, one with a symbolic batch for the rest: no recompile per size.
    assert counters["stats"]["unique_graphs"] <= 2
    assert not counters["graph_break"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_forward_and_backward_match_eager(device, dtype):
    torch._dynamo.reset()
    model = _model(device, dtype)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(6, 128, device=device, dtype=dtype, requires_grad=True)
    x_eager = x.detach().clone().requires_grad_()
    y, y_eager = compiled(x), model(x_eager)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, y_eager, rtol=tol, atol=tol)
    y.square().sum().backward()
    y_eager.square().sum().backward()
    torch.testing.assert_close(x.grad, x_eager.grad, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("batch", [1, 8, 32])
def test_manual_cuda_graph_capture_replays_new_inputs(batch):
    model = _model("cuda", torch.float16)
    static_x = torch.randn(batch, 128, device="cuda", dtype=torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():  # warm-up on a side stream, as torch recommends
        for _ in range(2):
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_y = model(static_x)
    for _ in range(3):
        x = torch.randn_like(static_x)
        static_x.copy_(x)
        graph.replay()
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(static_y, expected, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_reduce_overhead_mode_matches_eager():
    torch._dynamo.reset()
    model = _model("cuda", torch.float16)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(4):  # the CUDA graph is recorded after warm-up runs
            x = torch.randn(4, 128, device="cuda", dtype=torch.float16)
            torch.testing.assert_close(compiled(x).clone(), model(x), rtol=1e-3, atol=1e-3)
