"""fp4's torch operators, `torch.ops.fp4.*`: what torch.compile, CUDA graphs and autograd see.

    fp4::linear_4bit(x, weight, absmax, bias, quant_type, blocksize, out_features, nested...) -> y
    fp4::linear_4bit_grad_input(grad_out, weight, absmax, quant_type, blocksize, in_features, nested...) -> dx
    fp4::dequantize_4bit(weight, absmax, quant_type, blocksize, shape, dtype, nested...) -> W

The tensors are the bitsandbytes ones (an FP4Linear's buffers): `weight` the packed codes,
`absmax` float32 scales or, with nested statistics, their uint8 codes with `nested_absmax`,
`nested_code` and `nested_offset` beside them. Every op is functional (no argument is mutated or
aliased), has a fake implementation for tracing with symbolic shapes, and launches on the current
CUDA stream. linear_4bit is differentiable in x and bias; the 4-bit weight is frozen.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import ops

_NESTED_SCHEMA = "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? nested_offset=None, " \
                 "int nested_blocksize=256"

_lib = torch.library.Library("fp4", "DEF")
_lib.define("linear_4bit(Tensor x, Tensor weight, Tensor absmax, Tensor? bias, str quant_type, int blocksize, "
            f"SymInt out_features, {_NESTED_SCHEMA}) -> Tensor")
_lib.define("linear_4bit_grad_input(Tensor grad_out, Tensor weight, Tensor absmax, str quant_type, int blocksize, "
            f"SymInt in_features, {_NESTED_SCHEMA}) -> Tensor")
_lib.define("dequantize_4bit(Tensor weight, Tensor absmax, str quant_type, int blocksize, SymInt[] shape, "
            f"ScalarType dtype, {_NESTED_SCHEMA}) -> Tensor")


def _args(weight, absmax, quant_type, blocksize, shape, nested_absmax, nested_code, nested_offset, nested_blocksize):
    return ops.KernelArgs(weight, absmax, quant_type, blocksize, shape, nested_absmax, nested_code, nested_offset,
                          nested_blocksize)


def _linear_4bit(x, weight, absmax, bias, quant_type, blocksize, out_features, nested_absmax=None, nested_code=None,
                 nested_offset=None, nested_blocksize=256):
    args = _args(weight, absmax, quant_type, blocksize, (out_features, x.shape[-1]), nested_absmax, nested_code,
                 nested_offset, nested_blocksize)
    return ops.linear_4bit_prepared(x, args, bias)


def _linear_4bit_grad_input(grad_out, weight, absmax, quant_type, blocksize, in_features, nested_absmax=None,
                            nested_code=None, nested_offset=None, nested_blocksize=256):
    args = _args(weight, absmax, quant_type, blocksize, (grad_out.shape[-1], in_features), nested_absmax, nested_code,
                 nested_offset, nested_blocksize)
    return ops.linear_4bit_grad_input(grad_out, args)


def _dequantize_4bit(weight, absmax, quant_type, blocksize, shape, dtype, nested_absmax=None, nested_code=None,
                     nested_offset=None, nested_blocksize=256):
    args = _args(weight, absmax, quant_type, blocksize, shape, nested_absmax, nested_code, nested_offset,
                 nested_blocksize)
    return ops.dequantize_prepared(args, dtype)


for _name, _kernel in (("linear_4bit", _linear_4bit), ("linear_4bit_grad_input", _linear_4bit_grad_input),
                       ("dequantize_4bit", _dequantize_4bit)):
    for _key in ("CPU", "CUDA"):
        _lib.impl(_name, _kernel, _key)


# ---- fake implementations: output metadata only, for torch.compile / export with symbolic shapes ----
@torch.library.register_fake("fp4::linear_4bit", lib=_lib)
def _(x, weight, absmax, bias, quant_type, blocksize, out_features, nested_absmax=None, nested_code=None,
      nested_offset=None, nested_blocksize=256):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.register_fake("fp4::linear_4bit_grad_input", lib=_lib)
def _(grad_out, weight, absmax, quant_type, blocksize, in_features, nested_absmax=None, nested_code=None,
      nested_offset=None, nested_blocksize=256):
    return grad_out.new_empty(*grad_out.shape[:-1], in_features)


@torch.library.register_fake("fp4::dequantize_4bit", lib=_lib)
def _(weight, absmax, quant_type, blocksize, shape, dtype, nested_absmax=None, nested_code=None, nested_offset=None,
      nested_blocksize=256):
    return weight.new_empty(*shape, dtype=dtype)


# ---- autograd: the 4-bit weight and its statistics are frozen; x and bias get gradients --------
def _setup_context(ctx, inputs, output):
    x, weight, absmax, bias, quant_type, blocksize, out_features, *nested = inputs
    nested_absmax, nested_code, nested_offset, nested_blocksize = (nested + [None, None, None, 256])[:4]
    ctx.in_features = x.shape[-1]
    ctx.options = (quant_type, blocksize, nested_blocksize)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(weight, absmax, nested_absmax, nested_code, nested_offset)


def _backward(ctx, grad_out):
    weight, absmax, nested_absmax, nested_code, nested_offset = ctx.saved_tensors
    quant_type, blocksize, nested_blocksize = ctx.options
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.fp4.linear_4bit_grad_input(grad_out, weight, absmax, quant_type, blocksize,
                                                      ctx.in_features, nested_absmax, nested_code, nested_offset,
                                                      nested_blocksize)
    if ctx.needs_input_grad[3]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_bias, None, None, None, None, None, None, None


torch.library.register_autograd("fp4::linear_4bit", _backward, setup_context=_setup_context, lib=_lib)


def linear_4bit(x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor, bias: Optional[torch.Tensor],
                quant_type: str, blocksize: int, out_features: int, nested_absmax: Optional[torch.Tensor] = None,
                nested_code: Optional[torch.Tensor] = None, nested_offset: Optional[torch.Tensor] = None,
                nested_blocksize: int = 256) -> torch.Tensor:
    """torch.ops.fp4.linear_4bit: y = x @ W.T + bias, differentiable in x and bias."""
    return torch.ops.fp4.linear_4bit(x, weight, absmax, bias, quant_type, blocksize, out_features, nested_absmax,
                                     nested_code, nested_offset, nested_blocksize)


def dequantize_4bit(weight: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int, shape: Sequence[int],
                    dtype: torch.dtype, nested_absmax: Optional[torch.Tensor] = None,
                    nested_code: Optional[torch.Tensor] = None, nested_offset: Optional[torch.Tensor] = None,
                    nested_blocksize: int = 256) -> torch.Tensor:
    """torch.ops.fp4.dequantize_4bit: the dense weight of `shape` in `dtype`."""
    return torch.ops.fp4.dequantize_4bit(weight, absmax, quant_type, blocksize, list(shape), dtype, nested_absmax,
                                         nested_code, nested_offset, nested_blocksize)
