"""Whole-model conversion: the one-liner `fp4.quantize_(model, FP4Config(...))` and torch-bnb-fp4's
`swap_linear_with_bnb_linear` / `recursively_replace_with_fp4_linear`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ._torch import check_blocksize, check_dtype_argument, check_module, check_quant_type
from .nn.linear import FP4Linear, _is_bnb_linear4bit


@dataclass
class FP4Config:
    """How `quantize_` converts linear layers.

    quant_type: "fp4" or "nf4"; blocksize: elements per absmax; double_quant: nested absmax;
    compute_dtype: dtype the model runs in (layers' bias follows it); None keeps the model's.
    """

    quant_type: str = "fp4"
    blocksize: int = 64
    double_quant: bool = False
    compute_dtype: Optional[torch.dtype] = None

    def __post_init__(self):
        check_quant_type(self.quant_type)
        check_blocksize(self.blocksize)
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"double_quant: expected a bool, got {self.double_quant!r}")
        if self.compute_dtype is not None:
            check_dtype_argument(self.compute_dtype, "compute_dtype")


def _skip_reason(linear: nn.Linear) -> Optional[str]:
    if linear.weight.numel() == 0:
        return "empty weight"
    if linear.weight.is_meta:
        return "weight on the meta device (not materialized)"
    return None


def quantize_(model: nn.Module, config: Optional[FP4Config] = None,
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, progress: bool = True) -> nn.Module:
    """Replaces, in place, every nn.Linear (and quantized bitsandbytes Linear4bit) in `model` with an
    FP4Linear, like torchao's `quantize_`. `filter_fn(module, fqn)` chooses layers (default: all).
    Layers that cannot be converted are left as they are and listed in a warning with the reason.
    Returns the model."""
    check_module(model, "model")
    config = FP4Config() if config is None else config
    if not isinstance(config, FP4Config):
        raise TypeError(f"config: expected an fp4.FP4Config, got {type(config).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn: expected a callable (module, name) -> bool, got {type(filter_fn).__name__}")
    targets = [(name, module) for name, module in model.named_modules()
               if (isinstance(module, nn.Linear) or _is_bnb_linear4bit(module))
               and (filter_fn is None or filter_fn(module, name))]
    skipped = []
    for name, module in tqdm(targets, desc="fp4: quantizing linear layers", disable=not progress or not targets,
                             leave=False):
        if _is_bnb_linear4bit(module):
            new = FP4Linear.from_bnb(module)
        else:
            reason = _skip_reason(module)
            if reason:
                skipped.append(f"{name} ({reason})")
                continue
            new = FP4Linear.from_linear(module, config.quant_type, config.blocksize, config.double_quant)
        if config.compute_dtype is not None and new.bias is not None:
            new.bias.data = new.bias.data.to(config.compute_dtype)
        _set_submodule(model, name, new)
    if skipped:
        import warnings

        warnings.warn("fp4.quantize_ left these layers unconverted: " + ", ".join(skipped), stacklevel=2)
    return model


def from_bnb(model: nn.Module, progress: bool = True) -> nn.Module:
    """Converts every quantized bitsandbytes Linear4bit in `model` to FP4Linear, in place."""
    return quantize_(model, FP4Config(), filter_fn=lambda m, _: _is_bnb_linear4bit(m), progress=progress)


def swap_linear_with_bnb_linear(linear: nn.Linear, dtype: torch.dtype = torch.float16, quant_type: str = "fp4",
                                blocksize: int = 64, double_quant: bool = False):
    """torch-bnb-fp4's helper: a bitsandbytes Linear4bit holding `linear`'s weights (quantized when
    moved to a device, as bitsandbytes does). Needs bitsandbytes."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
    check_dtype_argument(dtype, "dtype")
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=dtype, compress_statistics=double_quant, quant_type=quant_type,
                              device=linear.weight.device)
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().to(dtype), requires_grad=False, quant_type=quant_type,
                                     blocksize=blocksize, compress_statistics=double_quant)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
    return layer


def recursively_replace_with_fp4_linear(model: nn.Module, as_dtype: torch.dtype = torch.float16,
                                        use_codebook_dequant: bool = True, only_replace_bnb_layers: bool = True,
                                        ignore_layer_names: Iterable[str] = ("lm_head",), device=None) -> nn.Module:
    """torch-bnb-fp4's converter: replaces bitsandbytes 4-bit layers (and, unless
    only_replace_bnb_layers, plain nn.Linear layers) with FP4Linear, skipping names in
    ignore_layer_names (matched against the last component and the full name; one name may be given
    as a string). In place."""
    check_module(model, "model")
    check_dtype_argument(as_dtype, "as_dtype")
    # (a string is one name, not its characters: set("lm_head") would ignore nothing)
    ignored = {ignore_layer_names} if isinstance(ignore_layer_names, str) else set(ignore_layer_names or ())

    def wanted(module, name):
        if name in ignored or name.rsplit(".", 1)[-1] in ignored:
            return False
        return _is_bnb_linear4bit(module) or (not only_replace_bnb_layers and isinstance(module, nn.Linear))

    quantize_(model, FP4Config(compute_dtype=as_dtype), filter_fn=wanted)
    for module in model.modules():
        if isinstance(module, FP4Linear):
            module.use_codebook_dequant = bool(use_codebook_dequant)
    if device is not None:
        model.to(device)
    return model


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
