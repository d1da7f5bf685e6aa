"""FP4Linear: a linear layer whose weight is stored in 4 bits (bitsandbytes layout) and never
expanded in memory: the packed codes and the absmax are all it holds."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import checkpoint_format
from .. import functional as F
from .. import library  # noqa: F401  (registers torch.ops.fp4.*)
from .._torch import FLOAT_DTYPES, check_blocksize, check_quant_type
from ..ops import KernelArgs, linear_4bit_prepared
from ..quant_state import QuantState

# Buffers holding the quantized weight: moved between devices, never cast to another dtype.
_QUANT_BUFFERS = ("weight", "absmax", "nested_absmax", "nested_code", "nested_offset", "code")


class FP4Linear(nn.Module):
    """y = x W^T + b with W held as 4-bit codes (FP4 or NF4) and per-block absmax.

    Build one with `FP4Linear.from_linear(nn.Linear)` (quantizes on the layer's device) or
    `FP4Linear.from_bnb(bnb.nn.Linear4bit)` (reuses the packed bytes and state as they are), or as
    `TorchFP4Linear(layer)` like torch-bnb-fp4. Forward takes float32, float16 or bfloat16 input with
    any leading dimensions (batch 0 included) and returns the input's dtype.

    use_codebook_dequant: accepted for torch-bnb-fp4 compatibility. fp4's kernels always decode
    through the 16-entry codebook; both choices give identical results.

    The 4-bit weight is frozen; gradients flow to the input (and to the bias once
    `layer.bias.requires_grad_()`), which is what QLoRA-style adapters need. `state_dict()` holds
    bitsandbytes' own keys (`weight`, `weight.absmax`, `weight.quant_map`, `weight.nested_*`,
    `weight.quant_state.bitsandbytes__<fp4|nf4>`), so checkpoints load into and from
    bitsandbytes' Linear4bit and Hugging Face bnb models; loading never needs bitsandbytes.
    """

    def __init__(self, layer: Optional[nn.Module] = None, use_codebook_dequant: bool = True, *,
                 packed: Optional[torch.Tensor] = None, state: Optional[QuantState] = None,
                 bias: Optional[torch.Tensor] = None):
        super().__init__()
        if layer is not None:
            # torch-bnb-fp4's constructor: TorchFP4Linear(bnb_linear4bit_or_nn_linear)
            source = FP4Linear.from_bnb(layer) if _is_bnb_linear4bit(layer) else FP4Linear.from_linear(layer)
            packed, state, bias = source.weight, source.quant_state, source.bias
        if packed is None or state is None:
            raise ValueError("FP4Linear: give a layer, or packed and state")
        self.use_codebook_dequant = bool(use_codebook_dequant)
        self.out_features, self.in_features = (int(d) for d in state.shape)
        self.quant_type = check_quant_type(state.quant_type)
        self.blocksize = check_blocksize(int(state.blocksize))
        _check_quantized(packed, state, bias)
        self._set_quantized(packed, state)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def _set_quantized(self, packed: torch.Tensor, state: QuantState) -> None:
        # Only `weight` is a persistent buffer: the state-dict entries of the others are written in
        # bitsandbytes' key names by _save_to_state_dict.
        nested = state.nested
        self.register_buffer("weight", packed.detach())
        self.register_buffer("absmax", state.absmax.detach(), persistent=False)
        self.register_buffer("nested_absmax", state.state2.absmax.detach() if nested else None, persistent=False)
        self.register_buffer("nested_code", state.state2.code.detach() if nested else None, persistent=False)
        self.register_buffer("nested_offset", state.offset.detach().reshape(()) if nested else None,
                             persistent=False)
        self.register_buffer("code", state.code.detach() if state.code is not None else
                             F.get_4bit_type(self.quant_type, packed.device), persistent=False)
        self.quant_type = state.quant_type
        self.blocksize = int(state.blocksize)
        self.weight_dtype = state.dtype
        self.nested_blocksize = int(state.state2.blocksize) if nested else 256
        self._kernel_args = None  # built on first forward; dropped whenever buffers move

    # ---- constructors -----------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "fp4", blocksize: int = 64,
                    double_quant: bool = False) -> "FP4Linear":
        """Quantizes an nn.Linear's weight (on its device) into a new FP4Linear."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        if weight.dtype not in FLOAT_DTYPES:
            weight = weight.float()
        packed, state = F.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant,
                                        quant_type=quant_type)
        return cls(packed=packed, state=state, bias=linear.bias)

    @classmethod
    def from_bnb(cls, layer) -> "FP4Linear":
        """Wraps a bitsandbytes Linear4bit / LinearFP4 / LinearNF4 whose weight is quantized: the
        packed bytes and QuantState are reused as they are (no requantization, no fp16 copy)."""
        state = getattr(layer.weight, "quant_state", None)
        if state is None:
            raise ValueError("layer: its weight is not quantized yet (bitsandbytes quantizes when the layer is "
                             "moved to its device, e.g. layer.cuda())")
        if getattr(state, "packing_format_for_cpu", False):
            packed, state = _undo_bnb_cpu_packing(layer.weight.data, state)
            return cls(packed=packed, state=state, bias=layer.bias)
        return cls(packed=layer.weight.data, state=QuantState.from_bnb(state), bias=layer.bias)

    # ---- state -----------------------------------------------------------------------------
    @property
    def quant_state(self) -> QuantState:
        """The weight's QuantState (its tensors are this layer's buffers)."""
        state2 = None
        if self.nested_absmax is not None:
            state2 = QuantState(absmax=self.nested_absmax, code=self.nested_code, blocksize=self.nested_blocksize,
                                dtype=torch.float32)
        return QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)), code=self.code,
                          dtype=self.weight_dtype, blocksize=self.blocksize, quant_type=self.quant_type,
                          offset=self.nested_offset, state2=state2)

    def dequantize(self) -> torch.Tensor:
        """The dense weight [out_features, in_features] in the dtype it was quantized from."""
        return F.dequantize_4bit(self.weight, self.quant_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x @ W^T + bias for x of shape (..., in_features) in float32, float16 or bfloat16 on the
        layer's device; y has x's dtype. Differentiable in x (and in bias once it requires grad)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"x: expected float32, float16 or bfloat16, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dimension {self.in_features} (in_features), got shape {tuple(x.shape)}")
        if x.device != self.weight.device:
            raise ValueError(f"x: expected a tensor on {self.weight.device} (the layer's device), got {x.device}")
        bias = self.bias
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
                x.requires_grad or (bias is not None and bias.requires_grad))):
            # The torch op: traced by torch.compile, differentiable by autograd.
            return torch.ops.fp4.linear_4bit(x, self.weight, self.absmax, bias, self.quant_type, self.blocksize,
                                             self.out_features, self.nested_absmax, self.nested_code,
                                             self.nested_offset, self.nested_blocksize)
        # Eager inference: the same kernel without the dispatcher's per-call cost.
        if self._kernel_args is None:
            self._kernel_args = KernelArgs.of_state(self.weight, self.quant_state)
        return linear_4bit_prepared(x, self._kernel_args, bias)

    # ---- checkpoints in bitsandbytes' key names ----------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, value in checkpoint_format.to_state_dict(self.weight, self.quant_state).items():
            if name != "weight":
                destination[prefix + name] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        ours = [k for k in state_dict if k.startswith(prefix + "weight") or k == prefix + "bias"]
        if not ours:  # nothing for this layer (a partial state dict): torch reports it as missing
            missing_keys.extend(prefix + name for name in ("weight", "bias") if getattr(self, name) is not None)
            return
        try:
            packed, state = checkpoint_format.from_state_dict(state_dict, prefix, device=self.weight.device)
        except checkpoint_format.CheckpointError as e:
            error_msgs.append(str(e))
            return
        if tuple(state.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"{prefix}weight: size mismatch, the checkpoint's weight has shape {tuple(state.shape)}, "
                              f"this layer ({self.out_features}, {self.in_features})")
            return
        bias_key = prefix + "bias"
        bias = state_dict.get(bias_key)
        if self.bias is not None and bias is None:
            missing_keys.append(bias_key)
        elif self.bias is None and bias is not None:
            unexpected_keys.append(bias_key)
        elif bias is not None and bias.shape != self.bias.shape:
            error_msgs.append(f"{bias_key}: size mismatch, expected {tuple(self.bias.shape)}, got {tuple(bias.shape)}")
            return
        # Everything checked: only now does the layer change.
        if strict:
            known = set(checkpoint_format.entry_names(state.quant_type, state.nested)) | {"bias"}
            unexpected_keys.extend(k for k in ours if k[len(prefix):] not in known)
        assign = local_metadata.get("assign_to_params_buffers", False)
        self._set_quantized(packed if assign else packed.clone(), state if assign else state.clone())
        if self.bias is not None and bias is not None:
            with torch.no_grad():
                if self.bias.is_meta or assign:
                    self.bias = nn.Parameter(bias.detach().clone(), requires_grad=self.bias.requires_grad)
                else:
                    self.bias.copy_(bias)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() must not cast the quantization buffers: only their device may change.
        kept = {name: getattr(self, name) for name in _QUANT_BUFFERS}
        self._kernel_args = None
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if before is not None and after is not None and after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return self

    def __getstate__(self):
        # (copy.deepcopy and pickling: libfp4's prepared arrays are not picklable; the copy builds its
        # own on its first forward, over its own buffers)
        state = dict(super().__getstate__())
        state["_kernel_args"] = None
        return state

    def extra_repr(self) -> str:
        nested = ", double_quant" if self.nested_absmax is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.quant_type}, blocksize={self.blocksize}{nested}")


# torch-bnb-fp4's name for the same layer.
TorchFP4Linear = FP4Linear


def _undo_bnb_cpu_packing(packed: torch.Tensor, state):
    """bitsandbytes 0.50 re-lays a Linear4bit's weight out for its AVX512-BF16 CPU kernel on the first
    eval forward: within each group of 32 rows, 64-code runs are split into low and high nibbles,
    and absmax becomes a [in/blocksize, out] bfloat16 table (nested statistics expanded). This
    undoes the code layout exactly and keeps the absmax values bitsandbytes now computes with."""
    n, k = (int(d) for d in state.shape)
    half = packed.view(torch.uint8).reshape(-1, 32)
    codes = torch.cat([half & 15, half >> 4], dim=-1)  # 64 consecutive codes per group
    codes = codes.reshape(n // 32, k // 2, 32, 2).transpose(1, 2).reshape(-1)  # row-major [n, k]
    restored = ((codes[0::2] << 4) | codes[1::2]).reshape(-1, 1)
    absmax = state.absmax.T.reshape(-1).float().contiguous()
    return restored, QuantState(absmax=absmax, shape=torch.Size((n, k)), code=state.code,
                                dtype=getattr(state, "original_dtype", state.dtype), blocksize=state.blocksize,
                                quant_type=state.quant_type)


def _is_bnb_linear4bit(layer) -> bool:
    return type(layer).__name__ in ("Linear4bit", "LinearFP4", "LinearNF4") and hasattr(layer.weight, "quant_state")


def _check_quantized(packed: torch.Tensor, state: QuantState, bias: Optional[torch.Tensor]) -> None:
    """A layer built from packed codes and a state must be one that can run: its arrays agree with
    its shape (a mismatch found at the first forward would name arrays the caller never passed)."""
    if len(state.shape) != 2:
        raise ValueError(f"state.shape: expected (out_features, in_features), got {tuple(state.shape)}")
    F.check_code_bytes(packed, state.shape, "packed")
    values = state.shape[0] * state.shape[1]
    blocks = -(-values // int(state.blocksize))
    if state.absmax.numel() != blocks:
        raise ValueError(f"state.absmax: expected {blocks} values (one per block of {state.blocksize}), "
                         f"got {state.absmax.numel()}")
    if state.nested and state.absmax.dtype != torch.uint8:
        raise TypeError(f"state.absmax: expected uint8 codes (nested statistics), got {state.absmax.dtype}")
    if not state.nested and state.absmax.dtype not in FLOAT_DTYPES:
        raise TypeError(f"state.absmax: expected float32 scales, got {state.absmax.dtype}")
    if bias is not None and (bias.dim() != 1 or bias.numel() != state.shape[0] or bias.dtype not in FLOAT_DTYPES):
        raise ValueError(f"bias: expected {state.shape[0]} float values (one per output feature), got shape "
                         f"{tuple(bias.shape)} of {bias.dtype}")
